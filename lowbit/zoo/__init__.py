"""Registry of reference models: small ones with shipped Fashion-MNIST checkpoints, and ImageNet ones
whose published weights come from packages.

``create_model("resnet20")`` builds an untrained model; ``pretrained("resnet20")`` also
loads the checkpoint shipped in ``lowbit/zoo/checkpoints`` (trained by ``lowbit train``;
its JSON sidecar records the command, seed and test accuracy). ``pretrained("mobilenetv2")`` and
``pretrained("efficientnet-lite0")`` load the published ImageNet weights from their packages
(:mod:`lowbit.zoo.imagenet`).

Every model the zoo builds carries its recipe for being built again,
``model.lowbit_architecture = {"zoo": name, "kwargs": {...}}`` (an instance attribute, so it
survives ``copy.deepcopy`` and :func:`lowbit.quantize`); :func:`lowbit.export` writes it into
the manifest, and :func:`lowbit.load_export` gives it back to :func:`create_model`.

The Q-networks of :mod:`lowbit.rl` (:func:`create_qnet`, :mod:`lowbit.zoo.qnets`) and its shipped
DQN teachers, one per MinAtar game (:func:`teacher_path`, :mod:`lowbit.zoo.teachers`), live here too.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from lowbit.checkpoint import load_into, sidecar_path
from lowbit.data.datasets import DATASETS, dataset_info
from lowbit.errors import CheckpointError
from lowbit.zoo.imagenet import EfficientNetLite0, MobileNetV2, imagenet_weights
from lowbit.zoo.models import MLP, VGG, MobileNet, ResNet
from lowbit.zoo.qnets import create_qnet  # noqa: F401 - the Q-networks of lowbit.rl
from lowbit.zoo.teachers import shipped_teacher, teacher_path  # noqa: F401 - its DQN teachers

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "resnet20": lambda **kw: ResNet(blocks_per_stage=3, **kw),
    "vgg": VGG,
    "mobilenet": MobileNet,
    "mlp": lambda in_size=28, **kw: MLP(in_features=in_size * in_size, **kw),
    "mobilenetv2": MobileNetV2,
    "efficientnet-lite0": EfficientNetLite0,
}
_TAKES_IN_SIZE = {"mlp"}
IMAGENET = {"in_channels": 3, "num_classes": 1000, "in_size": 224}  # how the ImageNet models were trained
_PRETRAINED_ON = {"mobilenetv2": "imagenet", "efficientnet-lite0": "imagenet"}  # the rest: shipped checkpoints


def list_models(dataset: str = "fashion-mnist") -> list[str]:
    """The zoo models pretrained on ``dataset``: ``"fashion-mnist"`` (shipped checkpoints) or ``"imagenet"``
    (published weights from packages)."""
    return sorted(n for n in _REGISTRY if _PRETRAINED_ON.get(n, "fashion-mnist") == dataset)


def create_model(name: str, *, in_channels: int = 1, num_classes: int = 10, in_size: int = 28) -> nn.Module:
    """The untrained zoo model ``name``, with ``lowbit_architecture`` recording how it was built:
    ``{"zoo": name, "kwargs": {...}, "input_shape": [1, C, H, W]}``, a plain dict that survives
    ``copy.deepcopy`` and :func:`lowbit.quantize`, so that later stages need no architecture name or
    example input from the user (exports, checkpoints, bit-operation counts).

    Raises ``ValueError`` for an unknown name or a size that is not a positive integer.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; the zoo has {sorted(_REGISTRY)}")
    kw = {"in_channels": in_channels, "num_classes": num_classes}
    if name in _TAKES_IN_SIZE:
        kw["in_size"] = in_size
    for key, value in kw.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    model = _REGISTRY[name](**kw)
    model.lowbit_architecture = {"zoo": name, "kwargs": dict(kw), "input_shape": [1, in_channels, in_size, in_size]}
    return model


def create_model_matching(name: str, weight_shapes: dict[str, tuple[int, ...]], **kwargs) -> nn.Module:
    """:func:`create_model`, for a record read from a file: the model is first built on the meta device (no
    memory), and every Conv/Linear weight must have the shape ``weight_shapes`` (layer name -> shape, from the
    data the file holds) gives it, so a forged record cannot make lowbit allocate a model the file does not
    describe. Raises ``ValueError`` naming the first layer that differs (or the bad name or size)."""
    with torch.device("meta"):
        shell = create_model(name, **kwargs)
    for layer, m in shell.named_modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            held = weight_shapes.get(layer)
            if held is None or tuple(held) != tuple(m.weight.shape):
                raise ValueError(f"{name} with {kwargs} has layer {layer!r} with weight shape {tuple(m.weight.shape)}, "
                                 f"the file holds {None if held is None else tuple(held)}")
    return create_model(name, **kwargs)


def build_model(name: str, weights=None, dataset: str = "fashion-mnist") -> nn.Module:
    """The zoo model ``name`` for ``dataset``: its shipped checkpoint, or ``weights`` (a safetensors or
    ``.pt`` state dict, read without unpickling) loaded into the untrained architecture. In eval mode.

    Raises :class:`~lowbit.errors.CheckpointError` when ``weights`` does not fit the architecture
    (naming the first missing, unexpected or mis-shaped tensors) and ``ValueError`` for an unknown
    model name.
    """
    if weights is None:
        return pretrained(name, dataset)
    info = dataset_info(dataset)
    model = create_model(name, in_channels=info.in_channels, num_classes=info.num_classes, in_size=info.image_size)
    return load_into(model, weights).eval()


def checkpoint_path(name: str, dataset: str = "fashion-mnist") -> Path:
    return CHECKPOINT_DIR / f"{name}-{dataset}.safetensors"


def pretrained(name: str, dataset: str | None = None) -> nn.Module:
    """The zoo model ``name`` with its full-precision weights, in eval mode: the shipped checkpoint for
    ``dataset`` (default Fashion-MNIST), or for the ImageNet models their published weights.

    Raises :class:`~lowbit.errors.CheckpointError` when no checkpoint exists and
    :class:`~lowbit.errors.DataError` when an ImageNet model's weights package is not installed.
    """
    if _PRETRAINED_ON.get(name) == "imagenet" and dataset in (None, "imagenet"):
        return load_into(create_model(name, **IMAGENET), imagenet_weights(name)).eval()
    dataset = dataset or "fashion-mnist"
    path = checkpoint_path(name, dataset)
    if not path.is_file():
        raise CheckpointError(f"no shipped checkpoint {path.name}; train one with "
                              f"`lowbit train --model {name} --dataset {dataset}`")
    info = DATASETS.get(dataset)
    shape = {"in_channels": info.in_channels, "in_size": info.image_size} if info is not None else {}
    model = create_model(name, **shape)  # e.g. the digits MLP takes 8x8 inputs, not 28x28
    return load_into(model, path).eval()


def checkpoint_meta(name: str, dataset: str = "fashion-mnist") -> dict:
    side = sidecar_path(checkpoint_path(name, dataset))
    return json.loads(side.read_text()) if side.is_file() else {}


def trained_with_augment(name: str, dataset: str = "fashion-mnist") -> bool:
    """Whether the shipped checkpoint was trained with crop/flip augmentation (its sidecar's
    ``config.augment``; True when unrecorded). Fine-tuning should match it (the MLP was trained
    without augmentation; section "choices" of docs/RESULTS.md compares both on the validation split)."""
    return bool(checkpoint_meta(name, dataset).get("config", {}).get("augment", True))
