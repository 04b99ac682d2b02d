"""Canonical views: how the kernels read a tensor (N, C, *spatial) as one
(N, C, S) view without copying (kernels/common.py), and what follows from a
tensor's layout: the outputs' memory format, each tensor's strides in the
view, the vector width its loads may take, whether offsets need int64.

- channel-strided: the spatial dims collapse to one run of stride 1 (NCHW,
  NCDHW, NCL contiguous, batch or channel slices of them);
- channel-inner: the channel stride is 1 and the spatial dims collapse to one
  strided run (channels_last, channels_last_3d, 2-D (N, C), slices of them).

An input no view fits (a spatial transpose, a channels-last 1-D tensor, a
transposed 2-D tensor) is copied once into the output's format.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch._prims_common import suggest_memory_format

_INT32_MAX = 2**31 - 1


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics dtype: float64 for float64 input, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def output_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format PyTorch gives batch_norm's output (and grad_input).

    Where a layout is both (size-1 dims make NCHW and NHWC strides agree) or
    neither, torch's batch_norm picks: contiguous if the input is contiguous,
    else channels_last(_3d) if it is that, else what the strides suggest
    (suggest_memory_format). So a permuted (1, 3, 2, 1) input that is
    channels_last contiguous gets a channels_last output although its
    strides alone suggest NCHW. Measured against torch 2.13's CPU batch_norm
    over random permutations, slices and expansions of 2-D to 5-D inputs."""
    if x.is_contiguous():
        return torch.contiguous_format
    for fmt, ndim in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
        if x.dim() == ndim and x.is_contiguous(memory_format=fmt):
            return fmt
    return suggest_memory_format(x)


@dataclass(frozen=True)
class View:
    """Sizes of the canonical (N, C, S) view and which axis is the unit-stride one
    (each tensor's strides come from strides_in)."""

    N: int
    C: int
    S: int
    channel_inner: bool


def _collapsed_spatial_stride(t: torch.Tensor) -> int | None:
    """Stride of the spatial dims read as one run, or None if they do not collapse."""
    stride_s, expected = None, None
    for size, stride in zip(reversed(t.shape[2:]), reversed(t.stride()[2:])):
        if size == 1:
            continue
        if stride_s is None:
            stride_s, expected = stride, stride * size
        elif stride != expected:
            return None
        else:
            expected *= size
    return 1 if stride_s is None else stride_s


def strides_in(t: torch.Tensor, view: View) -> tuple[int, int, int] | None:
    """(stride_n, stride_c, stride_s) of t in `view`, or None if t does not fit it."""
    stride_s = _collapsed_spatial_stride(t)
    if stride_s is None:
        return None
    stride_c = t.stride(1)
    if view.channel_inner and view.C > 1 and stride_c != 1:
        return None
    if not view.channel_inner and view.S > 1 and stride_s != 1:
        return None
    return t.stride(0), stride_c, stride_s


def canonical(x: torch.Tensor) -> tuple[torch.Tensor, View, torch.memory_format]:
    """The input as read by the kernels (copied only if no view fits), its view,
    and the memory format of the outputs."""
    fmt = output_format(x)
    S = math.prod(x.shape[2:])
    channel_inner = S == 1 or fmt in (torch.channels_last, torch.channels_last_3d)
    view = View(x.shape[0], x.shape[1], S, channel_inner)
    if strides_in(x, view) is None:
        x = x.contiguous(memory_format=fmt)
    return x, view, fmt


def conform(t: torch.Tensor, view: View,
            fmt: torch.memory_format) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """t (an input of the same shape) with strides that fit `view`, copied if needed."""
    strides = strides_in(t, view)
    if strides is None:
        t = t.contiguous(memory_format=fmt)
        strides = strides_in(t, view)
    return t, strides


def dense(t: torch.Tensor | None) -> torch.Tensor | None:
    """A per-channel vector the kernels can index as ``ptr + c``: a strided or
    expanded one (a column of a matrix, ``expand``) is copied, C values."""
    return t if t is None or t.stride(0) == 1 or t.shape[0] <= 1 else t.contiguous()


def needs_int64(*tensors: torch.Tensor | None) -> bool:
    """Whether any element offset of these tensors (None: absent) can pass int32."""
    return any(sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride())) > _INT32_MAX
               for t in tensors if t is not None)


def vector_width(view: View, *tensors: torch.Tensor | None) -> int:
    """The kernels' VEC: for channel-strided data, the most values (up to 16
    bytes) that start every aligned run along S in all these tensors -- S, each
    tensor's N and C strides multiples of it, each start 16-byte aligned -- so
    that loads and stores of that many values at once are safe. 1 where
    nothing more can be promised (channel-inner data, S = 49)."""
    if view.channel_inner:
        return 1
    present = [t for t in tensors if t is not None]
    vec = 16 // present[0].element_size()
    while vec > 1 and not (view.S % vec == 0 and all(_runs_aligned(t, vec) for t in present)):
        vec //= 2
    return vec


def _runs_aligned(t: torch.Tensor, vec: int) -> bool:
    # size-1 dims too: the kernels compute (masked) offsets for lanes past them,
    # and the hint must hold for every offset it covers
    return t.data_ptr() % 16 == 0 and t.stride(0) % vec == 0 and t.stride(1) % vec == 0


def flat_row_stride(t: torch.Tensor, view: View) -> int | None:
    """The stride between the flat regime's rows of t (kernels/inference.py:
    a sample's C * S values channel-strided, a pixel's C channels
    channel-inner, each run contiguous), or None where t is not such rows."""
    stride_n, stride_c, stride_s = strides_in(t, view)
    if not view.channel_inner:
        return stride_n if view.C == 1 or stride_c == view.S else None
    if view.S == 1:
        return stride_n
    if view.N == 1 or stride_n == view.S * stride_s:
        return stride_s
    return None
