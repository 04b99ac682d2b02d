"""Per-call host time: what tritonbn's Python path costs around its kernels,
next to torch's own dispatch of the same call (python -m bench --host).

Tiny tensors make every call host-bound. Without a GPU the Triton interpreter
is on and every kernel launch is replaced by a no-op, so only tritonbn's own
Python path is timed (a real GPU launch adds Triton's launcher on top); torch
runs its CPU batch_norm on the same tiny tensors (dispatch plus a few hundred
flops). On a GPU both run for real on CUDA tensors: the time is what the host
spends per call (kernels of this size finish long before the next launch).

Each row: the best over repeats of the mean of many calls, in microseconds.
"""
from __future__ import annotations

import contextlib
import gc
import time
from typing import Callable

import torch
import torch.nn.functional as F

import tritonbn
from tritonbn import kernels

SHAPE = (4, 8, 3, 3)
CALLS = {"cpu": 200, "cuda": 500}
REPEATS = 9


class _NoLaunch:
    """Stands in for a kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return self

    def __call__(self, *args, **kwargs):
        return None


@contextlib.contextmanager
def stubbed_launches():
    """Replace every kernel of tritonbn.kernels with a no-op for the block."""
    names = [n for n in dir(kernels) if n.startswith("bn_")]
    originals = {n: getattr(kernels, n) for n in names}
    for n in names:
        setattr(kernels, n, _NoLaunch())
    try:
        yield
    finally:
        for n, kernel in originals.items():
            setattr(kernels, n, kernel)


def _time_pair(ours: Callable[[], object], theirs: Callable[[], object], calls: int,
               sync: Callable[[], None]) -> tuple[float, float]:
    """Best over REPEATS of the mean microseconds per call of each, the two
    timed in turn within each repeat so that both see the same machine load."""
    for fn in (ours, theirs, ours, theirs):  # warm-up: plans, caches, allocator
        fn()
    best = [float("inf"), float("inf")]
    for _ in range(REPEATS):
        for i, fn in enumerate((ours, theirs)):
            sync()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            sync()
            best[i] = min(best[i], (time.perf_counter() - start) / calls)
    return best[0] * 1e6, best[1] * 1e6


def cases(device: str) -> dict[str, tuple[Callable, Callable]]:
    """name: (tritonbn call, torch call), each a no-argument callable."""
    C = SHAPE[1]
    x = torch.randn(SHAPE, device=device)
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


def measure(device: str | None = None) -> list[dict]:
    """One row per call: tritonbn's and torch's microseconds per call and the ratio."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and not kernels.INTERPRETED:
        raise SystemExit("no GPU: set TRITON_INTERPRET=1 before tritonbn is imported "
                         "(python -m bench --host does)")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    calls = CALLS[device]
    rows = []
    stub = stubbed_launches() if device == "cpu" else contextlib.nullcontext()
    with stub:
        for name, (ours, theirs) in cases(device).items():
            gc.collect()
            ours_us, theirs_us = _time_pair(ours, theirs, calls, sync)
            rows.append(dict(call=name, tritonbn_us=ours_us, torch_us=theirs_us, ratio=ours_us / theirs_us))
    return rows
