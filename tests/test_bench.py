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


def test_regime_rows_run_the_regime_they_name(tmp_path, monkeypatch):
    """--regimes: a row per regime the shape can run, each correct, its plans
    built in that regime (a cooperative group of 4 forward programs, 12
    backward ones, on the interpreter's notional SM count), and tritonbn's own
    row carries the regime the heuristic picked."""
    from tritonbn import plan_cache, plans
    built = []
    for name in ("forward_plan", "backward_plan"):
        original = getattr(plans, name)

        def spy(*args, original=original, **kwargs):
            plan = original(*args, **kwargs)
            built.append(plan.regime)
            return plan
        monkeypatch.setattr(plans, name, spy)
    plan_cache.clear()
    runner.run(["--shape", "4,2,64,72", "--dtypes", "fp16", "--layouts", "channels_last", "--modes",
                "forward", "backward", "inference", "--providers", "tritonbn", "--regimes", "--out",
                str(tmp_path), "--no-plot"])
    df = pd.read_csv(next(tmp_path.glob("*.csv")))
    assert df.correct.all(), df[~df.correct]
    rows = {(r.mode, r.provider): r.regime for r in df.itertuples()}
    for mode in ("forward", "backward"):
        for regime in ("resident", "cooperative", "split"):
            assert rows[mode, f"tritonbn[{regime}]"] == regime
    for regime in ("flat", "split"):
        assert rows["inference", f"tritonbn[{regime}]"] == regime
    assert not any(p.startswith("tritonbn[") and p[9:-1] not in ("flat", "split") for m, p in rows
                   if m == "inference")
    assert {"resident", "cooperative", "split"} <= set(built)
    if not GPU:  # the interpreter's heuristic: one resident program per channel block
        assert rows["forward", "tritonbn"] == rows["backward", "tritonbn"] == "resident"
        assert rows["inference", "tritonbn"] == "flat"


def test_regime_config_is_none_where_the_regime_cannot_run(monkeypatch):
    from tritonbn.autotune import Problem, regime_config
    from tritonbn.autotune import config as config_module
    monkeypatch.setattr(config_module, "_sm_count", lambda *args: 1)  # the interpreter's count
    cpu = torch.device("cpu")
    big = Problem("forward", 256, 64, 56 * 56, False, torch.float32, cpu)
    assert regime_config(big, "resident") is None  # past the interpreter's resident tile
    assert regime_config(big, "cooperative", sms=132) is None  # a slab past FIT_BYTES
    assert regime_config(big, "split").regime == "split"
    assert regime_config(big, "flat") is None
    small = Problem("backward", 4, 2, 64 * 72, True, torch.float16, cpu)
    assert regime_config(small, "cooperative") is None  # 12 programs, more than the interpreter's 1 SM
    group = regime_config(small, "cooperative", sms=12)  # 4 x 3 tiles of 2 x 2048 values
    assert group.regime == "cooperative" and (group.split_n, group.split_s, group.block_s) == (4, 3, 2048)
    assert regime_config(small, "cooperative", sms=11) is None
    inference = Problem("inference", 4, 2, 64 * 72, True, torch.float16, cpu)
    assert [regime_config(inference, r) and regime_config(inference, r).regime
            for r in ("resident", "cooperative", "split", "flat")] == [None, None, "split", "flat"]
