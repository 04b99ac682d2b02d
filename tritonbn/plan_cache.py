"""The launch-plan cache: call keys, the store, and the guarded index that a
repeated call reads first.

A call's key holds everything its launches and its argument checks depend on:
shapes, strides, dtypes and devices of every tensor (None for an absent one),
every pointer's 16-byte alignment, the flags (training, fused ReLU, the
backward's output mask), momentum and eps, and where its launch settings come
from (the tuner in use; a forced config is never cached). A plan
(tritonbn.plans) follows from the key alone, so a call that finds one only
allocates and launches.

Checks stay complete: a plan is stored only for a call that passed every
check (tritonbn.checks), and a call whose key differs in anything a check
reads (a wrong channel count, device or dtype, one value per channel in
training, eps) misses the cache and is checked in full.

Building a key reads about 25 tensor attributes in Python (2.3 us on this
repository's CPU machine). A repeated plain eager forward (find_forward)
reads fewer: its scalars, which tensors are absent, the pointers' alignment
and the input's shape pick a short list of guarded plans, and one C++ call
(torch's TensorGuards, torch._C._dynamo.guards) compares every tensor's
type, dispatch keys, dtype, device, requires_grad, sizes and strides with
those of a call that found the plan by its full key. The guards are
stricter than the key (type and requires_grad are in them): a call they
reject looks its full key up, and a plan found so gets a guard for that
call too. Where TensorGuards is missing or behaves otherwise, every call
uses its full key. ``python -m bench --host`` times the repeated calls.
"""
from __future__ import annotations

import torch

from . import autotune


def _tensor_guards():
    """torch's TensorGuards where it behaves as find_forward relies on (it
    admits the tensors it was made with, rejects another dtype), else None:
    full keys only."""
    try:
        from torch._C._dynamo.guards import TensorGuards
        a, b = torch.empty(2), torch.empty(2)
        guard = TensorGuards(a, b, dynamic_dims_sizes=None, dynamic_dims_strides=None)
        if guard.check(a, b) and not guard.check(a, b.double()):
            return TensorGuards
    except Exception:  # pragma: no cover - a torch whose private API moved
        pass
    return None


_TensorGuards = _tensor_guards()

# Distinct keys kept; past that the cache starts over (a process that sees
# this many shapes is tracing or sweeping, not training).
MAX_PLANS = 4096
# Guards kept per guarded-index entry (the variants of one call that differ
# only in what the index does not hold: strides, dtypes, types, requires_grad).
MAX_GUARDS = 8

_plans: dict[tuple, object] = {}
_guarded: dict[tuple, list] = {}  # find_forward's index: entry -> [(TensorGuards, (plan, requires_grad))]
# What a guard compares in an absent tensor's slot: one tensor per slot, as
# TensorGuards rejects arguments that alias each other.
_ABSENT = tuple(torch.empty(0) for _ in range(6))


def lookup(key: tuple):
    return _plans.get(key)


def remember(key: tuple, plan) -> None:
    if len(_plans) >= MAX_PLANS:
        clear()
    _plans[key] = plan


def clear() -> None:
    """Forget every plan (the next call of each key builds its plan again)."""
    _plans.clear()
    _guarded.clear()


def alignment(*tensors) -> int | tuple:
    """0 where every given pointer is 16-byte aligned (the common case: one
    OR of the addresses), else each one's address mod 16 (None: absent)."""
    bits = 0
    for t in tensors:
        if t is not None:
            bits |= t.data_ptr()
    if not bits & 15:
        return 0
    return tuple(None if t is None else t.data_ptr() % 16 for t in tensors)


def config_source(op: str):
    """Where the config of `op` comes from: the tuner in use (its identity:
    use_tuner swaps it), or None when a config is forced with override (such
    plans are not cached). Reads the autotune module's state directly."""
    forced = autotune._forced.get()
    if forced is not None and op in forced:
        return None
    return autotune._tuner or autotune.get_tuner()


# The functions below run on every call: attribute reads inlined, flat tuples
# (an absent tensor is one None, a present one its four entries: the tuple
# still tells every combination apart).

def find_forward(op: str, input, weight, bias, running_mean, running_var, num_batches_tracked, training: bool,
                 momentum, eps, residual, relu: bool, plain_types):
    """(plan, requires_grad) for a plain eager forward call of op ("forward"
    or "inference") whose plan is cached, else None: through the guarded
    index, else by the full key (forward_key), whose plan then gets a guard
    for this call. requires_grad: whether input, weight, bias or residual
    requires a gradient (a guard compares every tensor's requires_grad, so
    it holds for every call the guard admits). plain_types: the tensor
    types a plan may be found for by its full key (tensor subclasses take
    the full path); a guard admits only the types it was made with."""
    forced = autotune._forced.get()  # config_source(op), inlined
    if forced is not None and op in forced:
        return None
    source = autotune._tuner or autotune.get_tuner()
    tracked = num_batches_tracked if training else None
    if tracked is None and num_batches_tracked is not None and type(num_batches_tracked) not in plain_types:
        return None  # eval ignores it, but a tensor subclass still sees the op
    try:  # alignment(), inlined for the common case
        bits = input.data_ptr()
        for t in (weight, bias, running_mean, running_var, tracked, residual):
            if t is not None:
                bits |= t.data_ptr()
    except (AttributeError, TypeError):  # not a tensor: the full path names the wrong argument
        return None
    aligned = 0 if not bits & 15 else alignment(input, weight, bias, running_mean, running_var, tracked, residual)
    entry = (op, source, training, momentum if training else None, eps, relu, aligned, weight is None,
             bias is None, running_mean is None, running_var is None, tracked is None, residual is None,
             input.shape)
    a = _ABSENT  # every slot a tensor (the entry says which are absent)
    tensors = (input, a[0] if weight is None else weight, a[1] if bias is None else bias,
               a[2] if running_mean is None else running_mean, a[3] if running_var is None else running_var,
               a[4] if tracked is None else tracked, a[5] if residual is None else residual)
    guarded = _guarded.get(entry)
    if guarded is not None:
        for guard, found in guarded:
            if guard.check(*tensors):
                return found
    for t in tensors:  # a loop, not all(genexpr): a guard's miss runs it
        if type(t) not in plain_types:
            return None
    plan = _plans.get(_forward_key(op, source, training, momentum, eps, relu, aligned, input, weight, bias,
                                   running_mean, running_var, tracked, residual))
    if not plan:
        return None
    found = (plan, any(t is not None and t.requires_grad for t in (input, weight, bias, residual)))
    if _TensorGuards is not None and (guarded is None or len(guarded) < MAX_GUARDS):
        guard = _TensorGuards(*tensors, dynamic_dims_sizes=None, dynamic_dims_strides=None)
        if guard.check(*tensors):  # False where tensors alias each other: those calls use the full key
            _guarded.setdefault(entry, []).append((guard, found))
    return found


def forward_key(op: str, input, weight, bias, running_mean, running_var, num_batches_tracked, training: bool,
                momentum, eps, residual, relu: bool) -> tuple | None:
    """The key of a forward call of op ("forward" or "inference"), None where
    it is not cached (config_source). Eval ignores momentum and
    num_batches_tracked, as the kernels do. Every pointer's 16-byte alignment
    is in it: the kernels' VEC depends on the data's (vector_width), and
    Triton specializes each pointer argument on it, so a plan's compiled
    kernels (tritonbn.launcher) are the ones the JIT would pick."""
    source = config_source(op)
    if source is None:
        return None
    tracked = num_batches_tracked if training else None
    aligned = alignment(input, weight, bias, running_mean, running_var, tracked, residual)
    return _forward_key(op, source, training, momentum, eps, relu, aligned, input, weight, bias, running_mean,
                        running_var, tracked, residual)


def _forward_key(op, source, training, momentum, eps, relu, aligned, input, weight, bias, running_mean,
                 running_var, tracked, residual) -> tuple:
    head = (op, source, training, momentum if training else None, eps, relu,
            None if tracked is None else (tracked.shape, tracked.dtype, tracked.device), aligned,
            input.shape, input.stride(), input.dtype, input.device)
    if residual is None and weight is not None and bias is not None and running_mean is not None \
            and running_var is not None:  # the common case: tensor_entries' tuple, spelled out
        return head + (weight.shape, weight.stride(), weight.dtype, weight.device,
                       bias.shape, bias.stride(), bias.dtype, bias.device,
                       running_mean.shape, running_mean.stride(), running_mean.dtype, running_mean.device,
                       running_var.shape, running_var.stride(), running_var.dtype, running_var.device, None)
    return head + tensor_entries(weight, bias, running_mean, running_var, residual)


def tensor_entries(*tensors) -> tuple:
    """The key's entries of the given tensors: None for an absent one, its
    shape, strides, dtype and device for a present one."""
    entries = []
    for t in tensors:
        if t is None:
            entries.append(None)
        else:
            entries += (t.shape, t.stride(), t.dtype, t.device)
    return tuple(entries)


def backward_key(grad_out, input, weight, save_mean, save_invstd, training: bool, output_mask,
                 bias_dtype, output, residual_grad: bool, relu_from_input: bool, bias) -> tuple | None:
    source = config_source("backward")
    if source is None:
        return None
    return ("backward", source, training, tuple(output_mask), bias_dtype, residual_grad, relu_from_input,
            alignment(grad_out, input, weight, save_mean, save_invstd, output, bias),
            grad_out.shape, grad_out.stride(), grad_out.dtype, grad_out.device,
            input.shape, input.stride(), input.dtype, input.device,
            *((None,) if weight is None else (weight.shape, weight.stride(), weight.dtype, weight.device)),
            save_mean.shape, save_mean.stride(), save_mean.dtype,
            save_invstd.shape, save_invstd.stride(), save_invstd.dtype,
            *((None,) if output is None else (output.shape, output.stride(), output.dtype)),
            *((None,) if bias is None else (bias.shape, bias.stride(), bias.dtype, bias.device)))
