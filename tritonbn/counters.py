"""int32 counters that every kernel using them leaves at zero, so that no call
pays a memset (a launch of its own) to clear them.

Kernels that count arriving programs (the split regime's statistics kernels:
the last program of a channel block merges its partials) or exchange flags
(the cooperative regime) take a slice of this buffer. Their contract: the
counters are zero when the launch starts, and the last program to use a
counter sets it back to zero before it exits. Launches on one stream run one
after another, so each finds the counters as the last one left them: zero.

One buffer per (device, stream): launches on different streams may run at
once and must not share counters. The buffer grows (a new zeroed one) when a
launch needs more than it holds; the old one is freed on its stream, after
the launches that use it.

During CUDA graph capture a fresh zeroed buffer is made for each use and kept
alive for the process: the zeroing is a memset node of the graph, so every
replay starts from zeros whatever ran before it on any stream, and no eager
call ever shares counters with a graph.
"""
from __future__ import annotations

import torch

_buffers: dict[tuple, torch.Tensor] = {}
_captured: list[torch.Tensor] = []  # counters that captured graphs use: they must outlive the graphs
MIN_COUNTERS = 4096  # 16 KB: a channel block per counter up to C = 4096 at BLOCK_C = 1


def _stream_key(device: torch.device) -> tuple:
    if device.type == "cuda":
        return device.type, device.index, torch._C._cuda_getCurrentRawStream(device.index)
    return device.type, device.index, 0


def zeroed(device: torch.device, count: int) -> torch.Tensor:
    """At least count int32 counters on device (the first count are the
    caller's), zero now in stream order: the caller's kernels must leave
    them at zero."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        counters = torch.zeros(count, dtype=torch.int32, device=device)
        _captured.append(counters)
        return counters
    key = _stream_key(device)
    counters = _buffers.get(key)
    if counters is None or counters.numel() < count:
        size = max(count, MIN_COUNTERS, 0 if counters is None else 2 * counters.numel())
        counters = _buffers[key] = torch.zeros(size, dtype=torch.int32, device=device)
    return counters


def all_zero() -> bool:
    """Whether every kept buffer with values is all zeros (a test's check of
    the contract; it synchronizes). Meta buffers (the traffic model's calls)
    hold no values."""
    return all(not bool(t.any()) for t in _buffers.values() if not t.is_meta)
