"""Numerical robustness and reproducibility."""
import pytest
import torch
import torch.nn.functional as F

import tritonbn
from tritonbn import launch, plans, views
from tritonbn.autotune import LaunchConfig, override
from reference import flat, resident, split


@pytest.mark.parametrize("regime", ["resident", "split"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_large_mean_small_spread_variance(device, regime, channels_last):
    """mean 1e4, std 1 in float32: E[x^2] - E[x]^2 would lose every digit;
    Welford / two-pass keep the batch variance within 1e-4 relative."""
    x = torch.randn(16, 3, 8, 8, device=device) + 1e4
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    config = resident(x) if regime == "resident" else split(block_n=4, block_c=2, block_s=16,
                                                            split_n=2, split_s=2)
    with override(forward=config):
        _, _, save_invstd = launch.forward_training(x, None, None, None, None, None, 0.1, 1e-5)
    expected = x.double().var((0, 2, 3), unbiased=False)
    variance = 1.0 / save_invstd.double() ** 2 - 1e-5
    torch.testing.assert_close(variance, expected, rtol=1e-4, atol=0)


def test_large_mean_output_matches_float64(device):
    x = torch.randn(16, 3, 8, 8, device=device) + 1e4
    y = tritonbn.batch_norm(x, None, None, training=True)
    xd = x.double()
    mean, var = xd.mean((0, 2, 3), keepdim=True), xd.var((0, 2, 3), unbiased=False, keepdim=True)
    torch.testing.assert_close(y.double(), (xd - mean) / (var + 1e-5).sqrt(), rtol=0, atol=2e-3)


@pytest.mark.parametrize("regime", ["resident", "split"])
def test_identical_calls_are_bitwise_equal(device, regime):
    x = torch.randn(9, 4, 7, 5, device=device)
    weight = torch.randn(4, device=device, requires_grad=True)
    grad_out = torch.randn_like(x)
    config = resident(x) if regime == "resident" else split(block_n=4, block_c=2, block_s=2,
                                                            split_n=2, split_s=2)
    results = []
    for _ in range(2):
        xr = x.clone().requires_grad_()
        weight.grad = None
        running = torch.zeros(4, device=device), torch.ones(4, device=device)
        with override(forward=config, backward=config):
            y = tritonbn.batch_norm(xr, *running, weight, None, training=True)
            y.backward(grad_out)
        results.append((y, xr.grad, weight.grad.clone(), *running))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_int64_offsets_path(device, monkeypatch):
    """The 64-bit offset variant of every kernel gives the same numbers (on a GPU,
    tests/test_cuda.py runs it for real above 2**31 elements)."""
    x = torch.randn(4, 3, 6, device=device)
    grad_out = torch.randn_like(x)
    running = torch.randn(3, device=device), torch.rand(3, device=device) + 0.5

    def run():
        out = []
        for training in (True, False):
            xr = x.clone().requires_grad_()
            w = torch.ones(3, device=device, requires_grad=True)
            y = tritonbn.batch_norm(xr, running[0].clone(), running[1].clone(), w, None, training)
            y.backward(grad_out)
            out += [y, xr.grad, w.grad]
        return out

    for inference in (split(), flat()):
        with override(forward=split(), backward=split(), inference=inference):
            monkeypatch.setattr(plans, "needs_int64", lambda *tensors: False)
            expected = run()
            monkeypatch.setattr(plans, "needs_int64", lambda *tensors: True)
            for a, b in zip(run(), expected):
                assert torch.equal(a, b)


def test_nonfinite_values_propagate_like_torch(device):
    x = torch.randn(6, 3, 4, device=device)
    x[0, 0, 0] = float("inf")
    x[1, 1, 2] = float("nan")
    y = tritonbn.batch_norm(x, None, None, training=True)
    expected = F.batch_norm(x, None, None, training=True)
    assert torch.isnan(y[:, :2]).all(), "an inf or nan makes its whole channel nan, as in torch"
    torch.testing.assert_close(y, expected, equal_nan=True)


@pytest.mark.parametrize("regime", ["split", "cooperative"])
def test_the_backward_divides_by_the_exact_count(regime):
    """m = N * S reaches the dx kernels as two float32 halves (Triton passes a
    Python float as float32): they add up to m exactly in float64 where m
    has more bits than a float32 holds (2^24 + 5 values a channel here; a
    single float32 would be 2^24 + 4). Checked on the plan's arguments, as
    the kernel receives them: the interpreter would keep a double."""
    import numpy as np
    m = 2 ** 24 + 5
    x = torch.empty((m // 3, 2, 3), dtype=torch.float64, device="meta")  # m = 3 * 5592407
    x, view, fmt = views.canonical(x)
    cfg = split(block_n=64, block_s=8) if regime == "split" else \
        LaunchConfig("cooperative", 1024, 1, 8, split_n=-(-view.N // 1024), split_s=1)
    plan = plans.backward_plan(x, x, view, fmt, cfg, training=True, weight=None, output_mask=(True, False, False),
                               bias_dtype=None, output=None, residual_grad=False, relu_from_input=False,
                               has_bias=False)
    hi, lo = plan.args["count_hi"], plan.args["count_lo"]
    assert float(np.float32(hi)) == hi and float(np.float32(lo)) == lo, "each half is a float32"
    assert float(np.float64(hi) + np.float64(lo)) == m
    assert float(np.float32(m)) != m  # what one float32 would have lost
