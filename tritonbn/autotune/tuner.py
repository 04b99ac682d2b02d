"""The tuner: time the candidate configs of a problem on its real tensors and
keep the fastest one whose results match the split regime's.

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
import logging
import math
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
import triton

from ..launcher import on_device
from .cache import Cache
from .config import LaunchConfig, Problem, candidates, cooperative_enabled, heuristic

ENV_AUTOTUNE = "TRITONBN_AUTOTUNE"
log = logging.getLogger("tritonbn.autotune")
# candidates must agree with the reference's results to this: |a - b| <= tol * (1 + |b|)
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}

Trial = Callable[[LaunchConfig], Sequence[torch.Tensor | None]]
# timer(fn, config) -> milliseconds of fn(), which runs `config`
Timer = Callable[[Callable[[], object], LaunchConfig], float]


# Kernels faster than this (ms) are timed again as replays of a CUDA graph:
# timed launch by launch, the host's cost of a launch would be in their figure.
GRAPH_TIMING_MS = 0.02


def cuda_event_timer(fn: Callable[[], object], config: LaunchConfig | None = None) -> float:
    """Median milliseconds of fn over CUDA events (L2 flushed between runs);
    under GRAPH_TIMING_MS, of fn captured in a CUDA graph instead (where the
    capture fails, the first figure)."""
    ms = triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median")
    if ms < GRAPH_TIMING_MS:
        try:
            ms = triton.testing.do_bench_cudagraph(fn, rep=25, return_mode="median")
        except Exception as error:  # noqa: BLE001 - a trial that cannot be captured keeps its launch timing
            log.debug("CUDA graph timing failed (%s): kept the launch-by-launch figure", error)
    return ms


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
        """(fastest agreeing config, cache entry). The reference every candidate
        must agree with, the heuristic's included, is the split regime's result
        (reference_config: no program waits for another's), so it does not
        depend on the configs it judges; a candidate that disagrees is rejected
        and said so once through logging. Each candidate runs once untimed (its
        plan is built then: the timed runs are its launches), then is timed."""
        timer = self.timer or cuda_event_timer
        space = candidates(problem)
        started = time.perf_counter()
        log.info("tuning %s: %d candidate configs", problem_key(problem), len(space))
        with on_device(problem.device):  # CUDA events and the L2 flush run on the current device
            reference_cfg = reference_config(problem)
            reference = trial(reference_cfg)
            timed: list[tuple[float, int, LaunchConfig]] = []
            rejected = 0
            for order, config in enumerate(space):
                try:
                    outputs = reference if config == reference_cfg else trial(config)
                    difference = _difference(outputs, reference)
                    if difference > TOLERANCE[problem.dtype]:
                        rejected += 1
                        _reject_once(problem, config, f"differs from the split regime's result by {difference:.3g}")
                        continue
                    ms = timer(lambda config=config: trial(config), config)
                except Exception as error:  # a config this device cannot run (resources, compile error)
                    rejected += 1
                    _reject_once(problem, config, f"failed: {type(error).__name__}: {error}")
                    continue
                timed.append((ms, order, config))
        if not timed:  # nothing agreed: the reference, which needs no program to wait for another
            log.warning("tuning %s: no candidate agreed with the split regime's result; using it untimed",
                        problem_key(problem))
            best, best_ms = reference_cfg, None
        else:
            best_ms, _, best = min(timed)
        heuristic_ms = next((ms for ms, order, _ in timed if order == 0), None)  # None: rejected
        log.info("tuned %s in %.1f s: %s (%s ms; heuristic %s), %d of %d rejected",
                 problem_key(problem), time.perf_counter() - started, best,
                 "untimed" if best_ms is None else f"{best_ms:.4g}",
                 "rejected" if heuristic_ms is None else f"{heuristic_ms:.4g} ms", rejected, len(space))
        entry = dict(config=best.to_dict(), ms=best_ms, heuristic_ms=heuristic_ms,
                     candidates=len(space), rejected=rejected,
                     tuned_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        return best, entry


def reference_config(problem: Problem) -> LaunchConfig:
    """The config whose result every candidate is checked against: the split
    regime, whose programs never wait for one another (its merge is done by
    whichever program arrives last, in a fixed order)."""
    return heuristic(problem, allow_resident=False, allow_flat=False)


def _difference(outputs, reference) -> float:
    """The largest |a - b| / (1 + |b|) over the outputs (inf where one is missing or shaped otherwise)."""
    worst = 0.0
    for a, b in zip(outputs, reference):
        if a is None and b is None:
            continue
        if a is None or b is None or a.shape != b.shape:
            return math.inf
        if a.numel():
            a64, b64 = a.double(), b.double()
            nan = torch.isnan(a64) != torch.isnan(b64)
            if nan.any():
                return math.inf
            worst = max(worst, torch.nan_to_num((a64 - b64).abs() / (1 + b64.abs())).max().item())
    return worst


_rejected: set = set()


def _reject_once(problem: Problem, config: LaunchConfig, why: str) -> None:
    key = (problem_key(problem), config)
    if key not in _rejected:
        _rejected.add(key)
        log.warning("tuning %s: rejected %s: %s", problem_key(problem), config, why)
