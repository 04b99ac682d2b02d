"""The tuner: time the candidate configs of a problem on its real tensors and
keep the fastest one whose results match the heuristic's.

Policy (Tuner.choose):
- ``TRITONBN_AUTOTUNE=0``: the heuristic, nothing else (no timing, no cache);
- a cached entry for this GPU / triton / kernel source and problem: used as is;
- otherwise, on CUDA (outside CUDA-graph capture), tune now and remember the
  winner in memory and on disk; on the Triton interpreter, where timings mean
  nothing, the heuristic. An injected timer (tests) tunes anywhere.

A candidate runs through ``trial(config)``, which the launcher builds so that
nothing the caller sees is touched: the forward's running statistics are
scratch copies, outputs are fresh tensors. The call that tunes then runs once
more, for real, with the winner: running stats are updated exactly once and
the outputs are those of an untuned call with the winning config.
"""
from __future__ import annotations

import datetime
import functools
import hashlib
import importlib
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
import triton

from .cache import Cache
from .config import LaunchConfig, Problem, candidates, cooperative_enabled, heuristic

ENV_AUTOTUNE = "TRITONBN_AUTOTUNE"
# candidates must agree with the heuristic's results to this (rtol = atol)
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}

Trial = Callable[[LaunchConfig], Sequence[torch.Tensor | None]]
# timer(fn, config) -> milliseconds of fn(), which runs `config`
Timer = Callable[[Callable[[], object], LaunchConfig], float]


def cuda_event_timer(fn: Callable[[], object], config: LaunchConfig | None = None) -> float:
    """Median milliseconds of fn over CUDA events (L2 flushed between runs)."""
    return triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median")


@functools.lru_cache(maxsize=1)
def kernel_source_hash() -> str:
    folder = Path(importlib.import_module("tritonbn.kernels").__path__[0])
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def device_context(device_type: str, index: int | None) -> str:
    """What a cache entry is valid for: GPU, compute capability and SM count
    (a MIG slice has the name of its GPU and fewer SMs), triton, kernel sources."""
    versions = f"triton-{triton.__version__}|kernels-{kernel_source_hash()}"
    if device_type == "cuda":
        index = torch.cuda.current_device() if index is None else index
        major, minor = torch.cuda.get_device_capability(index)
        sms = torch.cuda.get_device_properties(index).multi_processor_count
        return f"{torch.cuda.get_device_name(index)}|sm_{major}{minor}|{sms} SMs|{versions}"
    return f"{device_type}-interpreter|{versions}"


def problem_key(problem: Problem) -> str:
    dtype = str(problem.dtype).removeprefix("torch.")
    return f"{problem.op}|{dtype}|{problem.layout}|{problem.N}x{problem.C}x{problem.S}"


def _agree(outputs, reference, dtype: torch.dtype) -> bool:
    tol = TOLERANCE[dtype]
    return all((a is None and b is None) or
               (a is not None and b is not None and a.shape == b.shape and
                torch.allclose(a.double(), b.double(), rtol=tol, atol=tol, equal_nan=True))
               for a, b in zip(outputs, reference))


class Tuner:
    """cache: where entries are looked up and stored; timer: None for CUDA
    events (and tuning only on CUDA), or an injected one (tuning anywhere);
    retune: ignore existing entries (pre-tuning again)."""

    def __init__(self, cache: Cache | None = None, timer: Timer | None = None, retune: bool = False):
        self.cache = cache if cache is not None else Cache()
        self.timer = timer
        self.retune = retune

    def _can_time(self, problem: Problem) -> bool:
        if self.timer is not None:
            return True
        return problem.device.type == "cuda" and not torch.cuda.is_current_stream_capturing()

    def choose(self, problem: Problem, trial: Trial | None) -> LaunchConfig:
        if os.environ.get(ENV_AUTOTUNE, "1") == "0":
            return heuristic(problem)
        context = device_context(problem.device.type, problem.device.index)
        key = problem_key(problem)
        cached = None if self.retune else self._cached(problem, context, key)
        if cached is not None:
            if cached.regime == "cooperative" and not cooperative_enabled():
                return heuristic(problem)  # the entry stays, for when the regime is allowed again
            return cached
        if trial is None or not self._can_time(problem):
            return heuristic(problem)
        config, entry = self.tune(problem, trial)
        self.cache.put(context, key, entry)
        return config

    def _cached(self, problem: Problem, context: str, key: str) -> LaunchConfig | None:
        entry = self.cache.get(context, key)
        if entry is None:
            return None
        try:
            config = LaunchConfig.from_dict(entry["config"])
            config.validate(problem)
        except (KeyError, TypeError, ValueError):
            return None  # a malformed entry: tune again, the new entry replaces it
        return config

    def tune(self, problem: Problem, trial: Trial) -> tuple[LaunchConfig, dict]:
        """(fastest agreeing config, cache entry). The heuristic's config is the
        reference every other candidate must agree with, and is always timed."""
        timer = self.timer or cuda_event_timer
        space = candidates(problem)
        reference = trial(space[0])
        timed: list[tuple[float, int, LaunchConfig]] = []
        rejected = 0
        for order, config in enumerate(space):
            try:
                outputs = reference if order == 0 else trial(config)
                if not _agree(outputs, reference, problem.dtype):
                    rejected += 1
                    continue
                ms = timer(lambda config=config: trial(config), config)
            except Exception:  # a config this device cannot run (resources, compile error)
                if order == 0:
                    raise
                rejected += 1
                continue
            timed.append((ms, order, config))
        best_ms, _, best = min(timed)
        entry = dict(config=best.to_dict(), ms=best_ms, heuristic_ms=timed[0][0],
                     candidates=len(space), rejected=rejected,
                     tuned_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        return best, entry
