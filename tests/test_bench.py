"""The benchmark harness on one tiny shape: schema, correctness column, that a
wrong result is flagged and never timed, and that the interpreter's run checks
correctness without timing unless asked to."""
import shutil

import pandas as pd
import pytest
import torch

from bench import providers, runner

GPU = torch.cuda.is_available()
TIMING = ["median_ms", "gbps", "copy_gbps", "frac_copy", "speedup_vs_eager", "speedup_vs_compile"]


def _run(tmp_path, *extra):
    runner.run(["--shape", "4,3,5,5", "--dtypes", "fp32", "--out", str(tmp_path), "--no-plot", *extra])
    (csv,) = tmp_path.glob("*.csv")
    return pd.read_csv(csv)


def test_harness_rows_schema_and_correctness(tmp_path, capsys):
    df = _run(tmp_path)
    assert list(df.columns) == runner.SCHEMA
    assert set(df.provider) == set(providers.PROVIDERS)
    assert set(df["mode"]) == set(providers.MODES)
    assert set(df.layout) == {"contiguous", "channels_last"}
    assert len(df) == len(providers.PROVIDERS) * len(providers.MODES) * 2
    assert df.correct.all(), df[~df.correct]
    assert (df.max_error < runner.TOLERANCE[torch.float32]).all()
    assert df.gpu_run.eq(GPU).all()
    out = capsys.readouterr().out
    assert "largest error" in out and f"{len(df)} rows, 0 not correct" in out
    if GPU:
        _assert_timed(df)
    else:  # correctness only: nothing timed, no speed ratio printed
        assert df[TIMING].isna().all().all()
        assert (df.note == runner.UNTIMED).all()
        assert "speedup" not in out and "bandwidth" not in out


@pytest.mark.skipif(GPU, reason="the flag is for runs without a GPU")
def test_interpreter_timings_only_when_asked(tmp_path, capsys):
    df = _run(tmp_path, "--interpreter-timings", "--modes", "forward", "inference")
    assert df.correct.all() and df.note.isna().all()
    _assert_timed(df)
    out = capsys.readouterr().out
    assert "--interpreter-timings" in out and "NOTHING about GPU speed" in out
    assert "geometric-mean speedup of tritonbn (Triton interpreter wall-clock, NOT GPU speed)" in out


def test_plot_draws_what_was_measured(tmp_path):
    """Bandwidth for timed rows; the error over the tolerance for untimed ones."""
    pytest.importorskip("matplotlib")
    from bench import plot
    _run(tmp_path, "--modes", "inference", "--providers", "tritonbn")
    (csv,) = tmp_path.glob("*.csv")
    assert plot.plot(csv).exists()
    column, _, _ = plot._metric(pd.read_csv(csv))
    assert column == ("frac_copy" if GPU else "error_vs_tolerance")


def _assert_timed(df):
    assert (df.median_ms > 0).all() and (df.gbps > 0).all() and (df.copy_gbps > 0).all()
    eager = df[df.provider == "eager"]
    assert (eager.speedup_vs_eager == 1.0).all()
    ours = df[df.provider == "tritonbn"].set_index(["mode", "layout"])
    theirs = df[df.provider == "eager"].set_index(["mode", "layout"])
    assert (ours.speedup_vs_eager - theirs.median_ms / ours.median_ms).abs().max() < 1e-9


def test_csv_is_appended_to(tmp_path):
    _run(tmp_path, "--modes", "inference", "--providers", "tritonbn")
    df = _run(tmp_path, "--modes", "inference", "--providers", "tritonbn")
    assert len(df) == 4  # two runs x two layouts


def test_wrong_result_is_flagged_and_not_timed(tmp_path, monkeypatch):
    original = providers._batch_norm_fn

    def broken(provider):
        fn = original(provider)
        return (lambda *args: fn(*args) * 1.01) if provider == "tritonbn" else fn
    monkeypatch.setattr(providers, "_batch_norm_fn", broken)
    df = _run(tmp_path, "--modes", "forward", "--providers", "tritonbn", "eager")
    ours = df[df.provider == "tritonbn"]
    assert not ours.correct.any() and ours.median_ms.isna().all()
    assert (ours.note == "wrong result: not timed").all()
    assert df[df.provider == "eager"].correct.all()


def test_host_time_rows(tmp_path):
    """python -m bench --host: one row per call with every path and torch
    timed, in a CSV of its own; without a GPU under the stand-in driver, in a
    child process (this one keeps its interpreter and its launch path)."""
    from bench import host
    from tritonbn import launcher
    before = launcher.enabled, launcher.Launch.__call__
    df = runner.run(["--host", "--out", str(tmp_path)])
    (csv,) = tmp_path.glob("*-host.csv")
    saved = pd.read_csv(csv)
    assert list(saved.call) == [*host.cases("cpu"), *host.split_cases("cpu")]
    for column in ("own_us", "dispatch_us", "direct_us", "torch_us"):
        assert (saved[column] > 0).all(), column
    assert (saved.ratio - saved.direct_us / saved.torch_us).abs().max() < 1e-9
    by_call = saved.set_index("call")
    assert by_call.launches["batch_norm training forward, no_grad"] == 1
    assert by_call.launches["batch_norm eval forward"] == 1
    assert by_call.launches["split training forward, no_grad"] >= 2
    assert by_call.allocations["batch_norm eval forward"] == 1  # y alone: no statistics without a gradient
    if torch.cuda.is_available():
        assert saved.launch_path.iloc[0] == "real"
    elif shutil.which("cc") is not None:  # the stand-in libcuda builds: Triton's C launcher runs
        assert saved.launch_path.iloc[0].startswith("stand-in driver: Triton's dispatch and C launcher")
    assert len(df) == len(saved)
    assert (launcher.enabled, launcher.Launch.__call__) == before
