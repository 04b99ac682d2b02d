"""Argument checks shared by the eager ops and their fake (tracing) versions.

Every message names the argument and what was expected. Exception types follow
PyTorch's batch_norm, so code that catches torch's errors catches ours.
"""
from __future__ import annotations

import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HALF_DTYPES = (torch.float16, torch.bfloat16)


def check_training_flag(training) -> None:
    """training must be a bool, as torch's binding demands: the launch-plan key
    keeps only its truth value, so this runs before the key is looked up."""
    if training is not True and training is not False:
        raise TypeError(f"batch_norm: argument 'training' must be bool, not {type(training).__name__}")


def check_running_stats_tangents(input, running_mean, running_var, weight, bias, residual) -> None:
    """torch's error for forward-mode AD through eval-mode batch_norm with
    tangents on the running statistics (y depends on them there, but batch_norm
    is not differentiable in them); as in torch, only when another input has a
    tangent too. Checked before the forward: inside the autograd.Function
    absent tangents arrive as zeros. Only while a forward-AD level is open."""
    from torch.autograd.forward_ad import unpack_dual

    def has_tangent(t) -> bool:
        return isinstance(t, torch.Tensor) and unpack_dual(t).tangent is not None

    if (has_tangent(running_mean) or has_tangent(running_var)) and any(
            has_tangent(t) for t in (input, weight, bias, residual)):
        raise RuntimeError("batch_norm is not differentiable wrt running_mean and running_var, "
                           "they cannot have forward grad defined")


def check_types(input, running_mean, running_var, weight, bias, momentum, eps, num_batches_tracked=None,
                residual=None) -> tuple[float | None, float]:
    """TypeError naming the argument for anything that is not a Tensor where
    one is expected (None allowed but for input), or not a real number for
    momentum / eps (momentum may be None: the cumulative average). Runs before
    anything reads a tensor attribute. Returns (momentum, eps) as Python
    numbers: a one-element tensor is read once, as torch's binding reads it."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"batch_norm: argument 'input' must be Tensor, not {type(input).__name__}")
    optional = {"running_mean": running_mean, "running_var": running_var, "weight": weight, "bias": bias,
                "num_batches_tracked": num_batches_tracked, "residual": residual}
    for name, t in optional.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"batch_norm: argument '{name}' must be Tensor or None, not {type(t).__name__}")
    return (None if momentum is None else _real("momentum", momentum)), _real("eps", eps)


def _real(name: str, value) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        return value.item()
    if isinstance(value, numbers.Real):
        return value
    raise TypeError(f"batch_norm: argument '{name}' must be float, not {type(value).__name__}")


def check_rank(input: torch.Tensor) -> None:
    if input.dim() < 2:
        raise ValueError(
            f"batch_norm expects an input of shape (N, C, *), got a {input.dim()}-D tensor "
            f"of shape {tuple(input.shape)}")


def check_mode(input: torch.Tensor, training: bool, eps: float) -> None:
    """What training and eps ask of the input: more than one value per channel
    to take batch statistics from, and an eps that keeps var + eps positive."""
    if training:
        values_per_channel = input.shape[0]
        for dim in input.shape[2:]:
            values_per_channel *= dim
        if values_per_channel == 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {input.shape}")
        if eps <= 0.0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    elif eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def check_inputs(input: torch.Tensor, weight, bias, running_mean, running_var,
                 num_batches_tracked, training: bool, momentum: float | None) -> None:
    check_rank(input)
    if input.dtype not in FLOAT_DTYPES:
        raise NotImplementedError(
            f"batch_norm supports float16, bfloat16, float32 and float64 inputs, got {input.dtype}")
    channels = input.shape[1]
    # torch's order of checks: running stats first
    params = {"running_mean": running_mean, "running_var": running_var, "weight": weight, "bias": bias}
    params = {name: t for name, t in params.items() if t is not None}
    for name, t in params.items():
        if t.dim() != 1 or t.shape[0] != channels:
            raise RuntimeError(
                f"{name} should contain {channels} elements not {t.numel()}: expected one value "
                f"per channel, shape ({channels},), for input of shape {tuple(input.shape)}, "
                f"got shape {tuple(t.shape)}")
        if t.device != input.device:
            raise RuntimeError(
                f"{name} is on {t.device} but input is on {input.device}; "
                f"all tensors must be on the same device")
    _check_dtypes(input.dtype, params)
    if (running_mean is None) != (running_var is None):
        missing = "running_var" if running_var is None else "running_mean"
        raise RuntimeError(f"{missing} is None but the other running statistic is not; "
                           f"pass both running_mean and running_var, or neither")
    if not training and running_mean is None:
        raise RuntimeError("running_mean must be defined in evaluation mode")
    if training and running_mean is not None and momentum is None:
        if num_batches_tracked is None or num_batches_tracked.numel() != 1:
            raise RuntimeError("momentum=None (cumulative moving average) needs num_batches_tracked, "
                               "a one-element integer tensor")
        if num_batches_tracked.device != input.device:
            raise RuntimeError(f"num_batches_tracked is on {num_batches_tracked.device} but input is on "
                               f"{input.device}; all tensors must be on the same device")


def _check_dtypes(input_dtype: torch.dtype, params: dict) -> None:
    """Parameters and running stats share one dtype: the input's, or float32
    for a float16 / bfloat16 input (what torch.autocast produces)."""
    dtypes = {t.dtype for t in params.values()}
    if not dtypes or dtypes == {input_dtype}:
        return
    if input_dtype in HALF_DTYPES and dtypes == {torch.float32}:
        return
    found = ", ".join(f"{name}={t.dtype}" for name, t in params.items())
    allowed = f"all {input_dtype}"
    if input_dtype in HALF_DTYPES:
        allowed += " or all torch.float32"
    raise RuntimeError(f"dtype mismatch: input is {input_dtype} but {found}; "
                       f"weight, bias, running_mean and running_var must be {allowed}")


def check_residual(input: torch.Tensor, residual: torch.Tensor | None) -> None:
    """The fused residual is added elementwise: the input's shape, dtype and device."""
    if residual is None:
        return
    if residual.shape != input.shape:
        raise RuntimeError(f"residual must have the input's shape {tuple(input.shape)}, "
                           f"got {tuple(residual.shape)}")
    if residual.dtype != input.dtype:
        raise RuntimeError(f"dtype mismatch: input is {input.dtype} but residual is {residual.dtype}; "
                           f"the residual must have the input's dtype")
    if residual.device != input.device:
        raise RuntimeError(f"residual is on {residual.device} but input is on {input.device}; "
                           f"all tensors must be on the same device")
