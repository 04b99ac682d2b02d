"""The fast path of a plain eager call whose launch plan is cached.

A repeated call (the same shapes, strides, dtypes, devices, flags and config
source as an earlier one that passed every check) finds its launch plan
(tritonbn.plan_cache.find_forward: one guard check, else its full key) and
launches it: no argument checks, no view analysis, no config choice. Where
a gradient is needed it runs under PlannedBatchNormFunction, an
autograd.Function of its own: the plan is one of its arguments, y its only
output, and apply is autograd's C++ entry, so the call pays no Python
binding of its arguments. Its backward finds its plan on the forward's (by
grad_out alone) and falls back to tritonbn.ops.BatchNormFunction's
backward in any other context.

Everything else (a key seen for the first time, tracing, dispatch modes,
functorch transforms, tensor subclasses) takes the full path:
tritonbn.functional then calls tritonbn.ops.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd import forward_ad

from . import launch, plan_cache
from .ops import (
    _PLAIN_TYPES, BatchNormFunction, EagerBatchNormFunction, _context, _eager_context, _legacy_batched,
    _plain_eager, _saved, _set_context, mark_updated,
)


class PlannedBatchNormFunction(torch.autograd.Function):
    """BatchNormFunction for plain eager calls whose launch plan is cached
    (planned_forward): the plan is the last argument, y the only output (the
    statistics stay internal: saved, never returned). forward does the work
    of setup_context itself, so autograd.Function.apply does not bind
    arguments with inspect.signature on every call, and apply is autograd's
    own (C++) entry. The backward's plan hangs off the forward's, found by
    grad_out alone (_backward_link). Backward in any other context
    and forward-mode AD are BatchNormFunction's. Never under functorch
    transforms (they need setup_context): planned_forward checks."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum,
                eps, residual, relu, plan):
        y, save_mean, save_invstd = launch.run_forward(plan, input, weight, bias, running_mean, running_var,
                                                       num_batches_tracked, residual)
        if training:
            mark_updated(running_mean, running_var)
        context = plan.autograd
        if context is None:  # the same for every call of this plan, which the Triton kernels run
            context = plan.autograd = _context(training, eps, bias, residual, relu, lambda: True)
        saved = _saved(context, input, weight, save_mean, save_invstd, y, bias)
        ctx.save_for_backward(*saved)
        if forward_ad._current_level >= 0:
            ctx.save_for_forward(*saved)
        ctx.plan = plan
        return y

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled() or not _plain_eager(grad_out) or _legacy_batched(grad_out):
            _set_context(ctx, ctx.plan.autograd)  # for BatchNormFunction's code
            return (*BatchNormFunction.backward(ctx, grad_out, None, None), None)
        # BatchNormFunction.backward's plain eager branch, for what a planned
        # forward saved (plain tensors, non-empty, on the Triton kernels)
        input, weight, save_mean, save_invstd, y, bias = ctx.saved_tensors
        need = ctx.needs_input_grad
        residual_grad = need[9] and y is not None
        link = _backward_link(need, grad_out, input, weight, save_mean, save_invstd, y, bias)
        plan = None if link is None else ctx.plan.backward_plans.get(link)
        if plan:
            dx, dw, db, dr = launch.run_backward(plan, grad_out, input, weight, save_mean, save_invstd, y, bias)
        else:
            training, _, bias_dtype, relu_from_input, _ = ctx.plan.autograd
            args = (grad_out, input, weight, save_mean, save_invstd, training, need[:3], bias_dtype)
            options = dict(output=y, residual_grad=residual_grad, relu_from_input=relu_from_input, bias=bias)
            dx, dw, db, dr = launch.backward(*args, **options)
            if plan is None and link is not None:  # the plan that call kept, or False: it keeps none
                ctx.plan.backward_plans[link] = launch.cached_backward_plan(*args, **options) or False
        if need[9] and y is None:  # without a ReLU the residual's gradient is grad_out itself
            dr = grad_out
        return dx, dw, db, None, None, None, None, None, None, dr, None, None

    @staticmethod
    def jvp(ctx, *tangents):
        _set_context(ctx, ctx.plan.autograd)  # for BatchNormFunction's code
        return EagerBatchNormFunction.jvp(ctx, *tangents)[0]


def _backward_link(need, grad_out, input, weight, save_mean, save_invstd, y, bias) -> tuple | None:
    """What a planned forward's backward plan depends on beyond the forward
    plan: which gradients autograd wants, where the config comes from (None:
    forced, not cached), and grad_out -- autograd gives it y's shape, dtype
    and device, its strides are the caller's -- with every pointer 16-byte
    aligned (else None: the full key). The saved tensors' metadata are the
    forward's: autograd refuses one changed in place since (what it does
    not track, a ``.data`` swap, torch's own backward does not check either).
    A plan stored under it is launch.cached_backward_plan's, or False where
    backward() keeps none (those take the full path without looking again)."""
    source = plan_cache.config_source("backward")
    if source is None or plan_cache.alignment(grad_out, input, weight, save_mean, save_invstd, y, bias):
        return None
    return (need, source, grad_out.shape, grad_out.stride(), grad_out.dtype, grad_out.device)


# autograd's C++ apply, without autograd.Function.apply's Python wrapper
_apply_planned = super(torch.autograd.Function, PlannedBatchNormFunction).apply
_find_forward = plan_cache.find_forward


def planned_forward(input, weight, bias, running_mean, running_var, num_batches_tracked, training: bool,
                    momentum, eps: float, residual, relu: bool) -> Optional[Tensor]:
    """The fast path of a plain eager call (see _plain_eager) whose launch plan
    is cached: y, with the running stats updated as the full path would; None
    where the full path must run (another context, a key seen for the first
    time, anything a check would reject). Autograd is skipped where nothing
    requires a gradient and no forward-mode AD is active."""
    if not _eager_context():  # _plain_eager's context; find_forward checks the tensors' types
        return None
    found = _find_forward("forward" if training else "inference", input, weight, bias, running_mean, running_var,
                          num_batches_tracked, training, momentum, eps, residual, relu, _PLAIN_TYPES)
    if found is None:
        return None
    plan, requires_grad = found
    if (requires_grad and torch.is_grad_enabled()) or forward_ad._current_level >= 0:
        return _apply_planned(input, weight, bias, running_mean, running_var, num_batches_tracked, training,
                              momentum, eps, residual, relu, plan)
    y, _, _ = launch.run_forward(plan, input, weight, bias, running_mean, running_var, num_batches_tracked,
                                 residual, keep_stats=training)
    if training:
        mark_updated(running_mean, running_var)
    return y
