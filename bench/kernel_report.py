"""Compile every kernel variant tritonbn would launch, for a GPU architecture,
on any machine (no GPU needed), and report registers and spills.

    python -m bench.kernel_report                        # reference shapes, heuristic configs, sm_90
    python -m bench.kernel_report --candidates --arch 80 # the whole autotune space, sm_80
    python -m bench.kernel_report --shape 32,64,56,56 --dtypes fp16

How: the launchers run on ``meta`` tensors with the kernels replaced by a
recorder, so the exact arguments, constexprs and warps of each launch are
captured without allocating anything; each distinct variant is compiled by
Triton's own compiler (LLVM, then ptxas, both shipped with triton) for
``cuda:<arch>``. GPU configs come from the heuristic with --sms streaming
multiprocessors (132: an H100 SXM). The Triton interpreter must be off.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from tritonbn.autotune.shapes import DTYPES, LAYOUTS, in_layout, layouts_for, select_shapes

ARCH_DTYPES = {**DTYPES, "fp64": torch.float64}
_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
          torch.int64: "i64"}
KERNELS = ("bn_fwd_resident_kernel", "bn_fwd_stats_kernel", "bn_fwd_normalize_kernel",
           "bn_fwd_merge_kernel", "bn_inference_kernel", "bn_bwd_sums_kernel", "bn_bwd_dx_kernel",
           "bn_bwd_resident_kernel")


class _Recorder:
    """Stands in for a kernel: `kernel[grid](...)` records the launch."""

    def __init__(self, fn, log):
        self.fn, self.log = fn, log

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append((self.fn, args, kwargs))


def signature(fn, args, kwargs) -> tuple[dict, dict]:
    """Triton's (signature, constexprs) of one recorded launch."""
    bound = dict(zip(fn.arg_names, args))
    bound.update(kwargs)
    sig, constexprs = {}, {}
    for param in fn.params:
        value = bound[param.name]
        if param.is_constexpr:
            sig[param.name], constexprs[param.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            sig[param.name] = "*" + _TYPES[value.dtype]
        elif isinstance(value, bool):
            sig[param.name] = "i1"
        elif isinstance(value, int):
            sig[param.name] = "i64" if abs(value) >= 2**31 else "i32"
        elif isinstance(value, float):
            sig[param.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {param.name}={value!r}")
    return sig, constexprs


def record_launches(problems) -> list:
    """(kernel, args, kwargs) of every launch for each (op, shape, dtype, channels_last, config)."""
    from tritonbn import kernels, launch
    log: list = []
    originals = {name: getattr(launch.kernels, name) for name in KERNELS}
    for name in KERNELS:
        setattr(launch.kernels, name, _Recorder(getattr(kernels, name), log))
    try:
        for op, shape, dtype, channels_last, config in problems:
            _record_one(launch, op, shape, dtype, channels_last, config)
    finally:
        for name, kernel in originals.items():
            setattr(launch.kernels, name, kernel)
    return log


def _record_one(launch, op, shape, dtype, channels_last, config) -> None:
    x = in_layout(torch.empty(shape, dtype=dtype, device="meta"),
                  "channels_last" if channels_last else "contiguous")
    params = dict(device="meta", dtype=torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)
    C = shape[1]
    weight, bias, rm, rv = (torch.empty(C, **params) for _ in range(4))
    stats = dict(device="meta", dtype=launch.acc_dtype(dtype))
    if op == "forward":
        launch.forward_training(x, weight, bias, rm, rv, torch.empty((), dtype=torch.long, device="meta"),
                                None, 1e-5, config=config)
        launch.forward_training(x, None, None, None, None, None, 0.1, 1e-5, config=config)
    elif op == "inference":
        launch.forward_inference(x, weight, bias, rm, rv, 1e-5, config=config)
    elif op in ("fused", "fused_forward", "fused_backward"):
        # batch_norm_relu with and without a residual; "fused" runs both directions with one config
        residual = torch.empty_like(x)
        nbt = torch.empty((), dtype=torch.long, device="meta")
        mean, invstd = torch.empty(C, **stats), torch.empty(C, **stats)
        y = torch.empty_like(x)
        if op != "fused_backward":
            launch.forward_training(x, weight, bias, rm, rv, nbt, 0.1, 1e-5, config=config,
                                    residual=residual, relu=True)
            launch.forward_training(x, weight, bias, rm, rv, nbt, 0.1, 1e-5, config=config, relu=True)
            if config.regime == "split":
                launch.forward_inference(x, weight, bias, rm, rv, 1e-5, config=config, residual=residual,
                                         relu=True)
        if op != "fused_forward":
            for training in (True, False):  # the mask read from y
                launch.backward(torch.empty_like(x), x, weight, mean, invstd, training, (True, True, True),
                                bias.dtype, config=config, output=y, residual_grad=True)
            for mask in ((True, True, True), (False, True, True)):  # ReLU alone: recomputed from x
                launch.backward(torch.empty_like(x), x, weight, mean, invstd, True, mask, bias.dtype,
                                config=config, relu_from_input=True, bias=bias)
    elif op == "sync":  # SyncBatchNorm's launches (tritonbn/distributed.py), two processes' stats
        from tritonbn.autotune import override
        with override(forward=config, backward=config):
            launch.local_stats(x)
            gathered = torch.empty((3, 2, C), **stats)
            nbt = torch.empty((), dtype=torch.long, device="meta")
            for rows in (x, x[:0]):  # an empty process writes the statistics without normalizing
                launch.forward_training_from_stats(rows, gathered, weight, bias, rm, rv, nbt, None, 1e-5)
            mean, invstd = torch.empty(C, **stats), torch.empty(C, **stats)
            launch.backward_local_sums(torch.empty_like(x), x, mean, invstd)
            launch.backward_input_from_means(torch.empty_like(x), x, weight, mean, invstd,
                                             torch.empty((2, C), **stats))
    else:
        mean, invstd = torch.empty(C, **stats), torch.empty(C, **stats)
        for training, mask in ((True, (True, True, True)), (False, (True, False, False)),
                               (False, (False, True, True))):
            launch.backward(torch.empty_like(x), x, weight, mean, invstd, training, mask, bias.dtype,
                            config=config)


def compile_variants(log, arch: int) -> list[dict]:
    """Compile each distinct recorded variant; one row per variant."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    gpu_name = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    variants = {}
    for fn, args, kwargs in log:
        kwargs = dict(kwargs)
        num_warps = kwargs.pop("num_warps", 4)
        sig, constexprs = signature(fn, args, kwargs)
        constants = tuple(sorted((k, str(v)) for k, v in constexprs.items()))
        key = (fn.__name__, tuple(sorted(sig.items())), constants, num_warps)
        variants.setdefault(key, (fn, sig, constexprs, num_warps))
    rows = []
    for (name, *_), (fn, sig, constexprs, num_warps) in variants.items():
        # bn_fwd_merge_kernel reads partials only: no x, no N / S blocks, no layout
        blocks = "x".join(str(constexprs.get(k, "-")) for k in ("BLOCK_N", "BLOCK_C", "BLOCK_S"))
        layout = {True: "channel_inner", False: "channel_strided"}.get(constexprs.get("CHANNEL_INNER"), "-")
        row = dict(kernel=name, dtype=sig.get("X", sig.get("Partials", "?")).lstrip("*"),
                   acc=str(constexprs["ACC_DTYPE"]), layout=layout,
                   int64=constexprs.get("INT64", False), blocks=blocks, warps=num_warps,
                   flags=",".join(k for k, v in constexprs.items() if v is True and k not in ("CHANNEL_INNER",
                                                                                              "INT64")),
                   ok=False, registers=None, spill_bytes=None, error="")
        try:
            compiled = triton.compile(ASTSource(fn, sig, constexprs), target=target,
                                      options={"num_warps": num_warps})
            row.update(ok=True, **_ptxas_usage(ptxas, compiled.asm["ptx"], gpu_name))
        except Exception as error:  # report, do not stop: the table is the point
            row["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[-1][:300]}"
        rows.append(row)
    return rows


def _ptxas_usage(ptxas: Path, ptx: str, gpu_name: str) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        src = Path(folder) / "k.ptx"
        src.write_text(ptx)
        result = subprocess.run([str(ptxas), "-v", "--gpu-name", gpu_name, str(src), "-o",
                                 str(Path(folder) / "k.cubin")], capture_output=True, text=True)
    out = result.stdout + result.stderr
    registers = re.search(r"Used (\d+) registers", out)
    spills = re.search(r"(\d+) bytes spill stores", out)
    return dict(registers=int(registers.group(1)) if registers else None,
                spill_bytes=int(spills.group(1)) if spills else None)


def problems_for(shapes, dtypes, layouts, ops, sms: int, with_candidates: bool):
    """(op, shape, dtype, channels_last, config) for the heuristic's GPU config
    (and, with_candidates, the whole tuning space) of each problem."""
    from tritonbn import launch
    from tritonbn.autotune import Problem, candidates, config, heuristic
    config._sm_count = lambda *args: sms  # what the heuristic would see on that GPU
    config._warp_size = lambda *args: 32
    out = []
    for shape in shapes:
        for dtype in dtypes:
            for layout in layouts_for(shape, layouts):
                x = in_layout(torch.empty(shape, dtype=dtype, device="meta"), layout)
                _, view, _ = launch.plan(x)
                for op in ops:
                    # the fused epilogue launches with the forward's and the backward's configs
                    for launched in (("fused_forward", "fused_backward") if op == "fused" else (op,)):
                        tuned_op = launched.removeprefix("fused_")
                        problem = Problem(tuned_op, view.N, view.C, view.S, view.channel_inner, dtype,
                                          torch.device("cuda", 0))
                        configs = candidates(problem) if with_candidates else [heuristic(problem)]
                        out += [(launched, shape, dtype, layout == "channels_last", c) for c in configs]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kernel_report",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90 (default 90)")
    parser.add_argument("--sms", type=int, default=132, help="SM count the heuristic assumes (default 132)")
    parser.add_argument("--suite", nargs="+", default=["resnet50", "mlp", "video"])
    parser.add_argument("--shape", action="append", help="an explicit shape, e.g. 32,64,56,56 (repeatable)")
    parser.add_argument("--dtypes", nargs="+", choices=list(ARCH_DTYPES), default=["fp32", "fp16", "bf16"])
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    parser.add_argument("--ops", nargs="+", choices=["forward", "backward", "inference", "fused"],
                        default=["forward", "backward", "inference"],
                        help="fused: batch_norm_relu with and without a residual, forward and backward")
    parser.add_argument("--candidates", action="store_true",
                        help="every autotune candidate, not only the heuristic's choice")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the report compiles the kernels", file=sys.stderr)
        return 2
    import pandas as pd
    shapes = select_shapes(args.shape, args.suite)
    problems = problems_for(shapes, [ARCH_DTYPES[d] for d in args.dtypes], args.layouts, args.ops, args.sms,
                            args.candidates)
    rows = compile_variants(record_launches(problems), args.arch)
    table = pd.DataFrame(rows).sort_values(["kernel", "dtype", "layout", "blocks", "warps"])
    print(table.to_string(index=False))
    failed, spilled = (~table.ok).sum(), (table.spill_bytes.fillna(0) > 0).sum()
    print(f"{len(table)} variants for sm_{args.arch}: {failed} failed to compile, {spilled} spill registers")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
