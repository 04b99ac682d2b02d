"""BatchNorm's derivatives as differentiable torch ops, for what the Triton
kernels do not compute: the double backward (create_graph=True, gradient
penalties), torch.func transforms and forward-mode AD. Computed in the
statistics dtype (float32, or float64 for float64 input), with the names of
docs/design.md.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor


def _channel_dims(input: Tensor) -> list[int]:
    return [0, *range(2, input.dim())]


def _per_channel(t: Tensor, like: Tensor, dtype: torch.dtype) -> Tensor:
    """A [C] tensor shaped to broadcast over like (N, C, *)."""
    return t.to(dtype).view(1, -1, *([1] * (like.dim() - 2)))


def relu_mask(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], save_mean: Tensor,
              save_invstd: Tensor, output: Optional[Tensor], relu_from_input: bool) -> Optional[Tensor]:
    """Where a fused ReLU let the gradient through (None: no ReLU): the
    forward's output > 0, or with relu_from_input that sign recomputed from
    input as the kernels do, y = (x - mean) * (invstd * weight) + bias rounded
    to the input dtype (torch rounds twice where the kernels' fma rounds once,
    which only moves a mask bit where y is within an ulp of 0)."""
    if output is not None:
        return output > 0
    if not relu_from_input:
        return None
    acc = save_invstd.dtype
    per_channel = functools.partial(_per_channel, like=input, dtype=acc)
    scale = save_invstd if weight is None else save_invstd * weight.to(acc)
    y = (input.to(acc) - per_channel(save_mean)) * per_channel(scale)
    if bias is not None:
        y = y + per_channel(bias)
    return y.to(input.dtype) > 0


def backward_formula(grad_out: Tensor, input: Tensor, weight: Optional[Tensor], save_mean: Tensor,
                     save_invstd: Tensor, training: bool, eps: float, mask: Optional[Tensor] = None,
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_input, grad_weight, grad_bias, grad_residual) as differentiable
    torch ops, in the statistics dtype: what the double backward differentiates.
    In training the batch mean and invstd are rebuilt from input, since they
    depend on it (save_mean / save_invstd are then unused); in eval they are
    constants. mask: after a fused ReLU, where grad_out passes (relu_mask) to
    the batch norm and the residual."""
    acc, dims = save_invstd.dtype, _channel_dims(input)
    per_channel = functools.partial(_per_channel, like=input, dtype=acc)
    x, g = input.to(acc), grad_out.to(acc)
    if mask is not None:
        g = torch.where(mask, g, 0.0)
    if training:
        var, mean = torch.var_mean(x, dims, correction=0)
        invstd = torch.rsqrt(var + eps)
    else:
        mean, invstd = save_mean, save_invstd
    xhat = (x - per_channel(mean)) * per_channel(invstd)
    grad_bias = g.sum(dims)
    grad_weight = (g * xhat).sum(dims)
    scale = per_channel(invstd if weight is None else weight * invstd)
    if training:
        m = input.numel() // input.shape[1]
        grad_input = scale * (g - per_channel(grad_bias) / m - xhat * per_channel(grad_weight) / m)
    else:
        grad_input = scale * g
    return grad_input, grad_weight, grad_bias, g


def output_tangent(input: Tensor, weight: Optional[Tensor], save_mean: Tensor, save_invstd: Tensor,
                   training: bool, input_t: Optional[Tensor], weight_t: Optional[Tensor],
                   bias_t: Optional[Tensor], residual_t: Optional[Tensor] = None,
                   mask: Optional[Tensor] = None) -> Tensor:
    """Forward-mode derivative of y, in the statistics dtype:
    y_t = weight * xhat_t + weight_t * xhat + bias_t (+ residual_t), where in
    training xhat_t = invstd * (x_t - mean(x_t) - xhat * mean(x_t * xhat)) (the
    batch statistics move with x) and in eval xhat_t = invstd * x_t; after a
    fused ReLU, zero outside its mask (relu_mask)."""
    acc, dims = save_invstd.dtype, _channel_dims(input)
    per_channel = functools.partial(_per_channel, like=input, dtype=acc)
    xhat = (input.to(acc) - per_channel(save_mean)) * per_channel(save_invstd)
    y_t = torch.zeros_like(xhat)
    if input_t is not None and input.numel():
        x_t = input_t.to(acc)
        if training:
            x_t = x_t - x_t.mean(dims, keepdim=True) - xhat * (x_t * xhat).mean(dims, keepdim=True)
        y_t = y_t + x_t * per_channel(save_invstd if weight is None else weight * save_invstd)
    if weight_t is not None:
        y_t = y_t + per_channel(weight_t) * xhat
    if bias_t is not None:
        y_t = y_t + per_channel(bias_t)
    if residual_t is not None:
        y_t = y_t + residual_t.to(acc)
    if mask is not None:
        y_t = torch.where(mask, y_t, 0.0)
    return y_t
