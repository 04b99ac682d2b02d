"""SyncBatchNorm: batch statistics over every process of a torch.distributed
group, on tritonbn's split kernels; its launches and its autograd.Function.

Forward (training): each process reduces its own values to per-channel
Welford triples (count, mean, m2) (``local_stats``) and all-gathers
them; the normalize kernel merges the W triples with Chan's formula in rank
order, so every process gets bitwise the same statistics, and updates the
running stats with the unbiased variance over all m values. Uneven batches
work, and an empty one contributes count 0.

Backward: each process's (sum g, sum g * xhat) is all-reduced and divided by
the global m on the device, then dx as in the single-process backward.
grad_weight and grad_bias stay this process's own sums: DistributedDataParallel
all-reduces parameter gradients, as with torch.nn.SyncBatchNorm.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from . import kernels, launch, plans, views
from .autotune import LaunchConfig, choose_config
from .autotune.config import heuristic, next_power_of_2
from .checks import check_inputs
from .launcher import on_device
from .ops import mark_updated
from .views import View, acc_dtype, conform, dense, output_format


# ---------------------------------------------------------------- launches
# The split kernels with the statistics merged across processes in between.
# Always the split regime; the tuner is not asked to time candidates, since a
# trial cannot run collectives.

def _split_config(op: str, view: View, x: torch.Tensor) -> LaunchConfig:
    problem = plans.problem(op, view, x)
    cfg = choose_config(problem)
    return cfg if cfg.regime == "split" else heuristic(problem, allow_resident=False)


def local_stats(x: torch.Tensor) -> torch.Tensor:
    """[3, C] (count, mean, m2) of this process's values of each channel, in
    the statistics dtype; zeros for an empty input."""
    acc = acc_dtype(x.dtype)
    merged = torch.zeros((3, x.shape[1]), dtype=acc, device=x.device)
    if x.numel() == 0:
        return merged
    x, view, fmt = views.canonical(x)
    cfg = _split_config("forward", view, x)
    grid, _, _ = plans.grid_split(view, cfg)
    num_splits = grid[1] * grid[2]
    partials = torch.empty((3, num_splits, view.C), dtype=acc, device=x.device)
    # no merge in the kernel (MERGE=False): the triples are all-gathered first
    with on_device(x.device):  # a kernel[grid] launch: on the current device
        kernels.bn_fwd_stats_kernel[grid](x, partials, partials, partials, partials, partials, partials,
                                          partials, **plans.stats_args(x, view, cfg, num_splits, momentum=0.0,
                                                                       eps=0.0, update=False, merge=False))
    _merge(partials, merged, None, None, None, None, None, None, 0.0, cfg.block_c)
    return merged


def _merge(partials, merged, save_mean, save_invstd, running_mean, running_var, num_batches_tracked,
           momentum, eps, block_c: int) -> None:
    """bn_fwd_merge_kernel: store the merged partials (merged given) or the
    statistics and running-stat update (save_mean given)."""
    channels, num_splits = partials.shape[2], partials.shape[1]
    dummy = partials
    update = running_mean is not None
    with on_device(partials.device):
        kernels.bn_fwd_merge_kernel[(-(-channels // block_c),)](
            partials, dummy if merged is None else merged,
            dummy if save_mean is None else save_mean, dummy if save_invstd is None else save_invstd,
            running_mean if update else dummy, running_var if update else dummy,
            dummy if num_batches_tracked is None else num_batches_tracked, channels,
            **plans.merge_args(num_splits, block_c, partials.dtype, momentum=momentum, eps=eps, update=update,
                               store_merged=merged is not None, store_stats=save_mean is not None))


def forward_training_from_stats(x, stats, weight, bias, running_mean, running_var,
                                num_batches_tracked, momentum: float | None, eps: float):
    """forward_training with the statistics of ``stats`` [3, P, C] (count,
    mean, m2 of every process) in place of x's own. Returns (y, save_mean,
    save_invstd); an empty x still writes the statistics and running stats."""
    acc = acc_dtype(x.dtype)
    channels = x.shape[1]
    running = [dense(t) for t in (running_mean, running_var)]
    if x.numel() == 0:
        y = torch.empty_like(x, memory_format=output_format(x))
        save_mean = torch.empty(channels, dtype=acc, device=x.device)
        save_invstd = torch.empty(channels, dtype=acc, device=x.device)
        _merge(stats, None, save_mean, save_invstd, *running, num_batches_tracked, momentum, eps,
               block_c=min(next_power_of_2(channels), 128))
        outputs = y, save_mean, save_invstd
    else:
        x, view, fmt = views.canonical(x)
        weight, bias = dense(weight), dense(bias)
        p = plans.forward_plan(x, view, fmt, _split_config("forward", view, x), training=True, weight=weight,
                               bias=bias, update=running_mean is not None, momentum=momentum, eps=eps,
                               residual=None, r_strides=(0, 0, 0), relu=False, num_splits=stats.shape[1])
        outputs = launch.run_forward(p, x, weight, bias, *running, num_batches_tracked, None, partials=stats)
    launch.write_back((running_mean, running_var), running)
    return outputs


def _sync_backward_plan(grad_out, x, weight, output_mask, bias_dtype, partials_given: bool):
    x, view, fmt = views.canonical(x)
    grad_out, _ = conform(grad_out, view, fmt)
    p = plans.backward_plan(grad_out, x, view, fmt, _split_config("backward", view, x), training=True,
                            weight=weight, output_mask=output_mask, bias_dtype=bias_dtype, output=None,
                            residual_grad=False, relu_from_input=False, has_bias=False,
                            partials_given=partials_given, count=1.0 if partials_given else None)
    return p, grad_out, x


def backward_local_sums(grad_out, x, save_mean, save_invstd) -> torch.Tensor:
    """[2, C] (sum g, sum g * xhat) over this process's values; zeros for an empty x."""
    sums = torch.zeros((2, x.shape[1]), dtype=acc_dtype(x.dtype), device=x.device)
    if x.numel() == 0:
        return sums
    # dweight / dbias outputs in the statistics dtype are exactly the two sums
    p, grad_out, x = _sync_backward_plan(grad_out, x, None, (False, True, True), sums.dtype, False)
    launch.run_backward(p, grad_out, x, None, dense(save_mean), dense(save_invstd), None, None, sums=sums)
    return sums


def backward_input_from_means(grad_out, x, weight, save_mean, save_invstd, means: torch.Tensor):
    """grad_input of the training backward, given ``means`` [2, C] = (sum g,
    sum g * xhat) / m over all processes' values."""
    weight = dense(weight)
    p, grad_out, x = _sync_backward_plan(grad_out, x, weight, (True, False, False), None, True)
    dx, _, _, _ = launch.run_backward(p, grad_out, x, weight, dense(save_mean), dense(save_invstd), None, None,
                                      partials=means.view(2, 1, -1))
    return dx


def _all_gather_stats(stats: Tensor, group, world_size: int) -> Tensor:
    """[3, C] per process -> [3, W, C] in rank order."""
    parts = [torch.empty_like(stats) for _ in range(world_size)]
    dist.all_gather(parts, stats, group=group)
    return torch.stack(parts, dim=1)


class SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode batch norm over a process group; saves (x, weight,
    save_mean, save_invstd, m) and all-reduces the backward's two sums."""

    @staticmethod
    def forward(ctx, input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                running_mean: Optional[Tensor], running_var: Optional[Tensor],
                num_batches_tracked: Optional[Tensor], momentum: Optional[float], eps: float,
                group, world_size: int) -> Tensor:
        check_inputs(input, weight, bias, running_mean, running_var, num_batches_tracked, True, momentum)
        stats = _all_gather_stats(local_stats(input), group, world_size)
        y, save_mean, save_invstd = forward_training_from_stats(
            input, stats, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps)
        mark_updated(running_mean, running_var)
        count = stats[0, :, :1].sum(0)  # [1]: m, every process's values of a channel
        ctx.save_for_backward(input, weight, save_mean, save_invstd, count)
        ctx.group = group
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        input, weight, save_mean, save_invstd, count = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        sums = backward_local_sums(grad_out, input, save_mean, save_invstd)
        dx = dw = db = None
        if need_dx:
            # every process joins the all-reduce, an empty one too
            total = sums.clone()
            dist.all_reduce(total, group=ctx.group)
            if input.numel():
                dx = backward_input_from_means(grad_out, input, weight, save_mean, save_invstd, total / count)
        if need_dw:
            dw = sums[1].to(weight.dtype)
        if need_db:
            db = sums[0].to(ctx.bias_dtype)
        return dx, dw, db, None, None, None, None, None, None, None
