"""tritonbn.batch_norm forward and backward against a float64 reference, with
PyTorch's own error as the yardstick, across dtypes, ranks, layouts and both
kernel regimes."""
import pytest
import torch
import torch.nn.functional as F

import tritonbn
from tritonbn import launch, plans
from tritonbn.autotune import override
from reference import (assert_matches_reference, cooperative, reference_batch_norm, reference_grads,
                       resident, split)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(4, 3), (5, 3, 7), (4, 3, 5, 5), (2, 3, 2, 3, 4)]


def _channels_last(x):
    if x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x


def _run(fn, x, weight, bias, running_mean, running_var, training, grad_out, momentum=0.1):
    """Forward + backward of fn (tritonbn.batch_norm or F.batch_norm) on fresh leaves.
    Returns (y, dx, dweight, dbias, running_mean, running_var)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    rm = running_mean.clone() if running_mean is not None else None
    rv = running_var.clone() if running_var is not None else None
    y = fn(leaves[0], rm, rv, leaves[1], leaves[2], training, momentum, 1e-5)
    y.backward(grad_out)
    return (y, *(t.grad if t is not None else None for t in leaves), rm, rv)


def _check_against_torch(x, param_dtype, training, affine=True, track=True):
    C = x.shape[1]
    dev = x.device
    weight = torch.randn(C, dtype=param_dtype, device=dev) if affine else None
    bias = torch.randn(C, dtype=param_dtype, device=dev) if affine else None
    running_mean = torch.randn(C, dtype=param_dtype, device=dev) if track else None
    running_var = torch.rand(C, dtype=param_dtype, device=dev) + 0.5 if track else None
    grad_out = torch.randn_like(x)
    ours = _run(tritonbn.batch_norm, x, weight, bias, running_mean, running_var, training, grad_out)
    theirs = _run(F.batch_norm, x, weight, bias, running_mean, running_var, training, grad_out)

    y_ref, rm_ref, rv_ref = reference_batch_norm(x, running_mean, running_var, weight, bias,
                                                 training, 0.1, 1e-5)
    grads_ref = reference_grads(x, weight, bias, grad_out, running_mean, running_var, training, 1e-5)
    assert_matches_reference("y", ours[0], theirs[0], y_ref, x.dtype)
    assert ours[0].stride() == theirs[0].stride(), "output memory format differs from torch"
    for name, o, t, r in zip(("dx", "dweight", "dbias"), ours[1:4], theirs[1:4], grads_ref):
        if r is None:
            assert o is None and t is None
            continue
        assert_matches_reference(name, o, t, r, x.dtype)
    if track and training:
        assert_matches_reference("running_mean", ours[4], theirs[4], rm_ref, param_dtype)
        assert_matches_reference("running_var", ours[5], theirs[5], rv_ref, param_dtype)
    elif track:
        assert torch.equal(ours[4], running_mean) and torch.equal(ours[5], running_var)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
def test_matches_torch(device, dtype, shape, training):
    x = torch.randn(shape, device=device).to(dtype)
    _check_against_torch(x, dtype, training)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
def test_half_input_with_float32_parameters(device, dtype, training):
    """What torch.autocast produces: 16-bit activations, fp32 weight, bias and stats."""
    x = torch.randn(4, 3, 5, 5, device=device).to(dtype)
    _check_against_torch(x, torch.float32, training)


@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (2, 3, 2, 3, 4)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
def test_channels_last(device, shape, dtype, training):
    x = _channels_last(torch.randn(shape, device=device).to(dtype))
    _check_against_torch(x, dtype, training)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
def test_affine_and_tracking_options(device, affine, track):
    x = torch.randn(4, 3, 5, 5, device=device)
    _check_against_torch(x, torch.float32, True, affine=affine, track=track)
    if track:
        _check_against_torch(x, torch.float32, False, affine=affine, track=track)


def test_weight_without_bias_and_bias_without_weight(device):
    x = torch.randn(4, 3, 5, device=device)
    grad_out = torch.randn_like(x)
    w = torch.randn(3, device=device)
    for weight, bias in ((w, None), (None, w)):
        ours = _run(tritonbn.batch_norm, x, weight, bias, None, None, True, grad_out)
        theirs = _run(F.batch_norm, x, weight, bias, None, None, True, grad_out)
        for o, t in zip(ours[:4], theirs[:4]):
            assert (o is None) == (t is None)
            if o is not None:
                torch.testing.assert_close(o, t, atol=1e-5, rtol=1e-5)


# Ragged sizes: primes, one channel, spatial size 1, batch larger than a block,
# each through the resident kernel, through the split kernels with tiny tiles
# (masked tails on every axis, several splits along N and S) and through the
# cooperative kernels (a channel block over several programs along N and S).
RAGGED = [(7, 1, 13), (13, 5, 1, 1), (11, 3, 3, 5), (2, 7, 17), (37, 2), (3, 2, 1, 5, 7)]


@pytest.mark.parametrize("shape", RAGGED)
@pytest.mark.parametrize("regime", ["resident", "split", "cooperative"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_ragged_shapes_in_every_regime(device, shape, regime, channels_last):
    x = torch.randn(shape, device=device)
    if channels_last:
        x = _channels_last(x)
    config = {"resident": resident, "cooperative": lambda t: cooperative(t, block_n=4, block_s=4),
              "split": lambda t: split(block_n=4, block_c=2, block_s=4, split_n=2, split_s=2)}[regime](x)
    with override(forward=config, backward=config):
        _check_against_torch(x, torch.float32, True)
    if regime != "resident":  # the eval-mode backward (and the inference, split)
        with override(**({"inference": config} if regime == "split" else {}), backward=config):
            _check_against_torch(x, torch.float32, False)


def test_merge_of_more_partials_than_one_merge_step(device, monkeypatch):
    """More partials than one merge step holds: the merge loops over chunks
    (Chan-combining chunk results) in the forward, and sums chunks in the backward."""
    monkeypatch.setattr(plans, "MERGE_TILE", 8)  # 4 splits x 2 channels per step
    x = torch.randn(11, 2, 3, device=device) + 5.0
    config = split(block_n=1, block_c=2, block_s=4, split_n=11, split_s=1)
    with override(forward=config, backward=config):
        _check_against_torch(x, torch.float32, True)


@pytest.mark.parametrize("grad_layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("input_layout", ["contiguous", "channels_last"])
def test_gradient_in_another_layout_than_input(device, input_layout, grad_layout):
    x = torch.randn(3, 4, 5, 6, device=device)
    if input_layout == "channels_last":
        x = _channels_last(x)
    leaves = [t.clone().requires_grad_() for t in (x, torch.randn(4, device=device))]
    grad_out = torch.randn(3, 4, 5, 6, device=device)
    if grad_layout == "channels_last":
        grad_out = _channels_last(grad_out)
    tritonbn.batch_norm(leaves[0], None, None, leaves[1], None, True).backward(grad_out)
    dx_ref, dw_ref, _ = reference_grads(x, leaves[1], None, grad_out, None, None, True, 1e-5)
    torch.testing.assert_close(leaves[0].grad.double(), dx_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(leaves[1].grad.double(), dw_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make", [
    pytest.param(lambda x: x[:, 1:4], id="channel-slice"),
    pytest.param(lambda x: x[1:3], id="batch-slice"),
    pytest.param(lambda x: x[:, :, :, ::2], id="spatial-step"),
    pytest.param(lambda x: x.transpose(2, 3), id="spatial-transpose"),
    pytest.param(lambda x: x.contiguous(memory_format=torch.channels_last)[:, 1:4], id="channels-last-slice"),
    pytest.param(lambda x: x[:1].expand(3, -1, -1, -1), id="expanded-batch"),
    pytest.param(lambda x: x[:, :, 0].transpose(1, 2).contiguous().transpose(1, 2), id="channels-last-1d"),
    pytest.param(lambda x: x[:, :, 0, 0].t().contiguous().t(), id="transposed-2d"),
])
@pytest.mark.parametrize("training", [True, False])
def test_non_contiguous_inputs(device, make, training):
    x = make(torch.randn(4, 5, 6, 4, device=device))
    _check_against_torch(x, torch.float32, training)


def test_empty_batch(device):
    """Empty output, running stats untouched, zero parameter gradients, as torch."""
    x = torch.randn(0, 3, 4, device=device, requires_grad=True)
    weight = torch.randn(3, device=device, requires_grad=True)
    bias = torch.randn(3, device=device, requires_grad=True)
    running_mean, running_var = torch.randn(3, device=device), torch.rand(3, device=device)
    rm0, rv0 = running_mean.clone(), running_var.clone()
    y = tritonbn.batch_norm(x, running_mean, running_var, weight, bias, True)
    assert y.shape == (0, 3, 4)
    y.sum().backward()
    assert torch.equal(running_mean, rm0) and torch.equal(running_var, rv0)
    assert torch.equal(weight.grad, torch.zeros(3, device=device))
    assert torch.equal(bias.grad, torch.zeros(3, device=device))
    assert x.grad.shape == (0, 3, 4)
    assert tritonbn.batch_norm(x, running_mean, running_var, weight, bias, False).shape == (0, 3, 4)


def test_gradients_only_for_what_requires_them(device):
    x = torch.randn(4, 3, 5, device=device)
    weight = torch.randn(3, device=device, requires_grad=True)
    bias = torch.randn(3, device=device)
    tritonbn.batch_norm(x, None, None, weight, bias, True).sum().backward()
    assert weight.grad is not None and bias.grad is None and x.grad is None
    x.requires_grad_()
    weight.grad = None
    weight.requires_grad_(False)
    tritonbn.batch_norm(x, None, None, weight, bias, True).sum().backward()
    assert x.grad is not None and weight.grad is None


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("regime", ["resident", "split"])
def test_strided_and_expanded_per_channel_tensors(device, training, regime):
    """weight, bias and running stats that are a column of a matrix or an
    expanded scalar are read by their strides, and strided running stats are
    updated in place, as torch does; the rest of their storage is untouched."""
    x = torch.randn(4, 3, 5, device=device)
    columns = {name: torch.randn(3, 2, device=device) for name in ("weight", "running_mean")}
    columns["running_var"] = torch.rand(3, 2, device=device) + 0.5
    bias = torch.full((1,), 0.25, device=device).expand(3)
    grad_out = torch.randn_like(x)
    config = resident(x) if regime == "resident" else split()
    configs = dict(forward=config, backward=config) if training or regime == "resident" else \
        dict(backward=config, inference=config)  # inference has one regime

    def run(fn):
        storage = {name: t.clone() for name, t in columns.items()}
        weight = storage["weight"][:, 1].requires_grad_()
        with override(**configs):
            y = fn(x, storage["running_mean"][:, 1], storage["running_var"][:, 1], weight, bias,
                   training, 0.1, 1e-5)
            (dweight,) = torch.autograd.grad(y, weight, grad_out)
        return y, dweight, storage["running_mean"], storage["running_var"]

    for ours, theirs in zip(run(tritonbn.batch_norm), run(F.batch_norm)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(16, 32, 16, 16), (512, 64), (4, 16, 4, 8, 8)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("regime", ["heuristic", "split"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_larger_shapes(device, shape, dtype, regime, channels_last):
    """Larger inputs (thousands of interpreter programs in the split regime):
    run on purpose with -m slow."""
    x = torch.randn(shape, device=device).to(dtype)
    if channels_last:
        x = _channels_last(x)
    config = split(block_n=4, block_c=8, block_s=32, split_n=3, split_s=2)
    if regime == "heuristic":
        _check_against_torch(x, dtype, True)
        _check_against_torch(x, dtype, False)
    else:
        with override(forward=config, backward=config, inference=config):
            _check_against_torch(x, dtype, True)
            _check_against_torch(x, dtype, False)
