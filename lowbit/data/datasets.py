"""Named datasets and their fixed splits: ``train``, ``calib`` (held out of training) and ``test``.

``calib`` is a fixed subset of the official *training* images that the reference models
never train on; post-training methods calibrate on it and fine-tuning runs validate on it.
The test set is used for reported accuracy only.

| name          | images            | train  | calib | test   |
|---------------|-------------------|--------|-------|--------|
| fashion-mnist | 1x28x28 uint8     | 55,000 | 5,000 | 10,000 |
| digits        | 1x8x8 (0-16 -> 0-255) | 1,257 | 180 | 360    |
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.data.fashion_mnist import MEAN as FMNIST_MEAN, STD as FMNIST_STD, load_fashion_mnist
from lowbit.data.loaders import TensorLoader

SPLIT_SEED = 20171025  # fixed forever: changing it would move images between train and calib
SPLITS = ("train", "calib", "test")


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    in_channels: int
    image_size: int
    num_classes: int
    mean: float
    std: float
    calib_size: int
    hflip: bool = True  # whether mirrored images keep their class (augmentation may flip them)


DATASETS = {
    "fashion-mnist": DatasetInfo("fashion-mnist", 1, 28, 10, FMNIST_MEAN, FMNIST_STD, 5000),
    "digits": DatasetInfo("digits", 1, 8, 10, 0.3060, 0.3762, 180, hflip=False),  # a mirrored 2 is no 2
}


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)} "
                         "or use lowbit.data.image_folder for your own images")
    return DATASETS[name]


def load_split(name: str, split: str, data_dir=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(uint8 images [N,C,H,W], int64 labels [N])`` of one split."""
    info = dataset_info(name)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if name == "fashion-mnist":
        if split == "test":
            return load_fashion_mnist("test", data_dir)
        images, labels = load_fashion_mnist("train", data_dir)
    else:
        images, labels = _load_digits()
        test_idx, rest = _fixed_split(images.shape[0], 360)
        if split == "test":
            return images[test_idx], labels[test_idx]
        images, labels = images[rest], labels[rest]
    calib_idx, train_idx = _fixed_split(images.shape[0], info.calib_size)
    idx = calib_idx if split == "calib" else train_idx
    return images[idx], labels[idx]


def _fixed_split(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed permutation of ``range(n)`` cut into its last ``k`` and the rest (sorted)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    return perm[n - k:].sort().values, perm[:n - k].sort().values


def _load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    try:  # scikit-learn is optional (the `data` extra)
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError("the digits dataset ships with scikit-learn: pip install 'lowbit[data]'") from exc
    bunch = load_digits()
    images = torch.from_numpy(bunch.images).mul(255.0 / 16.0).round().to(torch.uint8).unsqueeze(1)
    return images, torch.from_numpy(bunch.target).long()


def make_loader(name: str, split: str, batch_size: int = 128, *, shuffle: bool = False,
                augment: bool = False, seed: int = 0, limit: int | None = None,
                data_dir=None) -> TensorLoader:
    """A :class:`TensorLoader` over one split, normalised with the dataset's statistics.

    ``limit`` keeps the first ``limit`` images of the split (a fixed subset, e.g. 512
    calibration images).
    """
    info = dataset_info(name)
    images, labels = load_split(name, split, data_dir)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        images, labels = images[:limit], labels[:limit]
    return TensorLoader(images, labels, batch_size, shuffle=shuffle, augment=augment,
                        pad=2 if info.image_size >= 16 else 1, seed=seed, mean=info.mean, std=info.std,
                        flip=info.hflip)
