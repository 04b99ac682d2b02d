"""Choice of launch settings: the one place a LaunchConfig comes from.

Order: a config forced with ``override`` (tests, experiments); then the tuner
(tritonbn.autotune.tuner: the persistent cache, or tuning on first sight of a
shape on CUDA); otherwise the plain heuristic (tritonbn.autotune.config).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

from .cache import Cache
from .config import LaunchConfig, Problem, candidates, heuristic, regime_config
from .tuner import Trial, Tuner

__all__ = ["Cache", "LaunchConfig", "Problem", "Tuner", "candidates", "choose_config", "forced_configs",
           "get_tuner", "heuristic", "override", "regime_config", "use_tuner"]

_forced: contextvars.ContextVar[dict | None] = contextvars.ContextVar("tritonbn_forced_configs",
                                                                     default=None)
_tuner: Tuner | None = None


@contextlib.contextmanager
def override(**configs: LaunchConfig) -> Iterator[None]:
    """Force the config of one or more ops inside the block, e.g.
    ``with override(forward=LaunchConfig("split", 2, 1, 4, split_n=2)):``.
    Keys are op names: forward, backward, inference."""
    unknown = set(configs) - {"forward", "backward", "inference"}
    if unknown:
        raise ValueError(f"unknown op(s) {sorted(unknown)}; expected forward, backward, inference")
    token = _forced.set({**(_forced.get() or {}), **configs})
    try:
        yield
    finally:
        _forced.reset(token)


def forced_configs() -> dict | None:
    """The configs forced by the innermost ``override`` block (op -> config), or None."""
    return _forced.get()


def get_tuner() -> Tuner:
    """The process-wide tuner (created on first use: the cache is read lazily)."""
    global _tuner
    if _tuner is None:
        _tuner = Tuner()
    return _tuner


@contextlib.contextmanager
def use_tuner(tuner: Tuner) -> Iterator[Tuner]:
    """Use another tuner (its own cache folder, an injected timer) inside the block."""
    global _tuner
    previous, _tuner = _tuner, tuner
    try:
        yield tuner
    finally:
        _tuner = previous


def choose_config(problem: Problem, trial: Trial | None = None) -> LaunchConfig:
    """The config to launch `problem` with. `trial(config)` runs the op with a
    candidate config without touching the caller's tensors; the tuner uses it."""
    forced = (_forced.get() or {}).get(problem.op)
    if forced is not None:
        forced.validate(problem)
        return forced
    return get_tuner().choose(problem, trial)
