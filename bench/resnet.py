"""ResNet with bottleneck blocks (He et al., 2016; the v1.5 variant that
strides the 3x3 convolution), for the model benchmark where torchvision is
not installed: layers (3, 4, 6, 3) at width 64 is ResNet-50, the same 53
BatchNorm2d layers with the same shapes as torchvision's resnet50. Smaller
layers and widths give the tiny ResNet the interpreter can train.
"""
from __future__ import annotations

import torch
from torch import nn


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 convolutions, each followed by BatchNorm,
    ReLU after the first two and after the residual sum."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """Stem (7x7/2 convolution, BatchNorm, ReLU, 3x3/2 max pool), four stages
    of bottleneck blocks at widths width * (1, 2, 4, 8), the first block of
    stages 2-4 at stride 2, global average pool, linear classifier."""

    def __init__(self, layers=(3, 4, 6, 3), width: int = 64, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        stages, channels = [], width
        for index, blocks in enumerate(layers):
            stage_width = width * 2 ** index
            stage = []
            for block in range(blocks):
                stage.append(Bottleneck(channels, stage_width, 2 if index > 0 and block == 0 else 1))
                channels = stage_width * Bottleneck.expansion
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet50(num_classes: int = 1000) -> nn.Module:
    """torchvision's resnet50 where torchvision is installed, else this file's."""
    try:
        import torchvision
    except ImportError:
        return ResNet((3, 4, 6, 3), 64, num_classes)
    return torchvision.models.resnet50(num_classes=num_classes)


def tiny_resnet(num_classes: int = 10) -> nn.Module:
    """One bottleneck block per stage at width 4: 17 BatchNorm2d layers, every
    kind ResNet-50 has (stem, block, downsample), small enough for the interpreter."""
    return ResNet((1, 1, 1, 1), 4, num_classes)
