"""SyncBatchNorm's math: batch statistics over every process of a
torch.distributed group, on tritonbn's split kernels.

Forward (training): each process reduces its own values to per-channel
Welford triples (count, mean, m2) (``launch.local_stats``) and all-gathers
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

from . import launch
from .checks import check_inputs
from .ops import mark_updated


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
        stats = _all_gather_stats(launch.local_stats(input), group, world_size)
        y, save_mean, save_invstd = launch.forward_training_from_stats(
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
        sums = launch.backward_local_sums(grad_out, input, save_mean, save_invstd)
        dx = dw = db = None
        if need_dx:
            # every process joins the all-reduce, an empty one too
            total = sums.clone()
            dist.all_reduce(total, group=ctx.group)
            if input.numel():
                dx = launch.backward_input_from_means(grad_out, input, weight, save_mean, save_invstd,
                                                      total / count)
        if need_dw:
            dw = sums[1].to(weight.dtype)
        if need_db:
            db = sums[0].to(ctx.bias_dtype)
        return dx, dw, db, None, None, None, None, None, None, None
