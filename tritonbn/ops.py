"""torch.library custom ops (namespace ``tritonbn``) and the autograd.Function
that ties forward to backward.

``tritonbn::batch_norm_forward`` declares that it mutates running_mean and
running_var, so torch.compile sees the buffer update instead of losing it.
Each op has a fake implementation (shapes, dtypes, strides only), so
torch.compile(fullgraph=True) traces through without a graph break.

Both ops carry the fused epilogue (y = relu(bn(x) + residual)): the forward
takes (residual, relu), the backward what it masks grad_out with (the
forward's output, or relu_from_input: recompute y's sign from x, weight and
bias) and a fourth gradient, the residual's. The backward op's own autograd
is the double backward, in torch ops (tritonbn.derivatives).

In plain eager mode BatchNormFunction calls the ops' implementations directly
(see _plain_eager); tracing, dispatch modes and tensor subclasses get the ops,
and functorch transforms the torch formula of the backward. A repeated plain
eager call whose launch plan is cached skips all of this (tritonbn.planned).

Dispatch: CUDA tensors run the Triton kernels; CPU tensors run them when the
Triton interpreter is on (TRITON_INTERPRET=1 before tritonbn is imported) and
otherwise run PyTorch's own batch_norm (tritonbn.fallback); other devices run
PyTorch's batch_norm too.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from . import derivatives, fallback, launch
from .backend import runs_triton  # whether the Triton kernels handle a tensor (warns once when not)
from .checks import check_inputs, check_mode, check_residual


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
    residual: Optional[Tensor],
    relu: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, save_mean, save_invstd). Training: batch statistics, running stats
    updated in place when given (momentum=None: cumulative average over
    num_batches_tracked). Eval: running statistics; save_mean / save_invstd
    are then running_mean and 1 / sqrt(running_var + eps). Fused tail:
    y = relu(bn(x) + residual), each part optional."""
    check_inputs(input, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum)
    check_residual(input, residual)
    if input.numel() == 0:  # empty batch: empty output, running stats untouched
        return (torch.empty_like(input, memory_format=launch.output_format(input)),
                *_empty_stats(input))
    # batch_norm checks these before the op; checked here too since the launch
    # plan cached below lets a repeated call skip every check
    check_mode(input, training, eps)
    impl = launch if runs_triton(input) else fallback
    if training:
        return impl.forward_training(input, weight, bias, running_mean, running_var,
                                     num_batches_tracked, momentum, eps, residual=residual, relu=relu)
    return impl.forward_inference(input, weight, bias, running_mean, running_var, eps,
                                  residual=residual, relu=relu)


batch_norm_forward = torch.library.custom_op(
    "tritonbn::batch_norm_forward", _forward, mutates_args=("running_mean", "running_var"))


@batch_norm_forward.register_fake
def _(input, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum, eps,
      residual, relu):
    check_inputs(input, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum)
    check_residual(input, residual)
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
    eps: float,
    output: Optional[Tensor],
    relu_from_input: bool,
    bias: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_input, grad_weight, grad_bias, grad_residual), asked for by the four
    entries of output_mask; one not asked for, or with no parameter to go to,
    comes back as an empty tensor. After a fused ReLU grad_out is masked where
    the forward's y was not positive: ``output`` is that y (else None), or
    relu_from_input (training, no residual) recomputes y's sign from input,
    the statistics, weight and ``bias``, which is read only then. eps is not
    needed here; the double backward rebuilds invstd from x with it."""
    grads = _backward_grads(grad_out, input, weight, save_mean, save_invstd, training, output_mask,
                            bias_dtype, output, relu_from_input, bias)
    placeholder = input.new_empty((0,))
    return tuple(placeholder.clone() if t is None else t for t in grads)


def _backward_grads(grad_out, input, weight, save_mean, save_invstd, training, output_mask, bias_dtype,
                    output, relu_from_input, bias) -> tuple[Optional[Tensor], ...]:
    """_backward's gradients, None where not asked for or without a parameter."""
    need_dx, need_dw, need_db, need_dr = output_mask
    if input.numel() == 0:
        empty = functools.partial(torch.empty_like, input, memory_format=launch.output_format(input))
        return (empty() if need_dx else None,
                weight.new_zeros(weight.shape) if need_dw and weight is not None else None,
                input.new_zeros((input.shape[1],), dtype=bias_dtype) if need_db and bias_dtype else None,
                empty() if need_dr else None)
    impl = launch if runs_triton(input) else fallback
    return impl.backward(grad_out, input, weight, save_mean, save_invstd, training,
                         (need_dx, need_dw, need_db), bias_dtype, output=output, residual_grad=need_dr,
                         relu_from_input=relu_from_input, bias=bias)


batch_norm_backward = torch.library.custom_op("tritonbn::batch_norm_backward", _backward,
                                             mutates_args=())


@batch_norm_backward.register_fake
def _(grad_out, input, weight, save_mean, save_invstd, training, output_mask, bias_dtype, eps, output,
      relu_from_input, bias):
    need_dx, need_dw, need_db, need_dr = output_mask
    like_input = functools.partial(torch.empty_like, input, memory_format=launch.output_format(input))
    dx = like_input() if need_dx else input.new_empty((0,))
    dw = weight.new_empty(weight.shape) if need_dw and weight is not None else input.new_empty((0,))
    db = input.new_empty((input.shape[1],), dtype=bias_dtype) if need_db and bias_dtype is not None \
        else input.new_empty((0,))
    return dx, dw, db, like_input() if need_dr else input.new_empty((0,))


def _formula_grads(grad_out, input, weight, save_mean, save_invstd, training, output_mask, bias_dtype, eps,
                   output, relu_from_input, bias):
    """_backward's results (None where not asked) from derivatives.backward_formula."""
    if input.numel() == 0:
        return _backward_grads(grad_out, input, weight, save_mean, save_invstd, training, output_mask,
                               bias_dtype, output, relu_from_input, bias)
    mask = derivatives.relu_mask(input, weight, bias, save_mean, save_invstd, output, relu_from_input)
    dx, dw, db, dr = derivatives.backward_formula(grad_out, input, weight, save_mean, save_invstd,
                                                  training, eps, mask)
    return (dx.to(input.dtype) if output_mask[0] else None,
            dw.to(weight.dtype) if output_mask[1] and weight is not None else None,
            db.to(bias_dtype) if output_mask[2] and bias_dtype is not None else None,
            dr.to(input.dtype) if output_mask[3] else None)


def _setup_double_backward(ctx, inputs, output):
    (grad_out, input, weight, save_mean, save_invstd, training, output_mask, _, eps, y,
     relu_from_input, bias) = inputs
    ctx.save_for_backward(grad_out, input, weight, save_mean, save_invstd, y, bias)
    ctx.training, ctx.output_mask, ctx.eps, ctx.relu_from_input = training, output_mask, eps, relu_from_input


def _double_backward(ctx, *grad_grads):
    """Gradients of (grad_input, grad_weight, grad_bias, grad_residual) with
    respect to grad_out, input and weight: a vector-Jacobian product of
    derivatives.backward_formula. torch.func.vjp takes partial derivatives
    (grad_out depends on input through the loss, and the outer autograd adds
    that path), and what it returns is differentiable, so a third derivative
    works too. A fused ReLU's mask is piecewise constant: no gradient to y."""
    grad_out, input, weight, save_mean, save_invstd, y, bias = ctx.saved_tensors
    primals = (grad_out, input, weight)
    wanted = [i for i, (t, need) in enumerate(zip(primals, ctx.needs_input_grad[:3]))
              if need and t is not None]
    grads = [None, None, None]
    if input.numel() == 0:  # empty batch: nothing flows (the formula would divide by m = 0)
        grads = [torch.zeros_like(primals[i]) if i in wanted else None for i in range(3)]
    elif wanted:
        mask = derivatives.relu_mask(input.detach(), weight, bias, save_mean, save_invstd, y,
                                     ctx.relu_from_input)

        def formula(*differentiated):
            args = list(primals)
            for i, t in zip(wanted, differentiated):
                args[i] = t
            return derivatives.backward_formula(*args, save_mean, save_invstd, ctx.training, ctx.eps, mask)

        outputs, vjp = torch.func.vjp(formula, *(primals[i] for i in wanted))
        cotangents = tuple(
            grad.to(out.dtype) if asked and grad is not None and grad.numel() else torch.zeros_like(out)
            for out, grad, asked in zip(outputs, grad_grads, ctx.output_mask))
        for i, grad in zip(wanted, vjp(cotangents)):
            grads[i] = grad
    return (*grads, None, None, None, None, None, None, None, None, None)


torch.library.register_autograd("tritonbn::batch_norm_backward", _double_backward,
                                setup_context=_setup_double_backward)


_PLAIN_TYPES = frozenset((torch.Tensor, torch.nn.Parameter, type(None)))  # an absent tensor is None


_is_tracing = torch._C._is_tracing
_dispatch_modes = torch._C._len_torch_dispatch_stack  # how many modes: what _get_current_dispatch_mode reads
_functorch_active = torch._C._are_functorch_transforms_active


def _eager_context() -> bool:
    """No torch.compile / export / jit tracing, no dispatch mode
    (FakeTensorMode, FlopCounterMode, ...), no functorch transform: what
    _plain_eager asks of the context, without its tensors."""
    return not (torch.compiler.is_compiling() or _is_tracing() or _dispatch_modes() or _functorch_active())


def _plain_eager(*tensors: Tensor | None) -> bool:
    """Plain eager execution: no torch.compile / export / jit tracing, no
    dispatch mode (FakeTensorMode, FlopCounterMode, ...), no functorch
    transform, no tensor subclass. There the ops' Python implementations are
    called directly, skipping ~50 us of custom-op dispatch per call; anywhere
    else the registered ops run, so tracers see them."""
    if not _eager_context():
        return False
    for t in tensors:  # a loop, not all(genexpr): this runs on every call
        if type(t) not in _PLAIN_TYPES:
            return False
    return True


def mark_updated(*tensors: Tensor | None) -> None:
    """Bump the version counters of buffers written in place, as the op's
    declared mutation does, so autograd still detects a stale saved tensor
    (an inference tensor has no counter: torch leaves it alone)."""
    torch._C._increment_version([t for t in tensors if t is not None])


_is_legacy_batched = getattr(torch._C._functorch, "is_legacy_batchedtensor", lambda t: False)


def _legacy_batched(t: Tensor) -> bool:
    """A tensor of autograd's own vmap (torch.autograd.grad(is_grads_batched=True),
    gradcheck's check_batched_grad): a plain Tensor to type() and to functorch,
    but with no storage, so no kernel may read it."""
    return _is_legacy_batched(t)


def _context(training: bool, eps: float, bias, residual, relu: bool, on_kernels) -> tuple:
    """(training, eps, bias_dtype, relu_from_input, saves_output): what a
    backward needs besides its saved tensors. on_kernels(): whether the
    Triton kernels ran the forward, asked only where it matters.

    After a fused ReLU the backward masks grad_out where y was not positive.
    In training without a residual the Triton kernels recompute that sign
    from x (read anyway), weight and bias with the forward's own arithmetic:
    bias is saved and y is not, so the backward reads no more than an
    unfused one. Otherwise (eval, a residual, or torch's batch_norm on the
    fallback path, whose rounding may differ) y is saved and read."""
    relu_from_input = relu and training and residual is None and on_kernels()
    return training, eps, None if bias is None else bias.dtype, relu_from_input, relu and not relu_from_input


def _saved(context: tuple, input, weight, save_mean, save_invstd, y, bias) -> tuple:
    """The tensors a forward saves for its backward (and forward-mode AD)."""
    return (input, weight, save_mean, save_invstd, y if context[4] else None, bias if context[3] else None)


def _set_context(ctx, context: tuple) -> None:
    ctx.training, ctx.eps, ctx.bias_dtype, ctx.relu_from_input, _ = context


def _save(ctx, input, weight, bias, training: bool, eps: float, residual, relu: bool, output,
          for_forward: bool) -> None:
    """What the backward (and, for_forward, forward-mode AD) needs from a
    forward whose output is (y, save_mean, save_invstd)."""
    y, save_mean, save_invstd = output
    context = _context(training, eps, bias, residual, relu, lambda: runs_triton(input))
    saved = _saved(context, input, weight, save_mean, save_invstd, y, bias)
    ctx.save_for_backward(*saved)
    if for_forward:
        ctx.save_for_forward(*saved)
    _set_context(ctx, context)


class BatchNormFunction(torch.autograd.Function):
    """Forward and backward ops tied for autograd. apply returns (y, save_mean,
    save_invstd), the statistics not differentiable; backward saves only (x,
    weight, save_mean, save_invstd) and, after a fused ReLU, what its mask
    comes from (see setup_context), and routes gradients to what requires
    them. forward and setup_context are separate so torch.func.grad / jacrev
    work. What torch.compile traces; eager calls EagerBatchNormFunction."""

    @staticmethod
    def forward(input, weight, bias, running_mean, running_var, num_batches_tracked,
                training, momentum, eps, residual, relu):
        args = (input, weight, bias, running_mean, running_var, num_batches_tracked,
                training, momentum, eps, residual, relu)
        if _plain_eager(input, weight, bias, running_mean, running_var, num_batches_tracked, residual):
            outputs = _forward(*args)
            if training:
                mark_updated(running_mean, running_var)
            return outputs
        return torch.ops.tritonbn.batch_norm_forward(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, *_, training, _, eps, residual, relu = inputs
        ctx.mark_non_differentiable(output[1], output[2])
        _save(ctx, input, weight, bias, training, eps, residual, relu, output, for_forward=True)

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_invstd):
        input, weight, save_mean, save_invstd, y, bias = ctx.saved_tensors
        need_residual = ctx.needs_input_grad[9]
        # without a ReLU the residual's gradient is grad_out itself: no kernel writes it
        mask = [bool(m) for m in ctx.needs_input_grad[:3]] + [need_residual and y is not None]
        grads = [None, None, None, None]
        if any(mask):
            args = (grad_out, input, weight, save_mean, save_invstd, ctx.training, mask, ctx.bias_dtype,
                    ctx.eps, y, ctx.relu_from_input, bias)
            if torch._C._are_functorch_transforms_active():
                # torch.func.grad / jacrev: the custom op's autograd does not support
                # functorch, so differentiate the formula in torch ops
                found = _formula_grads(*args)
            elif not torch.is_grad_enabled() and _plain_eager(grad_out, input, weight, y, bias) \
                    and not _legacy_batched(grad_out):
                found = _backward_grads(*args[:8], *args[9:])
            else:  # create_graph=True, tracing, or batched grads (the op's batching fallback
                # runs it once per slice): the op, whose autograd is the double backward
                found = torch.ops.tritonbn.batch_norm_backward(*args)
            grads = [g if m else None for g, m in zip(found, mask)]
        if need_residual and y is None:
            grads[3] = grad_out
        dx, dw, db, dr = grads
        return dx, dw, db, None, None, None, None, None, None, dr, None


class EagerBatchNormFunction(BatchNormFunction):
    """BatchNormFunction plus the rules of torch.func's vmap and forward-mode AD
    (jvp). Dynamo cannot trace an autograd.Function that has them, so
    torch.compile gets BatchNormFunction instead."""

    @staticmethod
    def vmap(info, in_dims, input, weight, bias, running_mean, running_var, num_batches_tracked,
             training, momentum, eps, residual, relu):
        """torch.func.vmap (jacfwd, hessian, model ensembles): each slice is its own
        batch norm, one call per slice. Running stats updated in training must be
        batched along with the input, as in torch."""
        tensors = (input, weight, bias, running_mean, running_var, num_batches_tracked, residual)
        dims = (*in_dims[:6], in_dims[9])
        running_batched = dims[3] is not None and dims[4] is not None
        if training and running_mean is not None and not running_batched and dims[0] is not None:
            raise RuntimeError(
                "batch_norm under vmap got a batched input while running_mean or running_var, "
                "which are updated in place, are not batched; batch them too, or use "
                "track_running_stats=False if eval mode is not needed")
        outputs = []
        for i in range(info.batch_size):
            args = [t if t is None or d is None else t.select(d, i) for t, d in zip(tensors, dims)]
            if training and i and not running_batched:
                args[3:6] = None, None, None  # unbatched running stats are updated once
            outputs.append(EagerBatchNormFunction.apply(*args[:6], training, momentum, eps, args[6], relu))
        return tuple(torch.stack(results) for results in zip(*outputs)), (0, 0, 0)

    @staticmethod
    def jvp(ctx, input_t, weight_t, bias_t, *other_tangents):
        """Forward-mode derivative of y (torch.func.jvp, jacfwd, hessian). Tangents
        on the running statistics are refused before the forward, in eval
        (tritonbn.checks.check_running_stats_tangents)."""
        input, weight, save_mean, save_invstd, y, bias = ctx.saved_tensors
        mask = derivatives.relu_mask(input, weight, bias, save_mean, save_invstd, y, ctx.relu_from_input)
        y_t = derivatives.output_tangent(input, weight, save_mean, save_invstd, ctx.training,
                                         input_t, weight_t, bias_t, other_tangents[6], mask)
        return y_t.to(input.dtype), None, None
