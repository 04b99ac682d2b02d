"""Functional API mirroring torch.nn.functional.batch_norm, plus the fused
batch_norm_relu (with an optional residual).

Argument checks run in this order, before anything is launched or written:
the types (TypeError naming the argument), eps and the one-value-per-channel
rule (ValueError), then -- for an input with elements -- its rank (ValueError:
a 0-D or 1-D input is not (N, C, *)) and the op's checks (tritonbn.checks).
An input without elements gets torch's empty result whatever its rank and the
parameters' sizes or dtypes (_empty_batch_norm).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import forward_ad

from .checks import (check_mode, check_rank, check_residual, check_running_stats_tangents, check_training_flag,
                     check_types)
from .ops import BatchNormFunction, EagerBatchNormFunction
from .planned import planned_forward


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
    if momentum is None:  # torch's binding takes a float; None is batch_norm_tracked's cumulative average
        raise TypeError("batch_norm: argument 'momentum' must be float, not NoneType "
                        "(momentum=None is tritonbn.functional.batch_norm_tracked's, with num_batches_tracked)")
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
    if training is not True and training is not False:  # the plan key keeps only its truth value
        check_training_flag(training)
    if not training and forward_ad._current_level >= 0:  # the key does not hold tangents
        check_running_stats_tangents(input, running_mean, running_var, weight, bias, residual)
    y = planned_forward(input, weight, bias, running_mean, running_var, num_batches_tracked, training,
                        momentum, eps, residual, relu)
    if y is not None:  # a repeated plain eager call: its checks passed for this key before
        return y
    # planned_forward takes only plain tensors, so a wrong type reaches this point
    momentum, eps = check_types(input, running_mean, running_var, weight, bias, momentum, eps,
                                num_batches_tracked, residual)
    if input.numel() == 0:
        check_mode(input, training, eps)
        check_residual(input, residual)
        return _empty_batch_norm(input, weight, bias, residual, relu)
    check_rank(input)
    check_mode(input, training, eps)
    function = BatchNormFunction if torch.compiler.is_compiling() else EagerBatchNormFunction
    y, _, _ = function.apply(input, weight, bias, running_mean, running_var, num_batches_tracked,
                             training, momentum, eps, residual, relu)
    return y


def _empty_batch_norm(input: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None,
                      relu: bool) -> Tensor:
    """torch's result for an input without elements, of any rank: a copy of
    input (its strides kept), running stats untouched, no per-channel check.
    torch multiplies by weight[0] and adds bias[0]; the 0-D sums here do the
    same for the dtype (a float64 batch stays float64 through a float32 module)
    and for autograd (zero gradients of weight's and bias's shapes), without
    failing on a 0-element weight. No values are computed: y has none."""
    y = input.clone()
    if weight is not None:
        y = y * weight.sum()
    if bias is not None:
        y = y + bias.sum()
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y
