"""Choice of launch settings: the one place a LaunchConfig comes from.

Order: a config forced with ``override`` (tests, experiments), then the plain
heuristic (tritonbn.autotune.config).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

from .config import LaunchConfig, Problem, heuristic

__all__ = ["LaunchConfig", "Problem", "choose_config", "heuristic", "override"]

_forced: contextvars.ContextVar[dict] = contextvars.ContextVar("tritonbn_forced_configs", default={})


@contextlib.contextmanager
def override(**configs: LaunchConfig) -> Iterator[None]:
    """Force the config of one or more ops inside the block, e.g.
    ``with override(forward=LaunchConfig("split", 2, 1, 4, split_n=2)):``.
    Keys are op names: forward, backward, inference."""
    unknown = set(configs) - {"forward", "backward", "inference"}
    if unknown:
        raise ValueError(f"unknown op(s) {sorted(unknown)}; expected forward, backward, inference")
    token = _forced.set({**_forced.get(), **configs})
    try:
        yield
    finally:
        _forced.reset(token)


def choose_config(problem: Problem) -> LaunchConfig:
    forced = _forced.get().get(problem.op)
    if forced is not None:
        forced.validate(problem)
        return forced
    return heuristic(problem)
