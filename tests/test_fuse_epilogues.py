"""tritonbn.fuse_epilogues on ResNet-style blocks: the fused GraphModule
computes what the torch model does (outputs, gradients, running stats over
train steps, then eval), fuses exactly the patterns it may, keeps the
model's modules and state_dict, and compiles as one graph."""
import copy

import torch
import torch.nn.functional as F
from torch import nn

import tritonbn
from tritonbn.modules import module_batch_norm
from models import SmallCNN, assert_same_step


class Bottleneck(nn.Module):
    """torchvision's shape of block: bn -> ReLU(inplace) twice, then out += identity -> ReLU."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class Unfusable(nn.Module):
    """A BatchNorm output read twice and a sum read twice: nothing may be fused."""

    def __init__(self, channels: int):
        super().__init__()
        self.bn1 = nn.BatchNorm1d(channels)
        self.bn2 = nn.BatchNorm1d(channels)

    def forward(self, x):
        y = self.bn1(x)
        z = torch.add(self.bn2(x), x)
        return torch.relu(y) + y + z.relu() + z


def _fused_calls(graph_module) -> int:
    return sum(node.target is module_batch_norm for node in graph_module.graph.nodes)


def _train_and_eval(reference, fused, device, steps=2):
    for model in (reference, fused):
        model.train()
    for _ in range(steps):
        x = torch.randn(2, 4, 5, 5, device=device)
        assert_same_step(fused, reference, x, torch.randn_like(x), rtol=1e-4, atol=1e-4)
    for (name, p), q in zip(reference.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-4, msg=name)
    for (name, b), c in zip(reference.named_buffers(), fused.buffers()):
        torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-5, msg=name)
    for model in (reference, fused):
        model.eval()
    x = torch.randn(2, 4, 5, 5, device=device)
    torch.testing.assert_close(fused(x), reference(x), rtol=1e-4, atol=1e-4)


def test_bottleneck_is_fused_and_matches_torch(device):
    torch.manual_seed(0)
    reference = Bottleneck(4).to(device)
    model = copy.deepcopy(reference)
    fused = tritonbn.fuse_epilogues(model)
    assert _fused_calls(fused) == 3  # bn1 + ReLU, bn2 + F.relu, bn3 + identity + ReLU
    assert not any(n.op == "call_module" and isinstance(fused.get_submodule(n.target), nn.ReLU)
                   for n in fused.graph.nodes)
    assert fused.bn3 is model.bn3 and type(model.bn3) is tritonbn.BatchNorm2d
    assert fused.state_dict().keys() == reference.state_dict().keys()
    _train_and_eval(reference, fused, device)


def test_patterns_with_other_readers_are_left_alone(device):
    model = Unfusable(3).to(device)
    fused = tritonbn.fuse_epilogues(copy.deepcopy(model))
    assert _fused_calls(fused) == 0
    x = torch.randn(4, 3, device=device)
    torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)


def test_fused_model_compiles_as_one_graph(device):
    torch._dynamo.reset()
    torch.manual_seed(0)
    reference = Bottleneck(4).to(device)
    fused = tritonbn.fuse_epilogues(copy.deepcopy(reference))
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    _train_and_eval(reference, compiled, device, steps=1)
    torch._dynamo.reset()


def test_sequential_conv_bn_relu_with_momentum_none(device):
    """nn.Sequential(conv, bn, ReLU) x3 with momentum=None: every bn + ReLU fused,
    and three SGD steps in lockstep with torch (losses, parameters, buffers)."""
    torch.manual_seed(0)
    reference = SmallCNN(momentum=None).to(device)
    fused = tritonbn.fuse_epilogues(copy.deepcopy(reference))
    assert _fused_calls(fused) == 3
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (reference, fused)]
    for _ in range(3):
        x, target = torch.randn(4, 3, 6, 6, device=device), torch.randint(0, 10, (4,), device=device)
        losses = []
        for model, optimizer in zip((reference, fused), optimizers):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), target)
            loss.backward()
            optimizer.step()
            losses.append(loss)
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    for (name, a), b in zip(reference.state_dict().items(), fused.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
