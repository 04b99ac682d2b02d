"""GPU-only checks: realistic shapes through the heuristic configs, and inputs
past 2**31 elements (64-bit offsets). Skipped without CUDA; the rest of the
suite also runs on CUDA when there is one."""
import pytest
import torch
import torch.nn.functional as F

import tritonbn
from reference import assert_matches_reference, reference_batch_norm, reference_grads

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# (64, 512, 28, 28) bf16 / fp16 forward and (256, 256, 14, 14) 16-bit forward,
# (32, 2048, 7, 7) backward: the cooperative regime, whose programs wait for
# each other (the interpreter never runs that wait)
SHAPES = [(32, 64, 112, 112), (32, 256, 56, 56), (64, 512, 28, 28), (32, 2048, 7, 7), (256, 256, 14, 14),
          (4096, 1024), (257, 100), (8, 64, 16, 56, 56)]


CASES = [(shape, False) for shape in SHAPES] + [(shape, True) for shape in SHAPES if len(shape) > 2]


@pytest.mark.parametrize("shape,channels_last", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
def test_reference_shapes(shape, dtype, channels_last, training):
    x = torch.randn(shape, device="cuda").to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    C = shape[1]
    params = dict(device="cuda", dtype=torch.float32 if dtype != torch.float32 else dtype)
    weight, bias = torch.randn(C, **params), torch.randn(C, **params)
    running = torch.randn(C, **params), torch.rand(C, **params) + 0.5
    grad_out = torch.randn_like(x)
    results = []
    for fn in (tritonbn.batch_norm, F.batch_norm):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        rm, rv = running[0].clone(), running[1].clone()
        y = fn(leaves[0], rm, rv, leaves[1], leaves[2], training, 0.1, 1e-5)
        y.backward(grad_out)
        results.append((y, *(t.grad for t in leaves), rm, rv))
    ours, theirs = results
    y_ref, rm_ref, rv_ref = reference_batch_norm(x, *running, weight, bias, training, 0.1, 1e-5)
    assert_matches_reference("y", ours[0], theirs[0], y_ref, dtype)
    del y_ref
    for name, o, t, r in zip(("dx", "dweight", "dbias"), ours[1:4], theirs[1:4],
                             reference_grads(x, weight, bias, grad_out, *running, training, 1e-5)):
        assert_matches_reference(name, o, t, r, dtype)
    if training:
        assert_matches_reference("running_mean", ours[4], theirs[4], rm_ref, params["dtype"])
        assert_matches_reference("running_var", ours[5], theirs[5], rv_ref, params["dtype"])


def test_more_than_2_31_elements_fp16():
    """fp16 input of 3.2e9 elements: the last elements sit past 2**31 and must
    be normalized, and get their gradient, with their own channel's statistics."""
    N, C, S = 2, 3, 2**29 + 11
    x = torch.randn(N, C, S, device="cuda", dtype=torch.float16)
    x[:, 1] += 3.0
    xr = x.clone().requires_grad_()
    y = tritonbn.batch_norm(xr, None, None, training=True)
    grad_out = torch.randn_like(x)
    y.backward(grad_out)
    tail = slice(S - 4096, S)
    for c in range(C):
        xf = x[:, c].float()
        var, mean = torch.var_mean(xf, unbiased=False)
        invstd = torch.rsqrt(var + 1e-5)
        xhat = (xf - mean) * invstd
        del xf
        g = grad_out[:, c].float()
        sum_g, sum_g_xhat, m = g.sum(), (g * xhat).sum(), g.numel()
        torch.testing.assert_close(y[:, c, tail].float(), xhat[:, tail], atol=4e-3, rtol=4e-3)
        expected_dx = invstd * (g[:, tail] - sum_g / m - xhat[:, tail] * sum_g_xhat / m)
        torch.testing.assert_close(xr.grad[:, c, tail].float(), expected_dx, atol=4e-3, rtol=4e-3)
        del g, xhat


def test_training_step_captures_in_a_cuda_graph():
    """A whole training step of a converted model (forward with running-stat
    updates, backward, optimizer step) is captured with torch.cuda.graphs and
    replayed: no host sync and no allocation the capture rejects, and each
    replay computes what an eager step computes on the same batch."""
    import copy

    from models import SmallCNN

    torch.manual_seed(0)
    model = tritonbn.convert_batchnorm(SmallCNN().cuda())
    reference = copy.deepcopy(model)
    batches = [(torch.randn(6, 3, 8, 8, device="cuda"), torch.randint(0, 10, (6,), device="cuda"))
               for _ in range(3)]

    def step(net, optimizer, x, target):
        optimizer.zero_grad(set_to_none=False)
        loss = F.cross_entropy(net(x), target)
        loss.backward()
        optimizer.step()
        return loss

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    static_x, static_target = (t.clone() for t in batches[0])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture: plans, compiled kernels, grads
        for _ in range(2):
            step(model, optimizer, static_x, static_target)
            step(reference, ref_optimizer, static_x, static_target)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step(model, optimizer, static_x, static_target)
    for x, target in batches:
        static_x.copy_(x)
        static_target.copy_(target)
        graph.replay()
        expected = step(reference, ref_optimizer, x, target)
        torch.testing.assert_close(static_loss, expected, atol=1e-5, rtol=1e-5)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, atol=1e-5, rtol=1e-5, msg=key)


@pytest.mark.parametrize("shape,channels_last", [((64, 512, 28, 28), False), ((32, 2048, 7, 7), True)], ids=str)
def test_cooperative_hand_over_under_real_concurrency(monkeypatch, shape, channels_last):
    """No time to wait: programs that find the flag down hand their
    share to the merger while others race it for the same shares (the claim
    CAS). Forward and backward must equal the normal waits' results bit for
    bit, whichever way each race goes."""
    from tritonbn import plan_cache, plans, views
    from tritonbn.autotune import heuristic, override
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    C = shape[1]
    weight, bias = torch.randn(C, device="cuda"), torch.randn(C, device="cuda")
    grad_out = torch.randn_like(x)
    _, view, _ = views.canonical(x)
    configs = {op: heuristic(plans.problem(op, view, x)) for op in ("forward", "backward")}
    assert "cooperative" in {c.regime for c in configs.values()}, configs

    def run():
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        running = [torch.zeros(C, device="cuda"), torch.ones(C, device="cuda")]
        with override(**configs):  # the heuristic's, whatever the tuner would pick
            y = tritonbn.batch_norm(leaves[0], *running, leaves[1], leaves[2], True, 0.1, 1e-5)
            y.backward(grad_out)
        return [y, *(t.grad for t in leaves), *running]

    expected = run()
    monkeypatch.setattr(plans, "COOPERATIVE_WAIT_NS", 0)  # the timed wait (triton >= 3.7)
    monkeypatch.setattr(plans, "COOPERATIVE_SPIN_LIMIT", 0)  # the poll count (triton 3.6)
    plan_cache.clear()
    for _ in range(3):
        for a, b in zip(run(), expected):
            assert torch.equal(a, b)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("shape", [(32, 64, 28, 28), (256, 256, 14, 14)], ids=str)  # resident, cooperative
def test_tensors_on_another_device_than_the_current_one(shape):
    """x on cuda:1 while cuda:0 is current (no torch.cuda.set_device): the
    forward and backward run on cuda:1, match the same call made with cuda:1
    current, and leave cuda:0 current."""
    torch.cuda.set_device(0)
    x = torch.randn(shape, device="cuda:1", dtype=torch.bfloat16)
    weight, bias = torch.randn(shape[1], device="cuda:1"), torch.randn(shape[1], device="cuda:1")
    grad_out = torch.randn_like(x)
    results = []
    for current in (0, 1, 0):  # twice from cuda:0: the first call and a planned, direct one
        torch.cuda.set_device(current)
        leaf = x.clone().requires_grad_()
        rm, rv = torch.zeros(shape[1], device="cuda:1"), torch.ones(shape[1], device="cuda:1")
        y = tritonbn.batch_norm(leaf, rm, rv, weight, bias, True, 0.1, 1e-5)
        y.backward(grad_out)
        torch.cuda.synchronize(1)
        assert torch.cuda.current_device() == current
        results.append((y, leaf.grad, rm, rv))
    torch.cuda.set_device(0)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)  # bitwise: same kernels, same device
    y, dx, rm, rv = results[0]
    assert y.device == dx.device == torch.device("cuda", 1)
    y_ref, rm_ref, rv_ref = reference_batch_norm(x, torch.zeros_like(rm), torch.ones_like(rv), weight, bias,
                                                 True, 0.1, 1e-5)
    with torch.cuda.device(1):
        theirs = F.batch_norm(x, torch.zeros_like(rm), torch.ones_like(rv), weight, bias, True, 0.1, 1e-5)
    assert_matches_reference("y", y, theirs, y_ref, x.dtype)
    torch.testing.assert_close(rm.double(), rm_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rv.double(), rv_ref, rtol=1e-5, atol=1e-6)
