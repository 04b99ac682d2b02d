"""The autotuner and its persistent cache, on any machine: the timer is
injected, so what is tested is the choice, the caching and the safety, not
the speed."""
import json
import logging
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import tritonbn
from tritonbn import launch, plan_cache, plans, views
from tritonbn.autotune import Cache, LaunchConfig, Problem, Tuner, candidates, heuristic, override, use_tuner
from tritonbn.autotune import tuner as tuner_module
from tritonbn.autotune.tuner import ENV_AUTOTUNE, device_context, problem_key

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _tuning_on(monkeypatch):
    monkeypatch.setenv(ENV_AUTOTUNE, "1")  # conftest turns it off for the rest of the suite


class FakeTimer:
    """Costs by position in one problem's candidate list, the last candidate
    fastest (20 ms for configs of other problems). Runs fn once, as a real
    timer would, and counts calls."""

    def __init__(self, problem_space):
        self.space = problem_space
        self.calls = 0

    def __call__(self, fn, config):
        self.calls += 1
        fn()
        return 10.0 - self.space.index(config) if config in self.space else 20.0


def _x(device):
    return torch.randn(6, 3, 4, 5, device=device)


def _problem(op, x):
    _, view, _ = views.canonical(x)
    return Problem(op, view.N, view.C, view.S, view.channel_inner, x.dtype, x.device)


def _tuner(tmp_path, x, op="forward", **kwargs):
    timer = FakeTimer(candidates(_problem(op, x)))
    return Tuner(Cache(tmp_path / "autotune.json", shipped=False), timer=timer, **kwargs), timer


def _entry(tuner, x, op="forward"):
    problem = _problem(op, x)
    return tuner.cache.get(device_context(problem.device.type, problem.device.index), problem_key(problem))


def test_candidate_space_starts_with_the_heuristic_and_has_both_regimes(device):
    x = _x(device)
    space = candidates(_problem("forward", x))
    assert space[0] == heuristic(_problem("forward", x))
    assert {c.regime for c in space} == {"resident", "split"}
    assert len(space) == len(set(space))
    inference = candidates(_problem("inference", x))
    assert inference[0] == heuristic(_problem("inference", x)) and inference[0].regime == "flat"
    assert {c.regime for c in inference} == {"flat", "split"}


def test_candidates_respect_thread_and_register_limits(monkeypatch):
    from tritonbn.autotune import config
    problem = Problem("backward", 256, 64, 1, True, torch.float32, torch.device("cpu"))
    for warp in (32, 64):
        monkeypatch.setattr(config, "_warp_size", lambda *args, warp=warp: warp)
        for c in candidates(problem)[1:]:
            per_thread = c.block_n * c.block_c * c.block_s / (c.num_warps * warp)
            assert c.num_warps * warp <= 1024
            limit = config.MAX_ELEMENTS_PER_THREAD["split" if c.regime == "split" else "resident backward"]
            assert per_thread <= limit
    # 32 warps of 64 lanes: 2048 threads, more than a block may have
    assert not config._fits(LaunchConfig("split", 64, 32, 1, num_warps=32),
                            Problem("forward", 64, 32, 1, True, torch.float32, torch.device("cpu")))


def test_fastest_config_wins_and_is_used(device, tmp_path):
    x = _x(device)
    tuner, timer = _tuner(tmp_path, x)
    with use_tuner(tuner):
        y = tritonbn.batch_norm(x, None, None, training=True)
    entry = _entry(tuner, x)
    winner = LaunchConfig.from_dict(entry["config"])
    assert winner == timer.space[-1]
    assert timer.calls == len(timer.space)
    assert entry["ms"] == 10.0 - (len(timer.space) - 1) and entry["heuristic_ms"] == 10.0
    with override(forward=winner):
        assert torch.equal(tritonbn.batch_norm(x, None, None, training=True), y)


def test_second_lookup_does_not_time_again(device, tmp_path):
    x = _x(device)
    tuner, timer = _tuner(tmp_path, x)
    with use_tuner(tuner):
        tritonbn.batch_norm(x, None, None, training=True)
        calls = timer.calls
        tritonbn.batch_norm(x, None, None, training=True)
        tritonbn.batch_norm(x + 1, None, None, training=True)  # same shape: same entry
    assert calls > 0 and timer.calls == calls


def test_running_stats_updated_once_when_tuning(device, tmp_path):
    """Candidates update scratch copies; the tuning call updates the real
    buffers once, exactly as an untuned call with the winning config."""
    x = _x(device)
    tuner, _ = _tuner(tmp_path, x)
    running = torch.randn(3, device=device), torch.rand(3, device=device) + 0.5
    tuned_stats = [t.clone() for t in running]
    with use_tuner(tuner):
        y_tuned = tritonbn.batch_norm(x, *tuned_stats, training=True)
    winner = LaunchConfig.from_dict(_entry(tuner, x)["config"])
    plain_stats = [t.clone() for t in running]
    with override(forward=winner):
        y_plain = tritonbn.batch_norm(x, *plain_stats, training=True)
    assert torch.equal(y_tuned, y_plain)
    assert torch.equal(tuned_stats[0], plain_stats[0]) and torch.equal(tuned_stats[1], plain_stats[1])


def test_backward_and_inference_are_tuned_too(device, tmp_path):
    x = _x(device).requires_grad_()
    cache = Cache(tmp_path / "autotune.json", shipped=False)
    with use_tuner(Tuner(cache, timer=lambda fn, config: (fn(), 1.0)[1])):
        tritonbn.batch_norm(x, None, None, training=True).sum().backward()
        tritonbn.batch_norm(x.detach(), torch.zeros(3, device=device), torch.ones(3, device=device))
    keys = {key.split("|")[0] for problems in cache.entries().values() for key in problems}
    assert keys == {"forward", "backward", "inference"}


def test_disagreeing_candidate_is_rejected(device, tmp_path):
    """A candidate whose results differ from the heuristic's is never chosen,
    however fast."""
    x = _x(device)
    problem = _problem("forward", x)
    space = candidates(problem)

    def trial(config):
        out = launch.forward_training(x, None, None, None, None, None, 0.1, 1e-5, config=config)
        return (out[0] + 1,) + out[1:] if config == space[-1] else out
    tuner = Tuner(Cache(tmp_path / "a.json", shipped=False), timer=FakeTimer(space))
    best, entry = tuner.tune(problem, trial)
    assert best == space[-2] and entry["rejected"] == 1


def test_a_wrong_heuristic_config_is_rejected_and_logged_once(device, tmp_path, caplog):
    """The reference is the split regime's result, not the heuristic's: a
    heuristic config giving a wrong result is rejected like any other, with
    one warning naming it and the difference, however often it is tuned."""
    x = _x(device)
    problem = _problem("forward", x)
    space = candidates(problem)
    assert space[0] != tuner_module.reference_config(problem)  # here the heuristic is not the reference

    def trial(config):
        out = launch.forward_training(x, None, None, None, None, None, 0.1, 1e-5, config=config)
        return (out[0] * 1.5,) + out[1:] if config == space[0] else out
    caplog.set_level(logging.INFO, logger="tritonbn.autotune")
    for _ in range(2):
        tuner = Tuner(Cache(tmp_path / "a.json", shipped=False), timer=FakeTimer(space))
        best, entry = tuner.tune(problem, trial)
        assert best != space[0] and entry["rejected"] == 1 and entry["heuristic_ms"] is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(space[0]) in warnings[0] and "differs from the split regime" in warnings[0]
    assert float(warnings[0].rsplit(" ", 1)[1]) > 0.1  # the difference, stated
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any(m.startswith(f"tuning {problem_key(problem)}: {len(space)} candidate") for m in infos)
    assert any(m.startswith(f"tuned {problem_key(problem)} in ") and "1 of" in m for m in infos)


def test_trials_time_launches_not_plan_building(device, tmp_path, monkeypatch):
    """Each candidate's plan is built once, before its timed runs: the timer
    sees launches only; the call then reuses the winner's plan."""
    x = _x(device)
    space = candidates(_problem("forward", x))
    built = []
    original = plans.forward_plan
    monkeypatch.setattr(plans, "forward_plan", lambda *a, **k: built.append(a[3]) or original(*a, **k))

    def timer(fn, config):
        before = len(built)
        fn()
        fn()
        assert len(built) == before, "a timed run built a plan"
        return 10.0 - space.index(config)
    tuner = Tuner(Cache(tmp_path / "t.json", shipped=False), timer=timer)
    with use_tuner(tuner):
        plan_cache.clear()
        launch.forward_training(x, None, None, None, None, None, 0.1, 1e-5)
    reference = tuner_module.reference_config(_problem("forward", x))
    assert len(built) == len(set(built)) and set(built) == {*space, reference}


def test_cache_survives_a_new_process(device, tmp_path):
    x = _x(device)
    tuner, _ = _tuner(tmp_path, x)
    with use_tuner(tuner):
        tritonbn.batch_norm(x, None, None, training=True)
    expected = _entry(tuner, x)["config"]
    script = textwrap.dedent(f"""
        import torch
        from tritonbn import plans, views
        from tritonbn.autotune import Cache, Problem, Tuner
        def boom(*args):
            raise AssertionError("timed again in a new process")
        x = torch.empty(6, 3, 4, 5, device={device!r})
        _, view, _ = views.canonical(x)
        problem = Problem("forward", view.N, view.C, view.S, view.channel_inner, x.dtype, x.device)
        tuner = Tuner(Cache(shipped=False), timer=boom)
        print(tuner.choose(problem, trial=boom).to_dict())
    """)
    env = dict(os.environ, TRITONBN_CACHE_DIR=str(tmp_path), PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert eval(result.stdout.strip().splitlines()[-1]) == expected


def test_corrupt_cache_file_warns_once_and_is_replaced(device, tmp_path):
    (tmp_path / "autotune.json").write_text("{ this is not json")
    x = _x(device)
    tuner, timer = _tuner(tmp_path, x)
    with use_tuner(tuner), pytest.warns(RuntimeWarning, match="ignoring .*autotune.json") as record:
        tritonbn.batch_norm(x, None, None, training=True)
        tritonbn.batch_norm(torch.randn(4, 3, 2, device=device), None, None, training=True)
    assert len([w for w in record if "ignoring" in str(w.message)]) == 1
    assert timer.calls > 0
    data = json.loads((tmp_path / "autotune.json").read_text())
    assert data["format"] == 1 and len(next(iter(data["entries"].values()))) == 2


def test_malformed_entry_is_tuned_again(device, tmp_path):
    x = _x(device)
    problem = _problem("forward", x)
    context = device_context(problem.device.type, problem.device.index)
    (tmp_path / "autotune.json").write_text(json.dumps(
        {"format": 1, "entries": {context: {problem_key(problem): {"config": {"regime": "nope"}}}}}))
    tuner, timer = _tuner(tmp_path, x)
    with use_tuner(tuner):
        tritonbn.batch_norm(x, None, None, training=True)
    assert timer.calls > 0 and _entry(tuner, x)["config"]["regime"] in ("resident", "split")


def test_unwritable_cache_directory_keeps_entries_in_memory(device, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    x = _x(device)
    timer = FakeTimer(candidates(_problem("forward", x)))
    tuner = Tuner(Cache(blocker / "sub" / "autotune.json", shipped=False), timer=timer)
    with use_tuner(tuner), pytest.warns(RuntimeWarning, match="cannot write .*kept in memory"):
        tritonbn.batch_norm(x, None, None, training=True)
    calls = timer.calls
    with use_tuner(tuner), warnings.catch_warnings():
        warnings.filterwarnings("error", message="tritonbn autotune cache")  # given once only
        tritonbn.batch_norm(x, None, None, training=True)
    assert timer.calls == calls


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes anywhere")
def test_read_only_cache_directory(device, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        x = _x(device)
        tuner = Tuner(Cache(folder / "autotune.json", shipped=False),
                      timer=FakeTimer(candidates(_problem("forward", x))))
        with use_tuner(tuner), pytest.warns(RuntimeWarning, match="cannot write"):
            tritonbn.batch_norm(x, None, None, training=True)
        assert _entry(tuner, x) is not None
    finally:
        folder.chmod(0o700)


WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from tritonbn.autotune import Cache
    cache = Cache(Path(sys.argv[1]), shipped=False)
    start = float(sys.argv[3])
    while time.time() < start:  # both writers start together
        time.sleep(0.001)
    for i in range(150):
        cache.put("ctx", f"{sys.argv[2]}-{i}", {"config": {}, "ms": float(i)})
""")


def test_two_processes_writing_at_once(tmp_path):
    """Interleaved read-merge-write cycles: no entry lost, no broken file."""
    import time
    path = tmp_path / "autotune.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    start = str(time.time() + 8.0)
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), name, start], env=env,
                                stderr=subprocess.PIPE) for name in ("a", "b")]
    for writer in writers:
        assert writer.wait(timeout=120) == 0, writer.stderr.read().decode()[-2000:]
    entries = json.loads(path.read_text())["entries"]["ctx"]
    assert set(entries) == {f"{name}-{i}" for name in "ab" for i in range(150)}
    assert not list(tmp_path.glob(".*.tmp")), "temporary files left behind"


@pytest.mark.parametrize("stale", ["gpu", "triton", "kernels"])
def test_entries_for_another_gpu_triton_or_kernel_source_are_ignored(device, tmp_path, stale):
    x = _x(device)
    problem = _problem("forward", x)
    context = device_context(problem.device.type, problem.device.index)
    fields = context.split("|")
    index = {"gpu": 0, "triton": -2, "kernels": -1}[stale]
    fields[index] = fields[index] + "-other"
    forced = LaunchConfig("split", 1, 1, 1, 1, 1)
    (tmp_path / "autotune.json").write_text(json.dumps(
        {"format": 1, "entries": {"|".join(fields): {problem_key(problem): {"config": forced.to_dict()}}}}))
    tuner, timer = _tuner(tmp_path, x)
    with use_tuner(tuner):
        tritonbn.batch_norm(x, None, None, training=True)
    assert timer.calls > 0
    assert LaunchConfig.from_dict(_entry(tuner, x)["config"]) != forced


def test_cooperative_off_skips_a_cached_cooperative_entry(tmp_path, monkeypatch):
    """TRITONBN_COOPERATIVE=0 keeps a tuned cooperative entry from being used
    (the heuristic's config instead, off the regime) and leaves it in the
    cache; with the regime allowed the entry is used again."""
    from reference import cooperative
    x = torch.randn(6, 3, 4, 5)
    problem = _problem("forward", x)
    tuned = cooperative(x)
    context = device_context(problem.device.type, problem.device.index)
    cache = Cache(tmp_path / "autotune.json", shipped=False)
    cache.put(context, problem_key(problem), {"config": tuned.to_dict()})

    def no_trial(config):
        raise AssertionError("a cached problem is not tuned again")
    tuner = Tuner(cache, timer=FakeTimer([]))
    monkeypatch.setenv("TRITONBN_COOPERATIVE", "0")
    chosen = tuner.choose(problem, no_trial)
    assert chosen.regime != "cooperative" and chosen == heuristic(problem)
    assert cache.get(context, problem_key(problem))["config"] == tuned.to_dict()
    monkeypatch.delenv("TRITONBN_COOPERATIVE")
    assert tuner.choose(problem, no_trial) == tuned


def test_the_cache_context_names_the_sm_count(monkeypatch):
    """A CUDA context holds the device's SM count: a MIG slice of a GPU,
    with the GPU's name and fewer SMs, reads none of the whole GPU's entries."""
    from types import SimpleNamespace
    contexts = []
    for sms in (132, 16):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (9, 0))
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "NVIDIA H100 80GB HBM3")
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda index, sms=sms: SimpleNamespace(multi_processor_count=sms))
        device_context.cache_clear()
        contexts.append(device_context("cuda", 0))
    device_context.cache_clear()
    assert contexts[0] != contexts[1] and "132 SMs" in contexts[0] and "16 SMs" in contexts[1]


def test_autotune_off_uses_the_heuristic_only(device, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_AUTOTUNE, "0")
    x = _x(device)
    tuner, timer = _tuner(tmp_path, x)
    with use_tuner(tuner):
        tritonbn.batch_norm(x, None, None, training=True)
    assert timer.calls == 0 and _entry(tuner, x) is None


def test_no_tuning_on_the_interpreter_by_default(tmp_path):
    """Without an injected timer the tuner times only on CUDA."""
    x = torch.randn(6, 3, 4, 5)
    problem = _problem("forward", x)

    def boom(config):
        raise AssertionError("a trial ran")
    tuner = Tuner(Cache(tmp_path / "a.json", shipped=False))
    assert tuner.choose(problem, boom) == heuristic(problem)


def test_cli_list_and_dry_run(tmp_path):
    path = tmp_path / "autotune.json"
    Cache(path, shipped=False).put(
        "some-gpu|sm_90|triton-x|kernels-y", "forward|float16|channel_inner|32x64x3136",
        {"config": LaunchConfig("split", 4, 32, 16, 8, 1, 8).to_dict(), "ms": 0.5, "heuristic_ms": 0.6})
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    listed = subprocess.run([sys.executable, "-m", "tritonbn.autotune", "--list", "--output", str(path)],
                            env=env, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert "32x64x3136" in listed.stdout and "4x32x16" in listed.stdout and "1.2" in listed.stdout
    dry = subprocess.run([sys.executable, "-m", "tritonbn.autotune", "--dry-run", "--suite", "video",
                          "--dtypes", "fp16"], env=env, capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert len(dry.stdout.strip().splitlines()) == 3 * 2  # 3 ops x 2 layouts


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-event timing needs a GPU")
@pytest.mark.parametrize("channels_last", [False, True])
def test_real_tuning_on_cuda(tmp_path, channels_last):
    """Tuning with CUDA events: an entry is stored, and the tuned call equals
    an untuned one with the winning config, running stats included."""
    x = torch.randn(16, 32, 28, 28, device="cuda", dtype=torch.float16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    tuner = Tuner(Cache(tmp_path / "autotune.json", shipped=False))
    stats = torch.zeros(32, device="cuda"), torch.ones(32, device="cuda")
    with use_tuner(tuner):
        y = tritonbn.batch_norm(x, *stats, training=True)
    entry = _entry(tuner, x)
    assert entry is not None and entry["ms"] > 0 and entry["ms"] <= entry["heuristic_ms"]
    plain = torch.zeros(32, device="cuda"), torch.ones(32, device="cuda")
    with override(forward=LaunchConfig.from_dict(entry["config"])):
        assert torch.equal(tritonbn.batch_norm(x, *plain, training=True), y)
    assert torch.equal(stats[0], plain[0]) and torch.equal(stats[1], plain[1])
