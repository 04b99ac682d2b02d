"""tritonbn.batch_norm_relu: relu(batch_norm(x) + residual) in one pass, against
the float64 reference with torch's unfused chain (F.batch_norm, +, relu, in the
input dtype) as the error yardstick; both regimes, layouts, dtypes, autograd to
second order, torch.func, torch.compile and the errors."""
import pytest
import torch
import torch.nn.functional as F

import tritonbn
from tritonbn.autotune import override
from tritonbn.functional import batch_norm_tracked
from reference import assert_matches_reference, reference_batch_norm, resident, split

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _torch_chain(x, running_mean, running_var, weight, bias, training, momentum, eps, residual=None):
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    return torch.relu(y if residual is None else y + residual)


def _reference_chain(x, running_mean, running_var, weight, bias, training, momentum, eps, residual=None):
    y, _, _ = reference_batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    return torch.relu(y if residual is None else y + residual.double())


def _run(fn, x, residual, params, running, training, grad_out):
    """(y, dx, dweight, dbias, dresidual, running_mean, running_var) on fresh leaves."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None
              for t in (x, *params, residual)]
    running = [t.clone() for t in running]
    y = fn(leaves[0], *running, leaves[1], leaves[2], training, 0.1, 1e-5, residual=leaves[3])
    y.backward(grad_out)
    return (y, *(t.grad if t is not None else None for t in leaves), *running)


def _check(x, residual, training):
    """Every output of ours within the reference rule of torch's unfused chain."""
    C = x.shape[1]
    param_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    params = (torch.rand(C, dtype=param_dtype, device=x.device) + 0.5,
              torch.randn(C, dtype=param_dtype, device=x.device))
    running = (torch.randn(C, dtype=param_dtype, device=x.device),
               torch.rand(C, dtype=param_dtype, device=x.device) + 0.5)
    grad_out = torch.randn_like(x)
    ours = _run(tritonbn.batch_norm_relu, x, residual, params, running, training, grad_out)
    theirs = _run(_torch_chain, x, residual, params, running, training, grad_out)
    reference = _run(_reference_chain, x.double(), None if residual is None else residual.double(),
                     [p.double() for p in params], [r.double() for r in running], training,
                     grad_out.double())
    assert ours[0].stride() == theirs[0].stride(), "output memory format differs from torch's"
    names = ("y", "dx", "dweight", "dbias", "dresidual", "running_mean", "running_var")
    for name, o, t, r in zip(names, ours, theirs, reference):
        if r is None:
            assert o is None and t is None, name
            continue
        dtype = param_dtype if name in ("dweight", "dbias", "running_mean", "running_var") else x.dtype
        assert_matches_reference(name, o, t, r.to(torch.float64), dtype)


def _channels_last(x):
    return x.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("regime", ["heuristic", "split"])
def test_matches_reference(device, dtype, with_residual, training, regime):
    x = (torch.randn(4, 3, 5, 5, device=device) + 0.3).to(dtype)
    residual = torch.randn_like(x) if with_residual else None
    config = split(block_n=2, block_c=2, block_s=8) if regime == "split" else None
    with override(**({} if config is None else dict(forward=config, backward=config, inference=config))):
        _check(x, residual, training)


@pytest.mark.parametrize("shape", [(6, 3), (5, 3, 7), (2, 3, 2, 3, 4)])
@pytest.mark.parametrize("training", [True, False])
def test_ranks_and_resident_regime(device, shape, training):
    x = torch.randn(shape, device=device)
    with override(forward=resident(x), backward=resident(x)):
        _check(x, torch.randn_like(x), training)


@pytest.mark.parametrize("x_layout,residual_layout", [("channels_last", "channels_last"),
                                                      ("channels_last", "contiguous"),
                                                      ("contiguous", "channels_last")])
def test_layouts(device, x_layout, residual_layout):
    """A residual in another layout than x is read as it is (copied once), and
    y / dx / dresidual take the layout torch gives them."""
    def layout(t, name):
        return _channels_last(t) if name == "channels_last" else t.contiguous()
    x = layout(torch.randn(4, 3, 5, 6, device=device), x_layout)
    _check(x, layout(torch.randn(4, 3, 5, 6, device=device), residual_layout), True)


def test_residual_without_relu_is_its_gradient(device):
    """The internal residual-only variant: y = bn(x) + residual, whose residual
    gradient is grad_out itself."""
    x = torch.randn(4, 3, 5, device=device)
    residual = torch.randn_like(x, requires_grad=True)
    y = batch_norm_tracked(x, None, None, None, None, True, residual=residual)
    torch.testing.assert_close(y, F.batch_norm(x, None, None, training=True) + residual)
    grad_out = torch.randn_like(x)
    y.backward(grad_out)
    torch.testing.assert_close(residual.grad, grad_out)


@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_and_gradgradcheck(device, training):
    x = torch.randn(3, 2, 2, 3, device=device, dtype=torch.float64)
    inputs = [x.requires_grad_(), *(torch.randn(2, device=device, dtype=torch.float64).requires_grad_()
                                    for _ in range(2)), torch.randn_like(x).requires_grad_()]
    running = (torch.randn(2, device=device, dtype=torch.float64),
               torch.rand(2, device=device, dtype=torch.float64) + 0.5) if not training else (None, None)

    def fn(x, weight, bias, residual):
        return tritonbn.batch_norm_relu(x, *running, weight, bias, training, 0.1, 1e-5, residual=residual)
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)


def test_torch_func_grad_and_jvp(device):
    x = torch.randn(4, 3, 5, device=device, dtype=torch.float64)
    residual = torch.randn_like(x)
    tangents = (torch.randn_like(x), torch.randn_like(x))

    def call(batch_norm_relu):
        def fn(x, residual):
            return batch_norm_relu(x, None, None, None, None, True, 0.1, 1e-5, residual=residual)
        grads = torch.func.grad(lambda x, r: fn(x, r).pow(2).sum(), argnums=(0, 1))(x, residual)
        return grads, torch.func.jvp(fn, (x, residual), tangents)

    torch.testing.assert_close(call(tritonbn.batch_norm_relu), call(_torch_chain), rtol=1e-9, atol=1e-9)


def test_vmap_with_a_batched_residual(device):
    """vmap over the input and a residual batched along another dim: each slice
    its own fused batch norm."""
    x = torch.randn(2, 4, 3, 5, device=device, dtype=torch.float64)
    residual = torch.randn(4, 3, 5, 2, device=device, dtype=torch.float64)
    ours = torch.func.vmap(lambda x, r: tritonbn.batch_norm_relu(x, None, None, training=True, residual=r),
                           in_dims=(0, 3))(x, residual)
    expected = torch.stack([_torch_chain(x[i], None, None, None, None, True, 0.1, 1e-5, residual[..., i])
                            for i in range(2)])
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-9)


def test_compiled_resnet_block_matches_eager(device):
    """conv -> bn -> relu -> conv -> bn (+ identity) -> relu with the fused
    epilogue: one graph, and equal to eager in outputs, gradients and buffers."""
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(4, 4, 3, padding=1, bias=False)
            self.bn1 = tritonbn.BatchNorm2d(4)
            self.conv2 = torch.nn.Conv2d(4, 4, 3, padding=1, bias=False)
            self.bn2 = tritonbn.BatchNorm2d(4)

        def forward(self, x):
            def fused(bn, h, residual=None):
                return tritonbn.batch_norm_relu(h, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                                bn.training, bn.momentum, bn.eps, residual=residual)
            return fused(self.bn2, self.conv2(fused(self.bn1, self.conv1(x))), residual=x)

    import copy
    eager = Block().to(device)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    for _ in range(2):
        x = torch.randn(2, 4, 5, 5, device=device)
        y_eager, y_compiled = eager(x), compiled(x)
        torch.testing.assert_close(y_compiled, y_eager)
        y_eager.square().sum().backward()
        y_compiled.square().sum().backward()
    for (name, p), q in zip(eager.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)
    for (name, b), c in zip(eager.named_buffers(), compiled_model.buffers()):
        torch.testing.assert_close(c, b, msg=name)


def test_nan_passes_the_relu_as_in_torch(device):
    x = torch.randn(4, 3, 5, device=device)
    x[1, 1, 2] = float("nan")
    ours = tritonbn.batch_norm_relu(x, None, None, training=True)
    theirs = _torch_chain(x, None, None, None, None, True, 0.1, 1e-5)
    assert torch.equal(ours.isnan(), theirs.isnan()) and ours[:, 1].isnan().all()


def test_empty_batch(device):
    x = torch.randn(0, 3, 4, device=device, requires_grad=True)
    residual = torch.randn(0, 3, 4, device=device, requires_grad=True)
    y = tritonbn.batch_norm_relu(x, torch.zeros(3, device=device), torch.ones(3, device=device),
                                 training=True, residual=residual)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape and residual.grad.shape == residual.shape


@pytest.mark.parametrize("residual,message", [
    (lambda x: torch.randn(4, 3, 6), "residual must have the input's shape"),
    (lambda x: torch.randn(4, 3, 5).double(), "dtype mismatch: input is torch.float32 but residual"),
])
def test_residual_errors(device, residual, message):
    x = torch.randn(4, 3, 5, device=device)
    with pytest.raises(RuntimeError, match=message):
        tritonbn.batch_norm_relu(x, None, None, training=True, residual=residual(x).to(device))
