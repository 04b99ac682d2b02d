"""torch.autograd.gradcheck in float64: training and eval, affine and not,
2-D to 5-D, both layouts, the three kernel regimes (resident, cooperative, split)."""
import pytest
import torch

import tritonbn
from tritonbn.autotune import override
from reference import cooperative, resident, split

SHAPES = [(5, 3), (3, 2, 5), (3, 2, 3, 4), (2, 2, 2, 3, 2)]
# (shape, channels_last): every rank contiguous, 4-D and 5-D also channels_last
# (2-D input is channel-inner already)
CASES = [(shape, False) for shape in SHAPES] + [(shape, True) for shape in SHAPES if len(shape) >= 4]


def _inputs(shape, device, channels_last, affine):
    x = torch.randn(shape, dtype=torch.float64, device=device)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    if channels_last and x.dim() == 5:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    C = shape[1]
    params = [torch.randn(C, dtype=torch.float64, device=device) for _ in range(2)] if affine else []
    return [x.requires_grad_(), *(p.requires_grad_() for p in params)]


def _running_stats(C, device, training):
    """Eval reads running stats; training gets none, so repeated calls by
    gradcheck see the same function."""
    if training:
        return None, None
    return (torch.randn(C, dtype=torch.float64, device=device),
            torch.rand(C, dtype=torch.float64, device=device) + 0.5)


def _fn(training, running, affine):
    running_mean, running_var = running

    def fn(x, *params):
        weight, bias = params if affine else (None, None)
        return tritonbn.batch_norm(x, running_mean, running_var, weight, bias, training, 0.1, 1e-5)
    return fn


@pytest.mark.parametrize("shape,channels_last", CASES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck(device, shape, channels_last, training, affine):
    inputs = _inputs(shape, device, channels_last, affine)
    C = shape[1]
    running = _running_stats(C, device, training)
    assert torch.autograd.gradcheck(_fn(training, running, affine), inputs, fast_mode=True)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("regime", ["resident", "split", "cooperative"])
def test_gradcheck_every_regime(device, channels_last, regime):
    inputs = _inputs((3, 3, 2, 5), device, channels_last, affine=True)
    config = {"resident": resident, "split": lambda t: split(),
              "cooperative": lambda t: cooperative(t, block_n=1, block_s=8)}[regime](inputs[0])
    with override(forward=config, backward=config):
        assert torch.autograd.gradcheck(_fn(True, (None, None), True), inputs, fast_mode=True)


@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_full_mode(device, training):
    """Full (column by column) gradcheck on a tiny input, split regime."""
    inputs = _inputs((3, 2, 2), device, channels_last=False, affine=True)
    running = _running_stats(2, device, training)
    with override(forward=split(), backward=split(), inference=split()):
        assert torch.autograd.gradcheck(_fn(training, running, True), inputs)


@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (2, 3, 2, 3, 4)])
def test_gradcheck_full_mode_larger(device, shape):
    inputs = _inputs(shape, device, channels_last=True, affine=True)
    assert torch.autograd.gradcheck(_fn(True, (None, None), True), inputs)


# double backward: the gradient of the gradient (gradient penalties, Hessian-vector
# products); tritonbn differentiates its backward with torch ops (ops.backward_formula)

@pytest.mark.parametrize("shape,channels_last", [((4, 3), False), ((3, 2, 4), False), ((3, 2, 2, 3), True)])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_gradgradcheck(device, shape, channels_last, training, affine):
    inputs = _inputs(shape, device, channels_last, affine)
    C = shape[1]
    running = _running_stats(C, device, training)
    assert torch.autograd.gradgradcheck(_fn(training, running, affine), inputs, fast_mode=True)


def test_gradgradcheck_full_mode_and_third_order(device):
    """Full gradgradcheck, and a third derivative: the double backward is itself
    differentiable."""
    inputs = _inputs((3, 2, 3), device, channels_last=False, affine=True)
    fn = _fn(True, (None, None), True)
    assert torch.autograd.gradgradcheck(fn, inputs)

    def grad_fn(x, weight, bias):
        (dx,) = torch.autograd.grad(fn(x, weight, bias).pow(3).sum(), x, create_graph=True)
        return dx
    assert torch.autograd.gradgradcheck(grad_fn, inputs, fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("training", [True, False])
def test_gradient_penalty_matches_torch(device, dtype, training):
    """A WGAN-GP style step: the norm of d(loss)/dx is itself minimised. Every
    gradient equals torch's batch_norm's, in float32 and with half input and
    float32 parameters (autocast's mix)."""
    x0 = torch.randn(6, 3, 4, 5, device=device).to(dtype)
    params0 = (torch.rand(3, device=device) + 0.5, torch.randn(3, device=device))
    running = (torch.randn(3, device=device), torch.rand(3, device=device) + 0.5)

    def penalty_grads(batch_norm):
        x = x0.clone().requires_grad_()
        weight, bias = (p.clone().requires_grad_() for p in params0)
        y = batch_norm(x, *(r.clone() for r in running), weight, bias, training, 0.1, 1e-5)
        (dx,) = torch.autograd.grad((y.float() ** 2).sum(), x, create_graph=True)
        dx.float().pow(2).sum().backward()
        return x.grad, weight.grad, bias.grad

    ours = penalty_grads(tritonbn.batch_norm)
    reference = penalty_grads(lambda x, *args: torch.nn.functional.batch_norm(
        x.double(), *(a.double() for a in args[:4]), *args[4:]))
    tol = dict(rtol=1e-3, atol=1e-3) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for got, expected in zip(ours, reference):
        # in training the penalty does not depend on bias: a zero gradient or none
        got, expected = (torch.zeros(3, device=device) if t is None else t for t in (got, expected))
        torch.testing.assert_close(got.double(), expected.double(), **tol)

