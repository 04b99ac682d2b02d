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
# the Tensor methods that make a tensor of their own
METHOD_EMPTY = ("new_empty", "new_empty_strided")
METHOD_FILLS = ("new_zeros", "new_ones", "new_full")


@contextlib.contextmanager
def counting() -> Iterator[dict]:
    """Inside the block, a dict of the tensors made through torch's factory
    functions and Tensor's new_* methods: "all" of them, and "fills", the
    filled ones among them."""
    counts = dict(all=0, fills=0)
    originals = {(torch, name): getattr(torch, name) for name in EMPTY + FILLS}
    originals.update({(torch.Tensor, name): getattr(torch.Tensor, name) for name in METHOD_EMPTY + METHOD_FILLS})

    def counted(name, original):
        def factory(*args, **kwargs):
            counts["all"] += 1
            counts["fills"] += name in FILLS or name in METHOD_FILLS
            return original(*args, **kwargs)
        return factory

    for (owner, name), original in originals.items():
        setattr(owner, name, counted(name, original))
    try:
        yield counts
    finally:
        for (owner, name), original in originals.items():
            setattr(owner, name, original)
