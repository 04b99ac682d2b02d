"""Per-call host time: what a tritonbn call costs the host, whole, next to
torch's own dispatch of the same call (python -m bench --host).

Tiny tensors make every call host-bound. Each call is timed three ways, in
turns within each repeat, beside torch's call of the same kind:

own       tritonbn's own Python: every kernel launch is a no-op.
dispatch  plus Triton's dispatch: every launch through ``kernel[grid](...)``
          (JITFunction.run: binding, specialization, cache key and lookup).
direct    plus tritonbn's direct launch (tritonbn/launcher.py): after a
          plan's first call its launches go straight to the compiled
          kernel's launcher. What a call costs by default.

On a GPU the launches are real and so are the kernels (microseconds on
these shapes). Without a GPU the three run under the stand-in driver
(bench/standin.py) in a child process with the interpreter off: Triton's
dispatch runs for real on CPU tensors and only the compiled launcher's own
work (parsing the arguments in C, the driver call: a few microseconds on a
GPU machine) is missing. torch runs its CPU batch_norm on the same tensors.

Each figure: the best over REPEATS of the mean CPU time per call
(time.thread_time: time the process was descheduled does not count) of
CALLS calls. Per row also: back-to-back calls per second of the direct path
and of torch (wall clock; on a GPU, synchronized after the last call),
kernel launches per call (fills and memsets included) and tensors
allocated per call.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import subprocess
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

if __name__ == "__main__" and sys.argv[1:] == ["--standin"]:
    from .standin import install

    install(record=False)  # before tritonbn: its kernels must be JITFunctions dispatching to the stand-in

import tritonbn  # noqa: E402
from tritonbn import autotune, launcher, plan_cache  # noqa: E402

from . import allocations  # noqa: E402

SHAPE = (4, 8, 3, 3)
SPLIT_SHAPE = (8, 16, 8, 8)  # run in the split regime (SplitTuner) for the split rows
CALLS = {"cpu": 200, "cuda": 500}
REPEATS = 9
PATHS = ("own", "dispatch", "direct")


def _no_launch(self, *tensors):
    return None


@contextlib.contextmanager
def path(name: str):
    """own: launches are no-ops; dispatch: through Triton's JIT; direct: the default."""
    enabled, call = launcher.enabled, launcher.Launch.__call__
    if name == "own":
        launcher.Launch.__call__ = _no_launch
    launcher.enabled = enabled and name == "direct"
    try:
        yield
    finally:
        launcher.enabled, launcher.Launch.__call__ = enabled, call


class SplitTuner(autotune.Tuner):
    """Chooses the split regime for every training problem (the split rows)."""

    def choose(self, problem, trial):
        if problem.op == "inference":
            return super().choose(problem, trial)
        return autotune.heuristic(problem, allow_resident=False)


def _time_all(fns: dict[str, tuple[Callable, contextlib.AbstractContextManager]], calls: int,
              sync: Callable[[], None]) -> dict[str, float]:
    """(name -> best over REPEATS of the mean CPU microseconds per call, name
    -> the same in wall-clock microseconds, back to back, synchronized
    after the last); each repeat times every fn in turn (its context entered
    around its calls), so that all see the same machine load."""
    for fn, context in list(fns.values()) * 2:  # warm-up: plans, caches, the allocator
        with context():
            fn()
    best = dict.fromkeys(fns, float("inf"))
    wall = dict.fromkeys(fns, float("inf"))
    for _ in range(REPEATS):
        for name, (fn, context) in fns.items():
            with context():
                sync()
                start, start_wall = time.thread_time_ns(), time.perf_counter_ns()
                for _ in range(calls):
                    fn()
                sync()
                best[name] = min(best[name], (time.thread_time_ns() - start) / calls / 1e3)
                wall[name] = min(wall[name], (time.perf_counter_ns() - start_wall) / calls / 1e3)
    return best, wall


def _counts(fn: Callable) -> tuple[int, int]:
    """(launches, tensors allocated) of one call of fn: tritonbn's kernel
    launches plus the fills it allocates."""
    launches = 0
    call = launcher.Launch.__call__

    def counted(self, *tensors):
        nonlocal launches
        launches += 1
        return call(self, *tensors)

    launcher.Launch.__call__ = counted
    try:
        with allocations.counting() as made:
            fn()
    finally:
        launcher.Launch.__call__ = call
    return launches + made["fills"], made["all"]


def cases(device: str, shape: tuple[int, ...] = SHAPE) -> dict[str, tuple[Callable, Callable]]:
    """name: (tritonbn call, torch call), each a no-argument callable."""
    C = shape[1]
    x = torch.randn(shape, device=device)
    g = torch.randn_like(x)
    weight, bias = torch.rand(C, device=device) + 0.5, torch.randn(C, device=device)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]

    def fresh_running():  # per case: torch's backward saves them, other cases update them
        return [torch.zeros(C, device=device), torch.ones(C, device=device)]

    def training_no_grad(bn):
        running = fresh_running()

        def call():
            with torch.no_grad():
                return bn(x, *running, weight, bias, True, 0.1, 1e-5)
        return call

    def eval_forward(bn):
        running = fresh_running()
        return lambda: bn(x, *running, weight, bias, False, 0.1, 1e-5)

    def forward_backward(bn):
        running = fresh_running()

        def call():
            y = bn(leaves[0], *running, leaves[1], leaves[2], True, 0.1, 1e-5)
            return torch.autograd.grad(y, leaves, g)
        return call

    def backward_alone(bn):
        running = fresh_running()
        bn(leaves[0], *running, leaves[1], leaves[2], True, 0.1, 1e-5)  # the plan: y's forward is a repeated call
        y = bn(leaves[0], *running, leaves[1], leaves[2], True, 0.1, 1e-5)
        return lambda: torch.autograd.grad(y, leaves, g, retain_graph=True)

    def module_forward(cls):
        module = cls(C, device=device)
        return lambda: module(x)

    def torch_bn_relu(*args):
        return F.relu(F.batch_norm(*args))

    return {
        "batch_norm training forward, no_grad": (training_no_grad(tritonbn.batch_norm),
                                                 training_no_grad(F.batch_norm)),
        "batch_norm eval forward": (eval_forward(tritonbn.batch_norm), eval_forward(F.batch_norm)),
        "training forward + backward": (forward_backward(tritonbn.batch_norm),
                                        forward_backward(F.batch_norm)),
        "backward alone": (backward_alone(tritonbn.batch_norm), backward_alone(F.batch_norm)),
        "BatchNorm2d module forward": (module_forward(tritonbn.BatchNorm2d),
                                       module_forward(torch.nn.BatchNorm2d)),
        "batch_norm_relu training forward, no_grad": (training_no_grad(tritonbn.batch_norm_relu),
                                                      training_no_grad(torch_bn_relu)),
    }


def split_cases(device: str) -> dict[str, tuple[Callable, Callable]]:
    """The split regime's rows, on SPLIT_SHAPE."""
    both = cases(device, SPLIT_SHAPE)
    wanted = {"batch_norm training forward, no_grad": "split training forward, no_grad",
              "training forward + backward": "split training forward + backward"}
    return {new: both[old] for old, new in wanted.items()}


def measure(device: str | None = None) -> list[dict]:
    """One row per call: CPU microseconds per call of each path and of torch,
    the ratios to torch, launches and allocations per call."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and tritonbn.backend("cpu") != "triton-standin":
        raise SystemExit("no GPU: the host paths are timed under the stand-in driver "
                         "(python -m bench --host runs python -m bench.host for it)")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cpu":  # torch's CPU kernels on one thread: its dispatch is timed, not a thread pool's wake-up
        torch.set_num_threads(1)
    calls = CALLS[device]
    rows = []
    groups = [(cases(device), SHAPE, contextlib.nullcontext()),
              (split_cases(device), SPLIT_SHAPE, autotune.use_tuner(SplitTuner()))]
    for group, shape, tuner in groups:
        with tuner:
            for name, (ours, theirs) in group.items():
                gc.collect()
                plan_cache.clear()
                fns = {p: (ours, lambda p=p: path(p)) for p in PATHS}
                fns["torch"] = (theirs, contextlib.nullcontext)
                us, wall = _time_all(fns, calls, sync)
                launches, allocated = _counts(ours)
                rows.append(dict(launch_path=launch_path(device), call=name, shape="x".join(map(str, shape)),
                                 own_us=us["own"], dispatch_us=us["dispatch"], direct_us=us["direct"],
                                 torch_us=us["torch"], ratio=us["direct"] / us["torch"],
                                 dispatch_ratio=us["dispatch"] / us["torch"],
                                 calls_per_s=1e6 / wall["direct"], torch_calls_per_s=1e6 / wall["torch"],
                                 launches=launches, allocations=allocated))
    return rows


def launch_path(device: str) -> str:
    """How the kernel launches ran: for real, or under which stand-in launcher."""
    if device == "cuda":
        return "real"
    from . import standin
    if standin.LAUNCHER == "triton-c":
        return "stand-in driver: Triton's dispatch and C launcher, a stand-in libcuda (no GPU)"
    return "stand-in driver: Triton's dispatch, a Python launcher (no GPU)"


def measure_standin() -> list[dict]:
    """measure() in a child process under the stand-in driver (no GPU needed)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, "-m", "bench.host", "--standin"], env=env, cwd=root,
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"python -m bench.host --standin failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _main(argv: list[str]) -> None:
    if argv[1:] != ["--standin"]:
        raise SystemExit("usage: python -m bench.host --standin  (python -m bench --host runs it)")
    print(json.dumps(measure("cpu")))


if __name__ == "__main__":
    _main(sys.argv)
