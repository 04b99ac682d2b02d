"""Counting the tensors a call makes through torch's factory functions.

A filled tensor (torch.zeros, torch.full, ...) is a fill kernel of its own on
a GPU, so the host bench and the traffic report count fills as launches.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

EMPTY = ("empty", "empty_strided", "empty_like")
FILLS = ("zeros", "ones", "full", "zeros_like", "ones_like", "full_like")


@contextlib.contextmanager
def counting() -> Iterator[dict]:
    """Inside the block, a dict of the tensors made through torch's factory
    functions: "all" of them, and "fills", the filled ones among them."""
    counts = dict(all=0, fills=0)
    originals = {name: getattr(torch, name) for name in EMPTY + FILLS}

    def counted(name, original):
        def factory(*args, **kwargs):
            counts["all"] += 1
            counts["fills"] += name in FILLS
            return original(*args, **kwargs)
        return factory

    for name, original in originals.items():
        setattr(torch, name, counted(name, original))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch, name, original)
