"""torch.library custom ops (namespace ``tritonbn``) and the autograd.Function
that ties forward to backward.

``tritonbn::batch_norm_forward`` declares that it mutates running_mean and
running_var, so torch.compile sees the buffer update instead of losing it.
Each op has a fake implementation (shapes, dtypes, strides only), so
torch.compile(fullgraph=True) traces through without a graph break.

In plain eager mode BatchNormFunction calls the ops' implementations directly
(see _plain_eager); tracing, dispatch modes and tensor subclasses get the ops.

Dispatch: CUDA tensors run the Triton kernels; CPU tensors run them when the
Triton interpreter is on (TRITON_INTERPRET=1 before tritonbn is imported) and
otherwise run PyTorch's own batch_norm (tritonbn.fallback); other devices run
PyTorch's batch_norm too.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import fallback, kernels, launch
from .checks import check_inputs


def runs_triton(t: Tensor) -> bool:
    """Whether the Triton kernels (compiled or interpreted) handle this tensor."""
    return t.device.type == "cuda" or (t.device.type == "cpu" and kernels.INTERPRETED)


def _empty_stats(input: Tensor) -> tuple[Tensor, Tensor]:
    acc = launch.acc_dtype(input.dtype)
    channels = input.shape[1]
    return input.new_zeros((channels,), dtype=acc), input.new_zeros((channels,), dtype=acc)


def _forward(
    input: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    num_batches_tracked: Optional[Tensor],
    training: bool,
    momentum: Optional[float],
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, save_mean, save_invstd). Training: batch statistics, running stats
    updated in place when given (momentum=None: cumulative average over
    num_batches_tracked). Eval: running statistics; save_mean / save_invstd
    are then running_mean and 1 / sqrt(running_var + eps)."""
    check_inputs(input, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum)
    if input.numel() == 0:  # empty batch: empty output, running stats untouched
        return (torch.empty_like(input, memory_format=launch.output_format(input)),
                *_empty_stats(input))
    impl = launch if runs_triton(input) else fallback
    if training:
        return impl.forward_training(input, weight, bias, running_mean, running_var,
                                     num_batches_tracked, momentum, eps)
    return impl.forward_inference(input, weight, bias, running_mean, running_var, eps)


batch_norm_forward = torch.library.custom_op(
    "tritonbn::batch_norm_forward", _forward, mutates_args=("running_mean", "running_var"))


@batch_norm_forward.register_fake
def _(input, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum, eps):
    check_inputs(input, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum)
    y = torch.empty_like(input, memory_format=launch.output_format(input))
    acc = launch.acc_dtype(input.dtype)
    return y, input.new_empty((input.shape[1],), dtype=acc), input.new_empty((input.shape[1],), dtype=acc)


def _backward(
    grad_out: Tensor,
    input: Tensor,
    weight: Optional[Tensor],
    save_mean: Tensor,
    save_invstd: Tensor,
    training: bool,
    output_mask: list[bool],
    bias_dtype: Optional[torch.dtype],
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_input, grad_weight, grad_bias). A gradient not asked for in
    output_mask, or with no parameter to go to, comes back as an empty tensor."""
    need_dx, need_dw, need_db = output_mask
    if input.numel() == 0:
        dx = torch.empty_like(input, memory_format=launch.output_format(input)) if need_dx else None
        dw = weight.new_zeros(weight.shape) if need_dw and weight is not None else None
        db = input.new_zeros((input.shape[1],), dtype=bias_dtype) if need_db and bias_dtype else None
    else:
        impl = launch if runs_triton(input) else fallback
        dx, dw, db = impl.backward(grad_out, input, weight, save_mean, save_invstd, training,
                                   (need_dx, need_dw, need_db), bias_dtype)
    placeholder = input.new_empty((0,))
    return (placeholder if dx is None else dx, placeholder.clone() if dw is None else dw,
            placeholder.clone() if db is None else db)


batch_norm_backward = torch.library.custom_op("tritonbn::batch_norm_backward", _backward,
                                             mutates_args=())


@batch_norm_backward.register_fake
def _(grad_out, input, weight, save_mean, save_invstd, training, output_mask, bias_dtype):
    need_dx, need_dw, need_db = output_mask
    dx = torch.empty_like(input, memory_format=launch.output_format(input)) if need_dx \
        else input.new_empty((0,))
    dw = weight.new_empty(weight.shape) if need_dw and weight is not None else input.new_empty((0,))
    db = input.new_empty((input.shape[1],), dtype=bias_dtype) if need_db and bias_dtype is not None \
        else input.new_empty((0,))
    return dx, dw, db


def _no_double_backward(ctx, *grads):
    raise NotImplementedError(
        "tritonbn: double backward (a gradient of batch_norm's gradient, e.g. with "
        "create_graph=True) is not supported; use torch.nn.functional.batch_norm for it")


torch.library.register_autograd("tritonbn::batch_norm_backward", _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _plain_eager(*tensors: Tensor | None) -> bool:
    """Plain eager execution: no torch.compile / export / jit tracing, no
    dispatch mode (FakeTensorMode, FlopCounterMode, ...), no functorch
    transform, no tensor subclass. There the ops' Python implementations are
    called directly, skipping ~50 us of custom-op dispatch per call; anywhere
    else the registered ops run, so tracers see them."""
    return (not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and _get_current_dispatch_mode() is None
            and not torch._C._are_functorch_transforms_active()
            and all(t is None or type(t) in _PLAIN_TENSORS for t in tensors))


def _mark_updated(*tensors: Tensor | None) -> None:
    """Bump the version counters of buffers written in place, as the op's
    declared mutation does, so autograd still detects a stale saved tensor."""
    for t in tensors:
        if t is not None and not t.is_inference():
            torch.autograd.graph.increment_version(t)


class BatchNormFunction(torch.autograd.Function):
    """Forward and backward ops tied for autograd; saves only (x, weight,
    save_mean, save_invstd) and routes gradients to what requires them."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, num_batches_tracked,
                training, momentum, eps):
        args = (input, weight, bias, running_mean, running_var, num_batches_tracked,
                training, momentum, eps)
        if _plain_eager(input, weight, bias, running_mean, running_var, num_batches_tracked):
            y, save_mean, save_invstd = _forward(*args)
            if training:
                _mark_updated(running_mean, running_var)
        else:
            y, save_mean, save_invstd = torch.ops.tritonbn.batch_norm_forward(*args)
        ctx.save_for_backward(input, weight, save_mean, save_invstd)
        ctx.training = training
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad_out):
        input, weight, save_mean, save_invstd = ctx.saved_tensors
        mask = [bool(m) for m in ctx.needs_input_grad[:3]]
        grads = (None, None, None)
        if any(mask):
            args = (grad_out, input, weight, save_mean, save_invstd, ctx.training, mask, ctx.bias_dtype)
            # create_graph=True (grad mode on) takes the op, whose autograd refuses double backward
            direct = not torch.is_grad_enabled() and _plain_eager(grad_out, input, weight)
            dx, dw, db = (_backward if direct else torch.ops.tritonbn.batch_norm_backward)(*args)
            grads = tuple(g if m else None for g, m in zip((dx, dw, db), mask))
        return (*grads, None, None, None, None, None, None)
