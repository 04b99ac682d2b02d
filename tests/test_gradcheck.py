"""torch.autograd.gradcheck in float64: training and eval, affine and not,
2-D to 5-D, both layouts, both kernel regimes."""
import pytest
import torch

import tritonbn
from tritonbn.autotune import override
from reference import resident, split

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
    # eval reads the running stats; training gets none, so repeated calls by
    # gradcheck see the same function
    running = ((torch.randn(C, dtype=torch.float64, device=device),
                torch.rand(C, dtype=torch.float64, device=device) + 0.5)
               if not training else (None, None))
    assert torch.autograd.gradcheck(_fn(training, running, affine), inputs, fast_mode=True)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("regime", ["resident", "split"])
def test_gradcheck_both_regimes(device, channels_last, regime):
    inputs = _inputs((3, 3, 2, 5), device, channels_last, affine=True)
    config = resident(inputs[0]) if regime == "resident" else split()
    with override(forward=config, backward=config):
        assert torch.autograd.gradcheck(_fn(True, (None, None), True), inputs, fast_mode=True)


@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_full_mode(device, training):
    """Full (column by column) gradcheck on a tiny input, split regime."""
    inputs = _inputs((3, 2, 2), device, channels_last=False, affine=True)
    running = ((torch.randn(2, dtype=torch.float64, device=device),
                torch.rand(2, dtype=torch.float64, device=device) + 0.5)
               if not training else (None, None))
    with override(forward=split(), backward=split(), inference=split()):
        assert torch.autograd.gradcheck(_fn(training, running, True), inputs)


@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (2, 3, 2, 3, 4)])
def test_gradcheck_full_mode_larger(device, shape):
    inputs = _inputs(shape, device, channels_last=True, affine=True)
    assert torch.autograd.gradcheck(_fn(True, (None, None), True), inputs)
