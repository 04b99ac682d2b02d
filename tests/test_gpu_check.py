"""bench/gpu_check.sh's answers (bench/gpu_summary.py) from rows of known
times, and the script's refusal to run its GPU steps without a GPU. The
script's every step runs in CI as ``bash bench/gpu_check.sh --smoke``."""
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from bench import gpu_summary

ROOT = Path(__file__).resolve().parent.parent


def _regime_rows():
    rows = []
    for shape, times, pick in (("32x64x56x56", {"resident": 2.0, "cooperative": 1.0, "split": 4.0}, "resident"),
                               ("32x256x14x14", {"resident": 1.0, "cooperative": 1.5, "split": 3.0},
                                "resident")):
        for regime, ms in times.items():
            rows.append(dict(timestamp="2026-12-03T10:00:00+00:00", mode="forward", shape=shape, dtype="bf16",
                             layout="channels_last", provider=f"tritonbn[{regime}]", regime=regime, median_ms=ms))
        rows.append(dict(timestamp="2026-12-03T10:00:00+00:00", mode="forward", shape=shape, dtype="bf16",
                         layout="channels_last", provider="tritonbn", regime=pick, median_ms=times[pick]))
        rows.append(dict(timestamp="2026-12-03T10:00:00+00:00", mode="forward", shape=shape, dtype="bf16",
                         layout="channels_last", provider="eager", regime=None, median_ms=1.7))
    return pd.DataFrame(rows)


def test_regime_answer_counts_wins_and_the_picks_loss():
    text = gpu_summary.regimes(_regime_rows())
    assert "forward: fastest {'cooperative': 1, 'resident': 1}" in text
    assert "geomean 1.414, worst 2.000" in text  # the pick: 2.0 / 1.0 and 1.0 / 1.0
    assert "split: time over the fastest, geomean 3.464 (2 shapes)" in text  # sqrt(4 * 3)


def test_model_answer_is_the_speed_up_and_batch_norms_share():
    rows = [dict(batch=32, dtype="bf16", layout="channels_last", graphed=False, provider=p, ms_per_step=ms,
                 correct=True) for p, ms in (("torch", 10.0), ("tritonbn", 8.0), ("fused", 7.5), ("identity", 6.0))]
    table = gpu_summary.model(pd.DataFrame(rows))
    line = table.splitlines()[-1].split()
    assert line[-3:] == ["1.25", "1.333", "0.4"]  # tritonbn_speedup, fused_speedup, bn_share


def test_missing_files_are_said_to_be_missing(tmp_path, capsys):
    _regime_rows().to_csv(tmp_path / "GPU.csv", index=False)
    gpu_summary.main([str(tmp_path), "GPU", "--since", "2026-12-03T09:00:00+00:00"])
    out = capsys.readouterr().out
    assert "forward: fastest" in out and "GPU-host.csv: missing" in out and "GPU-model.csv: missing" in out
    gpu_summary.main([str(tmp_path), "GPU", "--since", "2026-12-03T11:00:00+00:00"])  # rows of an older run
    assert "GPU.csv: missing" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_without_a_gpu_the_script_refuses_and_names_the_smoke_run():
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "--smoke" in done.stderr


def test_compile_count_sees_resnet50s_batch_norm_calls_and_their_epilogues():
    """bench.compiles, which sizes the script's budget: the 53 BatchNorm calls
    of a ResNet-50 step with the epilogue fuse_epilogues gives each, and the
    distinct kernel variants they launch (recorded with the interpreter off,
    in a subprocess, as bench.traffic records them)."""
    from bench import compiles
    calls = compiles.resnet50_bn_calls(32)
    assert len(calls) == 53 and calls[0] == ("bn1", (32, 64, 112, 112))
    kinds = [compiles._epilogue(name) for name, _ in calls]
    assert (kinds.count("_relu"), kinds.count("_add_relu"), kinds.count("")) == (33, 16, 4)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    code = ("from bench import compiles; found = compiles.variants(compiles.model_items((32,)));"
            "print(len(found), sorted({key[0] for key in found}))")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr
    count, names = done.stdout.split(" ", 1)
    assert int(count) >= 10 and all(k in names for k in ("bn_fwd_", "bn_bwd_", "coop")), done.stdout
