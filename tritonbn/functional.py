"""Functional API mirroring torch.nn.functional.batch_norm, plus the fused
batch_norm_relu (with an optional residual)."""
from __future__ import annotations

import torch
from torch import Tensor

from .checks import check_mode, check_rank
from .ops import BatchNormFunction, EagerBatchNormFunction, planned_forward


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Batch Normalization over dim 1 of ``input`` (N, C, *), as
    torch.nn.functional.batch_norm, computed by tritonbn's Triton kernels.

    training=True normalizes with the batch statistics (biased variance) and,
    when running_mean / running_var are given, updates them in place:
    ``running = (1 - momentum) * running + momentum * batch`` with the unbiased
    batch variance. training=False normalizes with the running statistics.
    """
    return batch_norm_tracked(input, running_mean, running_var, weight, bias, training,
                              momentum, eps)


def batch_norm_relu(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    residual: Tensor | None = None,
) -> Tensor:
    """``relu(batch_norm(input, ...) + residual)`` (residual optional) in one
    pass: the epilogue of a ResNet block. Arguments and running-stat updates as
    batch_norm; residual has the input's shape, dtype and device.

    Saves memory traffic (no intermediate tensors; the backward recomputes the
    ReLU mask from input in training without a residual, and otherwise masks
    with the output, which the next layer keeps anyway) and rounds once to the
    output dtype, so half-precision results can differ from the unfused chain
    by a unit in the last place.
    """
    return batch_norm_tracked(input, running_mean, running_var, weight, bias, training, momentum, eps,
                              residual=residual, relu=True)


def batch_norm_tracked(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    num_batches_tracked: Tensor | None = None,
    *,
    residual: Tensor | None = None,
    relu: bool = False,
) -> Tensor:
    """batch_norm, plus momentum=None: a cumulative moving average with
    momentum = 1 / num_batches_tracked, read on the device (no host sync and
    no graph break under torch.compile). What the modules call."""
    y = planned_forward(input, weight, bias, running_mean, running_var, num_batches_tracked, training,
                        momentum, eps, residual, relu)
    if y is not None:  # a repeated plain eager call: its checks passed for this key before
        return y
    check_rank(input)
    check_mode(input, training, eps)
    function = BatchNormFunction if torch.compiler.is_compiling() else EagerBatchNormFunction
    y, _, _ = function.apply(input, weight, bias, running_mean, running_var, num_batches_tracked,
                             training, momentum, eps, residual, relu)
    return y
