"""Reference models for small grey-scale images (1x28x28 Fashion-MNIST by default).

No torchvision: each model is a few lines of plain ``nn`` modules, so quantization sees
ordinary ``Conv2d``/``Linear``/``BatchNorm2d`` layers, like any user model.

- ``resnet20``: the CIFAR ResNet of He et al. (2016), 3 stages x 3 basic blocks of 16/32/64
  channels, 1x1-conv projection shortcuts where the shape changes (option B).
- ``vgg``: a VGG-style stack of 3x3 conv + BN + ReLU with max-pooling, 32-64-128 channels.
- ``mobilenet``: MobileNet-v1-style depthwise-separable blocks (depthwise 3x3 + pointwise 1x1).
- ``mlp``: two hidden layers of 512 and 256 units.
"""

from __future__ import annotations

import torch
from torch import nn


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(cin, cout, 3, stride)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = conv_bn(cout, cout, 3)
        self.shortcut = nn.Sequential(*conv_bn(cin, cout, 1, stride)) if stride != 1 or cin != cout else nn.Identity()
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, blocks_per_stage: int = 3, widths=(16, 32, 64), in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(in_channels, widths[0])
        self.relu = nn.ReLU(inplace=True)
        layers, cin = [], widths[0]
        for stage, width in enumerate(widths):
            blocks = []
            for b in range(blocks_per_stage):
                blocks.append(BasicBlock(cin, width, 2 if stage > 0 and b == 0 else 1))
                cin = width
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class VGG(nn.Module):
    def __init__(self, cfg=(32, 32, "M", 64, 64, "M", 128, 128, "M"), in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        layers, cin = [], in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                layers += [*conv_bn(cin, v), nn.ReLU(inplace=True)]
                cin = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(cin, 256), nn.ReLU(inplace=True), nn.Linear(256, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class MobileNet(nn.Module):
    """Depthwise-separable CNN: stem conv, then (depthwise 3x3 -> pointwise 1x1) blocks."""

    def __init__(self, cfg=((32, 1), (64, 2), (64, 1), (128, 2), (128, 1), (256, 1)),
                 in_channels: int = 1, num_classes: int = 10, stem: int = 16):
        super().__init__()
        layers, cin = [*conv_bn(in_channels, stem), nn.ReLU(inplace=True)], stem
        for cout, stride in cfg:
            layers += [*conv_bn(cin, cin, 3, stride, groups=cin), nn.ReLU(inplace=True),
                       *conv_bn(cin, cout, 1), nn.ReLU(inplace=True)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class MLP(nn.Module):
    def __init__(self, in_features: int = 784, hidden=(512, 256), num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        layers, cin = [nn.Flatten()], in_features * in_channels
        for h in hidden:
            layers += [nn.Linear(cin, h), nn.ReLU(inplace=True)]
            cin = h
        layers.append(nn.Linear(cin, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
