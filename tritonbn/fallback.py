"""PyTorch's own batch_norm behind tritonbn's op contract, for tensors the
Triton kernels do not run on: CPU tensors when the Triton interpreter is off,
and devices without a Triton backend.

Same signatures and results as tritonbn.launch: (y, save_mean, save_invstd)
forward, (dx, dweight, dbias, dresidual) backward, running stats updated in
place; the fused tail (+ residual, ReLU) in torch ops after the batch norm.
"""
from __future__ import annotations

import torch

from .derivatives import relu_mask
from .launch import acc_dtype, output_format


def _channel_view(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.view(1, -1, *([1] * (like.dim() - 2)))


def _epilogue(y, residual, relu: bool):
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


def forward_training(x, weight, bias, running_mean, running_var, num_batches_tracked,
                     momentum: float | None, eps: float, *, residual=None, relu: bool = False):
    if momentum is None:  # cumulative average; the value is on the device, read it here
        momentum = 1.0 / float(num_batches_tracked) if num_batches_tracked is not None else 0.0
    y, save_mean, save_invstd = torch.native_batch_norm(
        x, weight, bias, running_mean, running_var, True, momentum, eps)
    return (_epilogue(y, residual, relu), save_mean.to(acc_dtype(x.dtype)),
            save_invstd.to(acc_dtype(x.dtype)))


def forward_inference(x, weight, bias, running_mean, running_var, eps: float, *, residual=None,
                      relu: bool = False):
    y = torch.native_batch_norm(x, weight, bias, running_mean, running_var, False, 0.0, eps)[0]
    acc = acc_dtype(x.dtype)
    save_mean = running_mean.to(acc, copy=True)
    save_invstd = torch.rsqrt(running_var.to(acc) + eps)
    return _epilogue(y, residual, relu), save_mean, save_invstd


def backward(grad_out, x, weight, save_mean, save_invstd, training: bool,
             output_mask, bias_dtype: torch.dtype | None = None, *, output=None,
             residual_grad: bool = False, relu_from_input: bool = False, bias=None):
    mask = relu_mask(x, weight, bias, save_mean, save_invstd, output, relu_from_input)
    if mask is not None:  # after a fused ReLU
        grad_out = torch.where(mask, grad_out, 0)
    dr = grad_out.clone(memory_format=output_format(x)) if residual_grad else None
    return (*_batch_norm_backward(grad_out, x, weight, save_mean, save_invstd, training, output_mask,
                                  bias_dtype), dr)


def _batch_norm_backward(grad_out, x, weight, save_mean, save_invstd, training: bool,
                         output_mask, bias_dtype: torch.dtype | None):
    need_dx, need_dw, need_db = output_mask
    need_dw = need_dw and weight is not None
    need_db = need_db and bias_dtype is not None
    if training:
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(
            grad_out, x, weight, None, None, save_mean, save_invstd, True, 0.0,
            [need_dx, need_dw, need_db])
        return dx, dw, (db.to(bias_dtype) if db is not None else None)
    # eval: y = x * scale + shift with constants scale, shift
    acc = acc_dtype(x.dtype)
    dims = [0, *range(2, x.dim())]
    scale = save_invstd if weight is None else save_invstd * weight.to(acc)
    g = grad_out.to(acc)
    dx = (g * _channel_view(scale, x)).to(x.dtype).contiguous(memory_format=output_format(x)) \
        if need_dx else None
    dw = db = None
    if need_dw:
        xhat = (x.to(acc) - _channel_view(save_mean, x)) * _channel_view(save_invstd, x)
        dw = (g * xhat).sum(dims).to(weight.dtype)
    if need_db:
        db = g.sum(dims).to(bias_dtype)
    return dx, dw, db
