"""Kernel launchers: canonical view, plan, allocate, launch.

Each public launcher reads its input through one canonical (N, C, S) view
(tritonbn.views; an input no view fits is copied once into the output's
format, and so is a gradient whose layout differs from the input's), builds
the call's launch plan (tritonbn.plans: view, config, grids, arguments),
choosing or tuning the config, and runs it: ``run_forward`` /
``run_backward`` allocate the outputs, in the memory format PyTorch's
batch_norm gives them, and launch. The plan cache wraps each launcher
(``cached``): a call whose key it holds runs the stored plan on its tensors
as given; a plan is stored where the call used its tensors as they are.

These functions assume validated arguments (tritonbn.checks runs before
them) and a non-empty input.
"""
from __future__ import annotations

import functools

import torch

from . import counters, plan_cache, plans, views
from .launcher import launch
from .autotune import LaunchConfig
from .plans import BackwardPlan, ForwardPlan
from .views import acc_dtype, conform, dense, output_format

__all__ = ["acc_dtype", "backward", "forward_inference", "forward_training", "output_format",
           "run_backward", "run_forward", "write_back"]


def cached(key, run):
    """The plan cache around a launcher (tritonbn.plan_cache). The launcher
    ``launcher(*args, config=None, **options)`` reads its input through a
    canonical view, builds its plan (choosing or tuning the config) and
    launches it; it returns ``(outputs, plan, reusable)``, reusable where it
    ran on every tensor as given (no copy) and outside CUDA-graph capture.
    Wrapped, a call looks ``key(*args, **options)`` up first (no key with a
    forced config) and, found, launches ``run(plan, *args, **options)``;
    otherwise the launcher runs and its plan is stored under the key where
    reusable."""
    def wrap(launcher):
        @functools.wraps(launcher)
        def call(*args, config: LaunchConfig | None = None, **options):
            found_key = None if config is not None else key(*args, **options)
            plan = found_key and plan_cache.lookup(found_key)
            if plan:
                return run(plan, *args, **options)
            outputs, plan, reusable = launcher(*args, config=config, **options)
            if found_key is not None and reusable:
                plan_cache.remember(found_key, plan)
            return outputs
        return call
    return wrap


def _reusable(x: torch.Tensor, *pairs) -> bool:
    """Whether a plan may be kept for later calls: every tensor was used as
    given (no copy: each pair is (given, used)) and no CUDA graph is being
    captured (the tuner does not choose for good there)."""
    if any(given is not used for given, used in pairs):
        return False
    return not (x.is_cuda and torch.cuda.is_current_stream_capturing())


def _scratch_running_stats(running_mean, running_var):
    """Copies a tuning candidate updates, never the caller's running stats."""
    return [None if t is None else t.clone(memory_format=torch.contiguous_format)
            for t in (running_mean, running_var)]


def _training_key(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, *,
                  residual=None, relu=False):
    return plan_cache.forward_key("forward", x, weight, bias, running_mean, running_var, num_batches_tracked,
                                  True, momentum, eps, residual, relu)


def _run_training(plan, x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, *,
                  residual=None, relu=False):
    return run_forward(plan, x, weight, bias, running_mean, running_var, num_batches_tracked, residual)


@cached(_training_key, _run_training)
def forward_training(x, weight, bias, running_mean, running_var, num_batches_tracked,
                     momentum: float | None, eps: float, *, config: LaunchConfig | None = None,
                     residual: torch.Tensor | None = None, relu: bool = False):
    """Batch statistics, normalize, update running stats in place.

    momentum=None means a cumulative average: momentum = 1 / num_batches_tracked,
    read on the device. Fused tail: y = relu(bn(x) + residual) with either part
    optional. Returns (y, save_mean, save_invstd).
    """
    given = (x, weight, bias, running_mean, running_var, residual)
    x, view, fmt = views.canonical(x)
    weight, bias = dense(weight), dense(bias)
    running = [dense(t) for t in (running_mean, running_var)]
    residual, r_strides = (None, (0, 0, 0)) if residual is None else conform(residual, view, fmt)
    build = _memoized(functools.partial(
        plans.forward_plan, x, view, fmt, training=True, weight=weight, bias=bias, update=running_mean is not None,
        momentum=momentum, eps=eps, residual=residual, r_strides=r_strides, relu=relu))
    scratch = functools.cache(lambda: _scratch_running_stats(running_mean, running_var))
    cfg = plans.choose("forward", view, x, config, lambda c: run_forward(
        build(c), x, weight, bias, *scratch(), num_batches_tracked, residual))
    plan = build(cfg)
    outputs = run_forward(plan, x, weight, bias, *running, num_batches_tracked, residual)
    write_back((running_mean, running_var), running)
    return outputs, plan, _reusable(x, *zip(given, (x, weight, bias, *running, residual)))


def _inference_key(x, weight, bias, running_mean, running_var, eps, *, residual=None, relu=False,
                   keep_stats=True):
    return plan_cache.forward_key("inference", x, weight, bias, running_mean, running_var, None, False, None, eps,
                                  residual, relu)


def _run_inference(plan, x, weight, bias, running_mean, running_var, eps, *, residual=None, relu=False,
                   keep_stats=True):
    return run_forward(plan, x, weight, bias, running_mean, running_var, None, residual, keep_stats=keep_stats)


@cached(_inference_key, _run_inference)
def forward_inference(x, weight, bias, running_mean, running_var, eps: float, *,
                      config: LaunchConfig | None = None, residual: torch.Tensor | None = None,
                      relu: bool = False, keep_stats: bool = True):
    """y = x * scale + shift from the running stats (then + residual, ReLU).
    Returns (y, mean, invstd) with mean = running_mean and invstd =
    1 / sqrt(running_var + eps) in the statistics dtype, for the eval-mode
    backward; keep_stats=False: (y, None, None)."""
    given = (x, weight, bias, running_mean, running_var, residual)
    x, view, fmt = views.canonical(x)
    weight, bias, running_mean, running_var = (dense(t) for t in (weight, bias, running_mean, running_var))
    residual, r_strides = (None, (0, 0, 0)) if residual is None else conform(residual, view, fmt)
    build = _memoized(functools.partial(
        plans.forward_plan, x, view, fmt, training=False, weight=weight, bias=bias, update=False, momentum=None,
        eps=eps, residual=residual, r_strides=r_strides, relu=relu))
    tensors = (x, weight, bias, running_mean, running_var, None, residual)
    cfg = plans.choose("inference", view, x, config, lambda c: run_forward(build(c), *tensors))
    plan = build(cfg)
    outputs = run_forward(plan, *tensors, keep_stats=keep_stats)
    return outputs, plan, _reusable(x, *zip(given, (x, weight, bias, running_mean, running_var, residual)))


def run_forward(p: ForwardPlan, x, weight, bias, running_mean, running_var, num_batches_tracked,
                residual, partials=None, keep_stats: bool = True):
    """Allocate (y, save_mean, save_invstd) and launch plan p. partials given
    (SyncBatchNorm, split regime): the statistics are merged from them.
    keep_stats=False (inference that needs no gradient): (y, None, None),
    neither allocated nor written."""
    y = _output_like(p, x)
    r = x if residual is None else residual
    if not p.training:
        kernel = "bn_inference_flat_kernel" if p.regime == "flat" else "bn_inference_kernel"
        if not keep_stats:  # the most frequent call of all: launch() inlined
            (p.launches.get("inference, no stats") or launch(p, "inference, no stats", kernel, p.grid,
                                                               p.args_without_stats))(
                x, y, r, x if weight is None else weight, x if bias is None else bias, running_mean,
                running_var, x, x)
            return y, None, None
    device = x.device
    save_mean = p.stats_like.new_empty(p.view.C)
    save_invstd = p.stats_like.new_empty(p.view.C)
    dummy = save_mean
    w = dummy if weight is None else weight
    b = dummy if bias is None else bias
    if not p.training:
        launch(p, "inference", kernel, p.grid, p.args)(x, y, r, w, b, running_mean, running_var, save_mean,
                                                       save_invstd)
        return y, save_mean, save_invstd
    rm = dummy if running_mean is None else running_mean
    rv = dummy if running_var is None else running_var
    nbt = dummy if num_batches_tracked is None else num_batches_tracked
    if p.regime == "resident":
        launch(p, "resident", "bn_fwd_resident_kernel", p.grid, p.args)(
            x, y, r, w, b, rm, rv, nbt, save_mean, save_invstd)
        return y, save_mean, save_invstd
    if p.regime == "cooperative":
        partials = torch.empty((3, p.num_splits, p.view.C), dtype=p.stats_dtype, device=device)
        flags = counters.zeroed(device, p.num_flags)
        for phase in p.phases:
            launch(p, f"cooperative {phase}", "bn_fwd_coop_kernel", p.grid, p.args, PHASE=phase)(
                x, y, r, w, b, rm, rv, nbt, save_mean, save_invstd, partials, flags)
        return y, save_mean, save_invstd
    if partials is None:  # statistics, merged by each channel block's last program
        partials = torch.empty((3, p.num_splits, p.view.C), dtype=p.stats_dtype, device=device)
        launch(p, "stats", "bn_fwd_stats_kernel", p.grid, p.stats_args)(
            x, partials, save_mean, save_invstd, rm, rv, nbt, counters.zeroed(device, p.grid[0]))
    else:  # partials made elsewhere (SyncBatchNorm)
        launch(p, "merge", "bn_fwd_merge_kernel", p.merge_grid, p.merge_args)(
            partials, partials, save_mean, save_invstd, rm, rv, nbt)
    launch(p, "normalize", "bn_fwd_normalize_kernel", p.grid, p.args)(x, y, r, w, b, save_mean, save_invstd)
    return y, save_mean, save_invstd


def write_back(buffers, dense_copies) -> None:
    """Strided running stats are updated in dense copies (views.dense): copy those back."""
    for buffer, updated in zip(buffers, dense_copies):
        if updated is not buffer:
            buffer.copy_(updated)


def backward(grad_out, x, weight, save_mean, save_invstd, training: bool,
             output_mask: tuple[bool, bool, bool], bias_dtype: torch.dtype | None = None, *,
             config: LaunchConfig | None = None, output: torch.Tensor | None = None,
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
    mask = _backward_mask(weight, output_mask, bias_dtype)
    if not (any(mask) or residual_grad):
        return None, None, None, None
    bias = bias if relu_from_input else None  # read for the recomputed mask only
    return _backward(grad_out, x, weight, save_mean, save_invstd, training, mask, bias_dtype, config=config,
                     output=output, residual_grad=residual_grad, relu_from_input=relu_from_input, bias=bias)


def _backward_key(grad_out, x, weight, save_mean, save_invstd, training, mask, bias_dtype, *, output,
                  residual_grad, relu_from_input, bias):
    return plan_cache.backward_key(grad_out, x, weight, save_mean, save_invstd, training, mask, bias_dtype,
                                   output, residual_grad, relu_from_input, bias)


def _run_backward(plan, grad_out, x, weight, save_mean, save_invstd, training, mask, bias_dtype, *, output,
                  residual_grad, relu_from_input, bias):
    return run_backward(plan, grad_out, x, weight, save_mean, save_invstd, output, bias)


@cached(_backward_key, _run_backward)
def _backward(grad_out, x, weight, save_mean, save_invstd, training: bool, mask, bias_dtype, *, config,
              output, residual_grad: bool, relu_from_input: bool, bias):
    """backward() past its argument checks: mask holds only gradients that
    have somewhere to go, bias is given only for a recomputed ReLU mask."""
    given = (grad_out, x, weight, save_mean, save_invstd, output, bias)
    x, view, fmt = views.canonical(x)
    grad_out, _ = conform(grad_out, view, fmt)
    output = None if output is None else conform(output, view, fmt)[0]
    weight, save_mean, save_invstd, bias = (dense(t) for t in (weight, save_mean, save_invstd, bias))
    build = _memoized(functools.partial(
        plans.backward_plan, grad_out, x, view, fmt, training=training, weight=weight, output_mask=mask,
        bias_dtype=bias_dtype, output=output, residual_grad=residual_grad, relu_from_input=relu_from_input,
        has_bias=bias is not None))
    tensors = (grad_out, x, weight, save_mean, save_invstd, output, bias)
    cfg = plans.choose("backward", view, x, config, lambda c: run_backward(build(c), *tensors))
    plan = build(cfg)
    return run_backward(plan, *tensors), plan, _reusable(x, *zip(given, tensors))


def _memoized(build):
    """build(config) -> plan, each config's plan built once: the tuner's trials
    (first a check, then timed repetitions) time the plan's launches, not its
    construction, and the call itself reuses the winner's plan."""
    return functools.lru_cache(maxsize=None)(build)


def _backward_mask(weight, output_mask, bias_dtype) -> tuple[bool, bool, bool]:
    """output_mask without the gradients that have nowhere to go (no weight, no bias)."""
    need_dx, need_dw, need_db = output_mask
    return need_dx, need_dw and weight is not None, need_db and bias_dtype is not None


def cached_backward_plan(grad_out, x, weight, save_mean, save_invstd, training: bool,
                         output_mask: tuple[bool, bool, bool], bias_dtype: torch.dtype | None, *,
                         output: torch.Tensor | None, residual_grad: bool, relu_from_input: bool,
                         bias: torch.Tensor | None):
    """The plan backward() keeps for these arguments (after a call with them),
    or None where it keeps none."""
    key = plan_cache.backward_key(grad_out, x, weight, save_mean, save_invstd, training,
                                  _backward_mask(weight, output_mask, bias_dtype), bias_dtype, output,
                                  residual_grad, relu_from_input, bias if relu_from_input else None)
    return key and plan_cache.lookup(key)


def _output_like(p, x: torch.Tensor) -> torch.Tensor:
    """A new tensor of x's dtype and device with plan p's output size and strides."""
    if p.like_input:
        return torch.empty_like(x)
    return torch.empty_strided(p.size, p.stride, dtype=x.dtype, device=x.device)


def run_backward(p: BackwardPlan, grad_out, x, weight, save_mean, save_invstd, output, bias, *,
                 sums=None, partials=None):
    """Allocate the gradients and launch plan p. SyncBatchNorm's uses (split
    regime): sums [2, C] given: write (sum g, sum g * xhat) there as dbias /
    dweight; partials [2, 1, C] given: dx from those (already divided) sums
    instead of x's own."""
    device = x.device
    dx = _output_like(p, x) if p.need_dx else None
    dr = _output_like(p, x) if p.residual_grad else None
    if sums is not None:
        db, dw = sums[0], sums[1]
    else:
        dw = None if p.dweight_like is None else p.dweight_like.new_empty(p.view.C)
        db = None if p.dbias_like is None else p.dbias_like.new_empty(p.view.C)
    dummy = save_mean
    dx_ = dx if dx is not None else (dr if dr is not None else x)
    y = x if output is None else output
    w = dummy if weight is None else weight
    b = bias if p.reads_bias else dummy
    dw_ = dummy if dw is None else dw
    db_ = dummy if db is None else db
    dr_ = dx_ if dr is None else dr
    if p.regime == "resident":
        launch(p, "resident", "bn_bwd_resident_kernel", p.grid, p.args)(
            x, grad_out, dx_, y, dr_, w, b, save_mean, save_invstd, dw_, db_)
        return dx, dw, db, dr
    if p.regime == "cooperative":
        C = p.view.C
        scratch = torch.empty(2 * (p.num_splits + 1) * C, dtype=p.stats_dtype, device=device)
        flags = counters.zeroed(device, p.num_flags)
        for phase in p.phases:
            launch(p, f"cooperative {phase}", "bn_bwd_coop_kernel", p.grid, p.args, PHASE=phase)(
                x, grad_out, dx_, y, dr_, w, b, save_mean, save_invstd, dw_, db_,
                scratch[:2 * p.num_splits * C], scratch[2 * p.num_splits * C:], flags)
        return dx, dw, db, dr
    if partials is None and p.has_sums:
        partials = torch.empty((2, p.num_splits, p.view.C), dtype=p.stats_dtype, device=device)
        launch(p, "sums", "bn_bwd_sums_kernel", p.grid, p.sums_args)(
            x, grad_out, y, w, b, save_mean, save_invstd, partials, dw_, db_, counters.zeroed(device, p.grid[0]))
    if dx is not None or dr is not None:
        launch(p, "dx", "bn_bwd_dx_kernel", p.grid, p.args)(
            x, grad_out, dx_, y, dr_, dummy if partials is None else partials, w, b, save_mean, save_invstd)
    return dx, dw, db, dr
