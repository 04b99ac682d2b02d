"""Small models shared by the module and torch.compile tests, and a helper to
run two models side by side."""
import torch
from torch import nn


class SmallCNN(nn.Module):
    """conv-bn-relu x3, global average pool, linear."""

    def __init__(self, bn=nn.BatchNorm2d, **bn_kwargs):
        super().__init__()
        layers, channels = [], [3, 8, 16, 16]
        for c_in, c_out in zip(channels, channels[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), bn(c_out, **bn_kwargs), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def assert_same_step(ours, theirs, x, grad_out, rtol, atol):
    """One forward and backward of each model on the same x and grad_out: outputs
    and input gradients equal within rtol / atol."""
    outputs = []
    for model in (ours, theirs):
        leaf = x.clone().requires_grad_()
        y = model(leaf)
        y.backward(grad_out)
        outputs.append((y, leaf.grad))
    for a, b in zip(*outputs):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
