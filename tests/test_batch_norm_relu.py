"""tritonbn.batch_norm_relu: relu(batch_norm(x) + residual) in one pass, against
the float64 reference with torch's unfused chain (F.batch_norm, +, relu, in the
input dtype) as the error yardstick; the three regimes, layouts, dtypes, autograd to
second order, torch.func, torch.compile and the errors."""
import pytest
import torch
import torch.nn.functional as F

import tritonbn
from tritonbn.autotune import override
from tritonbn.functional import batch_norm_tracked
from reference import assert_matches_reference, cooperative, reference_batch_norm, resident, split

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


def _regimes(x):
    return {"resident": resident(x), "split": split(block_n=2, block_c=2, block_s=4),
            "cooperative": cooperative(x, block_s=16)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("forward_regime,backward_regime",
                         [("resident", "split"), ("split", "resident"), ("split", "split"),
                          ("cooperative", "cooperative")])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_training_mask_recomputed_from_x_is_the_forwards(device, dtype, forward_regime, backward_regime,
                                                        layout):
    """In training without a residual the backward recomputes y's sign from x.
    It must be the forward's mask bit for bit, whichever kernels ran either
    way, also where y rounds to zero in the output dtype: channel 1's weight is
    so small that every y rounds to 0 in fp16 (no gradient may pass) while
    float32 keeps its sign (bf16 would need float32 subnormals for that).
    Checked against float64 sums over the forward's own y > 0."""
    x = torch.randn(4, 3, 5, 6, device=device).to(dtype)
    if layout == "channels_last":
        x = _channels_last(x)
    weight = torch.tensor([1.0, 1e-12, 0.5], device=device)
    bias = torch.tensor([0.25, 0.0, -1e-3], device=device)
    grad_out = torch.randn_like(x)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    regimes = _regimes(x)
    with override(forward=regimes[forward_regime], backward=regimes[backward_regime]):
        y = tritonbn.batch_norm_relu(leaves[0], None, None, leaves[1], leaves[2], training=True)
        y.backward(grad_out)
    mask = y.detach() > 0
    if dtype == torch.float16:
        assert not mask[:, 1].any()  # the case a float32 mask would get wrong
    assert mask[:, 0].any() and not mask[:, 0].all()
    g = torch.where(mask, grad_out, 0).double()
    xd = x.double()
    var, mean = torch.var_mean(xd, (0, 2, 3), correction=0)
    xhat = (xd - mean[:, None, None]) * torch.rsqrt(var + 1e-5)[:, None, None]
    dbias, dweight = g.sum((0, 2, 3)), (g * xhat).sum((0, 2, 3))
    m = x.numel() // 3
    dx = weight.double()[:, None, None] * torch.rsqrt(var + 1e-5)[:, None, None] * (
        g - dbias[:, None, None] / m - xhat * dweight[:, None, None] / m)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(leaves[2].grad.double(), dbias, **tol)
    torch.testing.assert_close(leaves[1].grad.double(), dweight, **tol)
    torch.testing.assert_close(leaves[0].grad.double(), dx, **tol)


@pytest.mark.parametrize("regime", ["resident", "split", "cooperative"])
def test_recomputed_mask_for_parameter_gradients_alone(device, regime):
    """A frozen input (no dx): the sums pass alone applies the recomputed mask."""
    x = torch.randn(4, 3, 5, 6, device=device)
    params = [torch.randn(3, device=device).requires_grad_() for _ in range(2)]
    grad_out = torch.randn_like(x)
    with override(backward=_regimes(x)[regime]):
        y = tritonbn.batch_norm_relu(x, None, None, *params, training=True)
        grads = torch.autograd.grad(y, params, grad_out)
    expected = torch.autograd.grad(_torch_chain(x, None, None, *params, True, 0.1, 1e-5), params, grad_out)
    torch.testing.assert_close(grads, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("training,with_residual,saves_y", [
    (True, False, False), (True, True, True), (False, False, True)])
def test_what_the_backward_keeps(device, training, with_residual, saves_y):
    """The forward's output is saved for the mask only where it cannot be
    recomputed from x (eval mode, a residual); nothing of x's size but x
    otherwise, so that backward reads no more than an unfused batch norm's."""
    x = torch.randn(4, 3, 5, device=device, requires_grad=True)
    residual = torch.randn_like(x) if with_residual else None
    saved = []

    def pack(t):
        saved.append(t)
        return t
    running = (torch.zeros(3, device=device), torch.ones(3, device=device))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = tritonbn.batch_norm_relu(x, *running, training=training, residual=residual)
    big = [t for t in saved if t.numel() == x.numel()]
    assert any(t is x or torch.equal(t, x) for t in big)
    assert any(t.data_ptr() == y.data_ptr() for t in big) == saves_y
    assert len(big) == 1 + saves_y


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


@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_and_gradgradcheck(device, training, with_residual):
    """Without a residual, training recomputes the mask from x in the kernels
    and in the double backward's torch formula."""
    x = torch.randn(3, 2, 2, 3, device=device, dtype=torch.float64)
    inputs = [x.requires_grad_(), *(torch.randn(2, device=device, dtype=torch.float64).requires_grad_()
                                    for _ in range(2))]
    if with_residual:
        inputs.append(torch.randn_like(x).requires_grad_())
    running = (torch.randn(2, device=device, dtype=torch.float64),
               torch.rand(2, device=device, dtype=torch.float64) + 0.5) if not training else (None, None)

    def fn(x, weight, bias, residual=None):
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


def test_torch_func_without_residual(device):
    """The jvp rule and torch.func.grad where the mask is recomputed from x."""
    x, tangent = torch.randn(2, 4, 3, 5, device=device, dtype=torch.float64).unbind(0)

    def call(batch_norm_relu):
        def fn(x):
            return batch_norm_relu(x, None, None, None, None, True, 0.1, 1e-5)
        return torch.func.grad(lambda x: fn(x).pow(3).sum())(x), torch.func.jvp(fn, (x,), (tangent,))

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
