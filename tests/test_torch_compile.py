"""torch.compile(fullgraph=True) over tritonbn modules: one graph, no break,
and compiled training equal to eager training step for step."""
import copy
import itertools

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import tritonbn
from tritonbn import launch
from models import SmallCNN


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _block(device, **bn_kwargs):
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False),
                         tritonbn.BatchNorm2d(4, **bn_kwargs), nn.ReLU()).to(device)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


OPTIONS = list(itertools.product([0.1, None], [True, False], [True, False], [True, False]))


@pytest.mark.parametrize("momentum,affine,track,training", OPTIONS)
def test_one_graph_for_every_option(device, momentum, affine, track, training):
    eager = _block(device, momentum=momentum, affine=affine, track_running_stats=track).train(training)
    compiled_model = copy.deepcopy(eager)
    x = torch.randn(4, 3, 5, 5, device=device)
    explanation = torch._dynamo.explain(copy.deepcopy(eager))(x)
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0, explanation.break_reasons

    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    for _ in range(2):
        x = torch.randn(4, 3, 5, 5, device=device)
        torch.testing.assert_close(compiled(x), eager(x))
    for key, value in _state(eager).items():
        torch.testing.assert_close(compiled_model.state_dict()[key], value, msg=key)


def _train(model, batches, step_fn):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses, grads = [], []
    for x, target in batches:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(step_fn(x), target)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
    return losses, grads


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("channels_last", [False, True])
def test_compiled_training_matches_eager(device, momentum, channels_last):
    torch.manual_seed(0)
    eager = SmallCNN(tritonbn.BatchNorm2d, momentum=momentum).to(device)
    compiled_model = copy.deepcopy(eager)
    if channels_last:
        eager, compiled_model = (m.to(memory_format=torch.channels_last) for m in (eager, compiled_model))
    batches = [(torch.randn(6, 3, 8, 8, device=device), torch.randint(0, 10, (6,), device=device))
               for _ in range(3)]
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    losses_e, grads_e = _train(eager, batches, eager)
    losses_c, grads_c = _train(compiled_model, batches, compiled)
    torch.testing.assert_close(losses_c, losses_e)
    torch.testing.assert_close(grads_c, grads_e)
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(compiled_model.state_dict()[key], value, msg=key)
    eager.eval()
    compiled_model.eval()
    x = torch.randn(4, 3, 8, 8, device=device)
    torch.testing.assert_close(compiled(x), eager(x))


def test_running_stats_updated_once_per_step(device):
    """momentum 0.5 from zero: one update gives mean / 2, a doubled one 3 * mean / 4."""
    bn = tritonbn.BatchNorm2d(3, momentum=0.5, affine=False).to(device)
    compiled = torch.compile(bn, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 3, 5, 5, device=device) + 2.0
    compiled(x).sum()
    torch.testing.assert_close(bn.running_mean, 0.5 * x.mean((0, 2, 3)))
    assert bn.num_batches_tracked.item() == 1


def test_dynamic_batch_size_compiles_once(device):
    model = _block(device)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for batch in (4, 6, 9, 5):
        x = torch.randn(batch, 3, 5, 5, device=device)
        torch._dynamo.mark_dynamic(x, 0)
        compiled(x).sum().backward()
    assert counter.frame_count == 1


def test_kernels_are_launched_on_real_tensors_only(device, monkeypatch):
    """Tracing uses the fake implementations; config choice and launches happen
    at run time, once per call, on real tensors."""
    from torch._subclasses.fake_tensor import FakeTensor
    seen = []
    for name in ("forward_training", "backward"):
        original = getattr(launch, name)

        def recorder(*args, _original=original, _name=name, **kwargs):
            seen.append((_name, any(isinstance(a, FakeTensor) for a in args)))
            return _original(*args, **kwargs)
        monkeypatch.setattr(launch, name, recorder)
    compiled = torch.compile(_block(device), backend="aot_eager", fullgraph=True)
    for _ in range(2):
        compiled(torch.randn(4, 3, 5, 5, device=device)).sum().backward()
    assert seen == [("forward_training", False), ("backward", False)] * 2


def test_inductor_backend(device):
    torch.manual_seed(0)
    eager = SmallCNN(tritonbn.BatchNorm2d, momentum=None).to(device)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend="inductor", fullgraph=True)
    batches = [(torch.randn(6, 3, 8, 8, device=device), torch.randint(0, 10, (6,), device=device))
               for _ in range(2)]
    losses_e, grads_e = _train(eager, batches, eager)
    losses_c, grads_c = _train(compiled_model, batches, compiled)
    torch.testing.assert_close(losses_c, losses_e, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads_c, grads_e, atol=1e-5, rtol=1e-5)
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(compiled_model.state_dict()[key], value, atol=1e-5, rtol=1e-5, msg=key)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_reduce_overhead_cuda_graphs():
    torch.manual_seed(0)
    eager = SmallCNN(tritonbn.BatchNorm2d).cuda()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, mode="reduce-overhead", fullgraph=True)
    batches = [(torch.randn(6, 3, 8, 8, device="cuda"), torch.randint(0, 10, (6,), device="cuda"))
               for _ in range(4)]
    losses_e, _ = _train(eager, batches, eager)
    losses_c, _ = _train(compiled_model, batches, compiled)
    torch.testing.assert_close(losses_c, losses_e, atol=1e-4, rtol=1e-4)
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(compiled_model.state_dict()[key], value, atol=1e-4, rtol=1e-4, msg=key)


@pytest.mark.parametrize("training", [True, False])
def test_torch_export(device, training):
    """torch.export keeps tritonbn's forward op in the graph; the exported
    program computes what the eager module does and, in training, updates its
    running stats once per call, as eager does."""
    model = _block(device).train(training)
    x = torch.randn(2, 3, 6, 6, device=device)
    eager = copy.deepcopy(model)
    program = torch.export.export(model, (x,))
    targets = {str(node.target) for node in program.graph.nodes}
    assert "tritonbn.batch_norm_forward.default" in targets
    exported = program.module()
    for _ in range(2):
        torch.testing.assert_close(exported(x), eager(x), rtol=1e-5, atol=1e-5)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(exported.get_buffer(f"1.{name}"), eager[1].get_buffer(name))
