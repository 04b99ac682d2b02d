"""Every kernel variant compiles for a real GPU target (sm_90) with Triton's
own compiler, on any machine: the interpreter runs kernels as Python and never
exercises the compiler. Launches are recorded on meta tensors (no memory), so
an input past 2**31 elements costs nothing and covers the int64-offset code.
python -m bench.kernel_report does the same for the reference shapes."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent("""
    import json, torch
    from tritonbn.autotune import LaunchConfig
    from bench.kernel_report import compile_variants, record_launches
    resident = LaunchConfig("resident", 4, 2, 64, num_warps=4)
    split = LaunchConfig("split", 2, 2, 16, 2, 2, num_warps=4)
    cooperative = LaunchConfig("cooperative", 2, 2, 32, split_n=2, split_s=2, num_warps=4)
    flat = LaunchConfig("flat", 2, 1, 64, split_n=2, num_warps=4)
    problems = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for shape, channels_last in (((4, 8, 6, 6), False), ((4, 8, 6, 6), True), ((64, 24), False)):
            r = LaunchConfig("resident", 64, 2, 1, num_warps=4) if len(shape) == 2 else resident
            for op in ("forward", "backward", "inference"):
                c = LaunchConfig("cooperative", 32, 2, 1, split_n=2, num_warps=4) if len(shape) == 2 else cooperative
                for config in ((r, split, c) if op != "inference" else (split, flat)):
                    problems.append((op, shape, dtype, channels_last, config))
            problems.append(("fused_inference", shape, dtype, channels_last, flat))
            problems.append(("sync", shape, dtype, channels_last, split))
            if len(shape) == 4:  # the fused epilogue's variants, both layouts and regimes
                problems += [("fused", shape, dtype, channels_last, config) for config in (r, split, cooperative)]
    for op in ("forward", "backward", "inference"):  # 2.2e9 elements: int64 offsets
        problems.append((op, (1, 2, 1_100_000_000), torch.float16, False, split))
    problems.append(("inference", (1, 2, 1_100_000_000), torch.float16, False, flat))
    rows = compile_variants(record_launches(problems), 90)
    print(json.dumps(rows))
""")


def test_every_kernel_variant_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                            timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(result.stdout.strip().splitlines()[-1])
    failed = [r for r in rows if not r["ok"]]
    assert not failed, "\n".join(f"{r['kernel']} {r['dtype']} {r['layout']} {r['flags']}: {r['error']}"
                                 for r in failed)
    kernels = {r["kernel"] for r in rows}
    # every kernel but bn_bwd_reduce_kernel, which the launches no longer use (the sums kernel reduces)
    assert len(kernels) == 11 and any(r["int64"] for r in rows)
    assert {r["dtype"] for r in rows} == {"fp32", "fp16", "bf16", "fp64"}
    spilled = [r for r in rows if r["spill_bytes"] and r["dtype"] != "fp64"]
    assert not spilled, spilled
    # one row per variant, and its columns tell it apart from every other (kernel_report's table)
    from bench.kernel_report import ROW_KEY
    assert len({tuple(r[k] for k in ROW_KEY) for r in rows}) == len(rows)
