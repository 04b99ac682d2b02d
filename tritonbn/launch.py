"""Kernel launchers: canonical views, output allocation, config choice, launch.

Every input (N, C, *spatial) is read through one canonical (N, C, S) view
without copying (kernels/common.py):

- channel-strided: the spatial dims collapse to one run of stride 1 (NCHW,
  NCDHW, NCL contiguous, batch or channel slices of them);
- channel-inner: the channel stride is 1 and the spatial dims collapse to one
  strided run (channels_last, channels_last_3d, 2-D (N, C), slices of them).

Outputs take the memory format PyTorch's batch_norm gives them
(``suggest_memory_format`` of the input). An input no view fits (a spatial
transpose, a channels-last 1-D tensor, a transposed 2-D tensor) is copied once
into that format with ``.contiguous``; so is a gradient whose layout differs
from the input's.

These functions assume validated arguments (tritonbn.ops checks them) and a
non-empty input.
"""
from __future__ import annotations

import functools
import math
import struct
from dataclasses import dataclass

import torch
import triton.language as tl
from torch._prims_common import suggest_memory_format

from . import kernels
from .autotune import LaunchConfig, Problem, Trial, choose_config
from .autotune.config import cdiv, heuristic, next_power_of_2

_ACC = {torch.float64: tl.float64}
_INT32_MAX = 2**31 - 1


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics dtype: float64 for float64 input, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def output_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format PyTorch gives batch_norm's output (and grad_input)."""
    return suggest_memory_format(x)


@dataclass(frozen=True)
class View:
    """Sizes of the canonical (N, C, S) view and which axis is the unit-stride one
    (each tensor's strides come from _strides)."""

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


def _strides(t: torch.Tensor, view: View) -> tuple[int, int, int] | None:
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


def plan(x: torch.Tensor) -> tuple[torch.Tensor, View, torch.memory_format]:
    """The input as read by the kernels (copied only if no view fits), its view,
    and the memory format of the outputs."""
    fmt = output_format(x)
    S = math.prod(x.shape[2:])
    channel_inner = S == 1 or fmt in (torch.channels_last, torch.channels_last_3d)
    view = View(x.shape[0], x.shape[1], S, channel_inner)
    if _strides(x, view) is None:
        x = x.contiguous(memory_format=fmt)
    return x, view, fmt


def conform(t: torch.Tensor, view: View,
            fmt: torch.memory_format) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """t (an input of the same shape) with strides that fit `view`, copied if needed."""
    strides = _strides(t, view)
    if strides is None:
        t = t.contiguous(memory_format=fmt)
        strides = _strides(t, view)
    return t, strides


def _dense(t: torch.Tensor | None) -> torch.Tensor | None:
    """A per-channel vector the kernels can index as ``ptr + c``: a strided or
    expanded one (a column of a matrix, ``expand``) is copied, C values."""
    return t if t is None or t.stride(0) == 1 or t.shape[0] <= 1 else t.contiguous()


def _needs_int64(*tensors: torch.Tensor | None) -> bool:
    """Whether any element offset of these tensors (None: absent) can pass int32."""
    return any(sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride())) > _INT32_MAX
               for t in tensors if t is not None)


def _to_float32(value: float) -> float:
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:  # beyond float32's range: what a float32 cast gives
        return math.copysign(math.inf, value)


@functools.lru_cache(maxsize=64)
def _hi_lo(value: float) -> tuple[float, float]:
    """value as two float32 halves: Triton passes Python floats as fp32, and
    float64 inputs need momentum and eps to ~48 bits."""
    hi = _to_float32(value)
    return hi, _to_float32(value - hi)


def _config(op: str, view: View, x: torch.Tensor, config: LaunchConfig | None,
            trial: Trial) -> LaunchConfig:
    """The given config (validated), or the one the autotune layer chooses."""
    problem = Problem(op, view.N, view.C, view.S, view.channel_inner, x.dtype, x.device)
    if config is None:
        return choose_config(problem, trial)
    config.validate(problem)
    return config


def _grid_split(view: View, cfg: LaunchConfig) -> tuple[tuple[int, int, int], int, int]:
    """Grid and the per-program share (whole tiles) along N and along S."""
    n_per_split = cdiv(cdiv(view.N, cfg.block_n), cfg.split_n) * cfg.block_n
    s_per_split = cdiv(cdiv(view.S, cfg.block_s), cfg.split_s) * cfg.block_s
    grid = (cdiv(view.C, cfg.block_c), cdiv(view.N, n_per_split),
            cdiv(view.S, s_per_split))
    return grid, n_per_split, s_per_split


# Elements of the [splits x channels] tile a program merges partials in per step.
MERGE_TILE = 4096


def _split_block(num_splits: int, block_c: int) -> int:
    """Partials merged per step: all of them, up to a MERGE_TILE-element tile."""
    return min(next_power_of_2(num_splits), max(1, MERGE_TILE // block_c))


def _meta(view: View, cfg: LaunchConfig, x: torch.Tensor, *tensors: torch.Tensor | None) -> dict:
    return dict(BLOCK_N=cfg.block_n, BLOCK_C=cfg.block_c, BLOCK_S=cfg.block_s,
                CHANNEL_INNER=view.channel_inner, INT64=_needs_int64(x, *tensors),
                ACC_DTYPE=_ACC.get(x.dtype, tl.float32), num_warps=cfg.num_warps)


def _residual(residual: torch.Tensor | None, view: View, fmt) -> dict:
    """Launch arguments of the fused tail: the residual read through the view
    (copied if its layout differs from x's), or a dummy; strides named stride_r*."""
    if residual is None:
        return dict(residual=None, r_strides=(0, 0, 0))
    residual, strides = conform(residual, view, fmt)
    return dict(residual=residual, r_strides=strides)


def forward_training(x, weight, bias, running_mean, running_var, num_batches_tracked,
                     momentum: float | None, eps: float, config: LaunchConfig | None = None, *,
                     residual: torch.Tensor | None = None, relu: bool = False):
    """Batch statistics, normalize, update running stats in place.

    momentum=None means a cumulative average: momentum = 1 / num_batches_tracked,
    read on the device. Fused tail: y = relu(bn(x) + residual) with either part
    optional. Returns (y, save_mean, save_invstd).
    """
    x, view, fmt = plan(x)
    launch = functools.partial(_launch_forward, x, view, fmt, _dense(weight), _dense(bias),
                               num_batches_tracked=num_batches_tracked, momentum=momentum, eps=eps,
                               relu=relu, **_residual(residual, view, fmt))

    @functools.cache
    def scratch_running_stats():
        return [None if t is None else t.clone(memory_format=torch.contiguous_format)
                for t in (running_mean, running_var)]

    # a tuning candidate updates scratch copies, never the caller's running stats
    cfg = _config("forward", view, x, config, lambda c: launch(c, *scratch_running_stats()))
    running = [_dense(t) for t in (running_mean, running_var)]
    outputs = launch(cfg, *running)
    _write_back((running_mean, running_var), running)
    return outputs


def _write_back(buffers, dense) -> None:
    """Strided running stats are updated in dense copies (_dense): copy those back."""
    for buffer, updated in zip(buffers, dense):
        if updated is not buffer:
            buffer.copy_(updated)


def _launch_forward(x, view: View, fmt, weight, bias, cfg: LaunchConfig, running_mean, running_var,
                    *, num_batches_tracked, momentum, eps, partials=None, residual=None,
                    r_strides=(0, 0, 0), relu=False):
    """partials given (split regime): statistics merged from them rather than from x."""
    y = torch.empty_like(x, memory_format=fmt)
    acc = acc_dtype(x.dtype)
    save_mean = torch.empty(view.C, dtype=acc, device=x.device)
    save_invstd = torch.empty(view.C, dtype=acc, device=x.device)
    update = running_mean is not None
    dummy = save_mean
    momentum_hi, momentum_lo = _hi_lo(0.0 if momentum is None else momentum)
    eps_hi, eps_lo = _hi_lo(eps)
    args = dict(
        Weight=dummy if weight is None else weight, Bias=dummy if bias is None else bias,
        RunningMean=running_mean if update else dummy, RunningVar=running_var if update else dummy,
        NumBatchesTracked=dummy if num_batches_tracked is None else num_batches_tracked,
        SaveMean=save_mean, SaveInvstd=save_invstd,
        N=view.N, C=view.C, S=view.S,
        **_named_strides("x", _strides(x, view)), **_named_strides("y", _strides(y, view)),
        momentum_hi=momentum_hi, momentum_lo=momentum_lo, eps_hi=eps_hi, eps_lo=eps_lo,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        UPDATE_RUNNING=update, CUMULATIVE_AVERAGE=momentum is None,
        **_epilogue_args(residual, r_strides, relu, x),
        **_meta(view, cfg, x, y, residual),
    )
    if cfg.regime == "resident":
        kernels.bn_fwd_resident_kernel[(cdiv(view.C, cfg.block_c),)](x, y, **args)
        return y, save_mean, save_invstd

    grid, n_per_split, s_per_split = _grid_split(view, cfg)
    if partials is None:
        partials = _stats_partials(x, view, cfg)
    num_splits = partials.shape[1]
    kernels.bn_fwd_normalize_kernel[grid](
        x, y, Partials=partials, n_per_split=n_per_split, s_per_split=s_per_split, num_splits=num_splits,
        SPLIT_BLOCK=_split_block(num_splits, cfg.block_c), **args)
    return y, save_mean, save_invstd


def _stats_partials(x, view: View, cfg: LaunchConfig) -> torch.Tensor:
    """bn_fwd_stats_kernel: [3, P, C] Welford partials of x, one per split."""
    grid, n_per_split, s_per_split = _grid_split(view, cfg)
    partials = torch.empty((3, grid[1] * grid[2], view.C), dtype=acc_dtype(x.dtype), device=x.device)
    kernels.bn_fwd_stats_kernel[grid](
        x, partials, view.N, view.C, view.S, **_named_strides("x", _strides(x, view)),
        n_per_split=n_per_split, s_per_split=s_per_split, **_meta(view, cfg, x))
    return partials


def forward_inference(x, weight, bias, running_mean, running_var, eps: float,
                      config: LaunchConfig | None = None, *, residual: torch.Tensor | None = None,
                      relu: bool = False):
    """y = x * scale + shift from the running stats (then + residual, ReLU).
    Returns (y, mean, invstd) with mean = running_mean and invstd =
    1 / sqrt(running_var + eps) in the statistics dtype, for the eval-mode backward."""
    x, view, fmt = plan(x)
    launch = functools.partial(_launch_inference, x, view, fmt, _dense(weight), _dense(bias),
                               _dense(running_mean), _dense(running_var), eps, relu=relu,
                               **_residual(residual, view, fmt))
    return launch(_config("inference", view, x, config, launch))


def _launch_inference(x, view: View, fmt, weight, bias, running_mean, running_var, eps,
                      cfg: LaunchConfig, *, residual=None, r_strides=(0, 0, 0), relu=False):
    y = torch.empty_like(x, memory_format=fmt)
    acc = acc_dtype(x.dtype)
    save_mean = torch.empty(view.C, dtype=acc, device=x.device)
    save_invstd = torch.empty(view.C, dtype=acc, device=x.device)
    grid, n_per_split, s_per_split = _grid_split(view, cfg)
    eps_hi, eps_lo = _hi_lo(eps)
    kernels.bn_inference_kernel[grid](
        x, y, Weight=save_mean if weight is None else weight, Bias=save_mean if bias is None else bias,
        RunningMean=running_mean, RunningVar=running_var, SaveMean=save_mean, SaveInvstd=save_invstd,
        N=view.N, C=view.C, S=view.S,
        **_named_strides("x", _strides(x, view)), **_named_strides("y", _strides(y, view)),
        n_per_split=n_per_split, s_per_split=s_per_split, eps_hi=eps_hi, eps_lo=eps_lo,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        **_epilogue_args(residual, r_strides, relu, x),
        **_meta(view, cfg, x, y, residual))
    return y, save_mean, save_invstd


def backward(grad_out, x, weight, save_mean, save_invstd, training: bool,
             output_mask: tuple[bool, bool, bool], bias_dtype: torch.dtype | None = None,
             config: LaunchConfig | None = None, *, output: torch.Tensor | None = None,
             residual_grad: bool = False, relu_from_input: bool = False, bias: torch.Tensor | None = None):
    """(grad_input, grad_weight, grad_bias, grad_residual); an entry is None where
    output_mask is False, where there is no weight (grad_weight) or no bias
    (bias_dtype None). After a fused ReLU grad_out is masked where the
    forward's y was not positive: ``output`` is that y, or, with
    relu_from_input (training only), y's sign is recomputed from x, the saved
    statistics, weight and ``bias``, and nothing more is read. residual_grad
    asks for the residual's gradient, the masked grad_out."""
    if relu_from_input and (output is not None or residual_grad or not training):
        raise ValueError("relu_from_input recomputes the training forward's ReLU mask without a "
                         "residual; it takes no output or residual_grad and needs training=True")
    need_dx, need_dw, need_db = output_mask
    need_dw = need_dw and weight is not None
    need_db = need_db and bias_dtype is not None
    if not (need_dx or need_dw or need_db or residual_grad):
        return None, None, None, None
    x, view, fmt = plan(x)
    grad_out, g_strides = conform(grad_out, view, fmt)
    output, y_strides = conform(output, view, fmt) if output is not None else (None, (0, 0, 0))
    launch = functools.partial(_launch_backward, grad_out, g_strides, x, view, fmt, _dense(weight),
                               _dense(save_mean), _dense(save_invstd), training, (need_dx, need_dw, need_db),
                               bias_dtype, output=output, y_strides=y_strides, residual_grad=residual_grad,
                               relu_from_input=relu_from_input, bias=_dense(bias))
    return launch(_config("backward", view, x, config, launch))


def _launch_backward(grad_out, g_strides, x, view: View, fmt, weight, save_mean, save_invstd,
                     training, output_mask, bias_dtype, cfg: LaunchConfig, *, sums=None,
                     partials=None, count=None, output=None, y_strides=(0, 0, 0), residual_grad=False,
                     relu_from_input=False, bias=None):
    """output / relu_from_input, bias: a fused ReLU's mask (see backward).
    SyncBatchNorm's uses (split regime): sums [2, C] given: write (sum g,
    sum g * xhat) there as dbias / dweight; partials [2, P, C] and count
    given: dx from those sums instead of x's own."""
    need_dx, need_dw, need_db = output_mask
    dx = torch.empty_like(x, memory_format=fmt) if need_dx else None
    dr = torch.empty_like(x, memory_format=fmt) if residual_grad else None
    if sums is not None:
        db, dw = sums[0], sums[1]
    else:
        dw = torch.empty(view.C, dtype=weight.dtype, device=x.device) if need_dw else None
        db = torch.empty(view.C, dtype=bias_dtype, device=x.device) if need_db else None
    dummy = save_mean
    # dx and dr are allocated alike, so dr uses dx's strides
    dx_ = dx if dx is not None else (dr if dr is not None else x)
    input_strides = dict(**_named_strides("x", _strides(x, view)), **_named_strides("g", g_strides),
                         **_named_strides("y", y_strides))
    relu = output is not None
    has_bias = relu_from_input and bias is not None  # bias is read for the mask only
    # what the sums kernel shares with the others
    affine_args = dict(Weight=dummy if weight is None else weight, Bias=bias if has_bias else dummy,
                       HAS_WEIGHT=weight is not None, HAS_BIAS=has_bias,
                       RELU=relu, RELU_FROM_X=relu_from_input)
    args = dict(
        Y=output if relu else x, DR=dr if residual_grad else dx_,
        Mean=save_mean, Invstd=save_invstd,
        DWeight=dw if need_dw else dummy, DBias=db if need_db else dummy,
        N=view.N, C=view.C, S=view.S, **input_strides,
        **_named_strides("dx", _strides(dx_, view)),
        TRAINING=training, STORE_DWEIGHT=need_dw, STORE_DBIAS=need_db, COMPUTE_DX=need_dx,
        STORE_DRESIDUAL=residual_grad, **affine_args,
        **_meta(view, cfg, x, grad_out, dx_, output),
    )
    if cfg.regime == "resident":
        kernels.bn_bwd_resident_kernel[(cdiv(view.C, cfg.block_c),)](x, grad_out, dx_, **args)
        return dx, dw, db, dr

    grid, n_per_split, s_per_split = _grid_split(view, cfg)
    has_sums = training or need_dw or need_db
    if partials is None and has_sums:
        partials = torch.empty((2, grid[1] * grid[2], view.C), dtype=acc_dtype(x.dtype), device=x.device)
        kernels.bn_bwd_sums_kernel[grid](
            x, grad_out, args["Y"], Mean=save_mean, Invstd=save_invstd, Partials=partials,
            N=view.N, C=view.C, S=view.S, **input_strides, n_per_split=n_per_split,
            s_per_split=s_per_split, **affine_args, **_meta(view, cfg, x, grad_out, output))
    num_splits = 1 if partials is None else partials.shape[1]
    # without elementwise outputs, one program per channel block is enough to merge the sums
    dx_grid = grid if need_dx or residual_grad else (grid[0], 1, 1)
    kernels.bn_bwd_dx_kernel[dx_grid](
        x, grad_out, dx_, Partials=dummy if partials is None else partials,
        n_per_split=n_per_split, s_per_split=s_per_split, num_splits=num_splits,
        count=float(view.N * view.S) if count is None else count, HAS_SUMS=has_sums,
        SPLIT_BLOCK=_split_block(num_splits, cfg.block_c), **args)
    return dx, dw, db, dr


# SyncBatchNorm (tritonbn/distributed.py) runs the split kernels with the
# statistics merged across processes in between. Always the split regime; the
# tuner is not asked to time candidates, since a trial cannot run collectives.

def _split_config(op: str, view: View, x: torch.Tensor) -> LaunchConfig:
    problem = Problem(op, view.N, view.C, view.S, view.channel_inner, x.dtype, x.device)
    cfg = choose_config(problem)
    return cfg if cfg.regime == "split" else heuristic(problem, allow_resident=False)


def local_stats(x: torch.Tensor) -> torch.Tensor:
    """[3, C] (count, mean, m2) of this process's values of each channel, in
    the statistics dtype; zeros for an empty input."""
    acc = acc_dtype(x.dtype)
    merged = torch.zeros((3, x.shape[1]), dtype=acc, device=x.device)
    if x.numel() == 0:
        return merged
    x, view, _ = plan(x)
    cfg = _split_config("forward", view, x)
    _merge(_stats_partials(x, view, cfg), merged, None, None, None, None, None, None, 0.0, cfg.block_c)
    return merged


def _merge(partials, merged, save_mean, save_invstd, running_mean, running_var, num_batches_tracked,
           momentum, eps, block_c: int) -> None:
    """bn_fwd_merge_kernel: store the merged partials (merged given) or the
    statistics and running-stat update (save_mean given)."""
    channels, num_splits = partials.shape[2], partials.shape[1]
    dummy = partials
    momentum_hi, momentum_lo = _hi_lo(0.0 if momentum is None else momentum)
    eps_hi, eps_lo = _hi_lo(eps)
    update = running_mean is not None
    kernels.bn_fwd_merge_kernel[(cdiv(channels, block_c),)](
        partials, dummy if merged is None else merged,
        dummy if save_mean is None else save_mean, dummy if save_invstd is None else save_invstd,
        running_mean if update else dummy, running_var if update else dummy,
        dummy if num_batches_tracked is None else num_batches_tracked,
        channels, num_splits, momentum_hi, momentum_lo, eps_hi, eps_lo,
        STORE_MERGED=merged is not None, STORE_STATS=save_mean is not None,
        UPDATE_RUNNING=update, CUMULATIVE_AVERAGE=momentum is None,
        SPLIT_BLOCK=_split_block(num_splits, block_c), BLOCK_C=block_c,
        ACC_DTYPE=_ACC.get(partials.dtype, tl.float32))


def forward_training_from_stats(x, stats, weight, bias, running_mean, running_var,
                                num_batches_tracked, momentum: float | None, eps: float):
    """forward_training with the statistics of ``stats`` [3, P, C] (count,
    mean, m2 of every process) in place of x's own. Returns (y, save_mean,
    save_invstd); an empty x still writes the statistics and running stats."""
    acc = acc_dtype(x.dtype)
    channels = x.shape[1]
    running = [_dense(t) for t in (running_mean, running_var)]
    if x.numel() == 0:
        y = torch.empty_like(x, memory_format=output_format(x))
        save_mean = torch.empty(channels, dtype=acc, device=x.device)
        save_invstd = torch.empty(channels, dtype=acc, device=x.device)
        _merge(stats, None, save_mean, save_invstd, *running, num_batches_tracked, momentum, eps,
               block_c=min(next_power_of_2(channels), 128))
        outputs = y, save_mean, save_invstd
    else:
        x, view, fmt = plan(x)
        outputs = _launch_forward(x, view, fmt, _dense(weight), _dense(bias),
                                  _split_config("forward", view, x), *running,
                                  num_batches_tracked=num_batches_tracked, momentum=momentum, eps=eps,
                                  partials=stats)
    _write_back((running_mean, running_var), running)
    return outputs


def backward_local_sums(grad_out, x, save_mean, save_invstd) -> torch.Tensor:
    """[2, C] (sum g, sum g * xhat) over this process's values; zeros for an empty x."""
    sums = torch.zeros((2, x.shape[1]), dtype=acc_dtype(x.dtype), device=x.device)
    if x.numel() == 0:
        return sums
    x, view, fmt = plan(x)
    grad_out, g_strides = conform(grad_out, view, fmt)
    cfg = _split_config("backward", view, x)
    # dweight / dbias outputs in the statistics dtype are exactly the two sums
    _launch_backward(grad_out, g_strides, x, view, fmt, None, _dense(save_mean), _dense(save_invstd),
                     True, (False, True, True), sums.dtype, cfg, sums=sums)
    return sums


def backward_input_from_means(grad_out, x, weight, save_mean, save_invstd, means: torch.Tensor):
    """grad_input of the training backward, given ``means`` [2, C] = (sum g,
    sum g * xhat) / m over all processes' values."""
    x, view, fmt = plan(x)
    grad_out, g_strides = conform(grad_out, view, fmt)
    cfg = _split_config("backward", view, x)
    dx, _, _, _ = _launch_backward(grad_out, g_strides, x, view, fmt, _dense(weight), _dense(save_mean),
                                   _dense(save_invstd), True, (True, False, False), None, cfg,
                                   partials=means.view(2, 1, -1), count=1.0)
    return dx


def _epilogue_args(residual, r_strides, relu: bool, x: torch.Tensor) -> dict:
    return dict(R=x if residual is None else residual, **_named_strides("r", r_strides),
                HAS_RESIDUAL=residual is not None, RELU=relu)


def _named_strides(prefix: str, strides: tuple[int, int, int]) -> dict:
    return {f"stride_{prefix}n": strides[0], f"stride_{prefix}c": strides[1],
            f"stride_{prefix}s": strides[2]}
