"""Fashion-MNIST read from its IDX files (Xiao, Rasul, Vollgraf 2017; MIT licence).

70,000 real 28x28 grey-scale images in 10 classes: 60,000 for training, 10,000 for test.
No network: the files come from Debian's ``dataset-fashion-mnist`` package
(``/usr/share/datasets/fashion-mnist``), from ``$LOWBIT_FASHION_MNIST`` or from an explicit
``data_dir``. The IDX format is four big-endian fields (magic, counts, rows, cols) followed
by raw uint8 pixels; it is parsed with numpy, never unpickled.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from lowbit.errors import DataError

ENV_VAR = "LOWBIT_FASHION_MNIST"
DEFAULT_DIRS = ("/usr/share/datasets/fashion-mnist",)
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000),
}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# Per-pixel statistics of the training set, after scaling to [0, 1].
MEAN, STD = 0.2860, 0.3530

HOW_TO_GET = (
    "Install Debian's package: `apt-get install dataset-fashion-mnist` (no root: "
    "`apt-get download dataset-fashion-mnist && dpkg -x dataset-fashion-mnist_*.deb DIR`), "
    f"or point ${ENV_VAR} / --data-dir at a folder holding the four "
    "{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] files."
)


def find_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Return the first folder holding the Fashion-MNIST files, or raise with install steps."""
    candidates = [data_dir] if data_dir is not None else [os.environ.get(ENV_VAR), *DEFAULT_DIRS]
    for cand in candidates:
        if cand and _locate(Path(cand), FILES["train"][0]) is not None:
            return Path(cand)
    where = data_dir if data_dir is not None else ", ".join(str(c) for c in candidates if c)
    raise DataError(f"Fashion-MNIST not found in {where}. {HOW_TO_GET}")


def _locate(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def read_idx(path: Path, expected_dims: int, expected_count: int) -> np.ndarray:
    """Parse one IDX file (optionally gzipped) into a uint8 array, checking its header and length."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot be read ({exc}); the file is damaged or truncated. {HOW_TO_GET}") from exc
    if len(raw) < 4 + 4 * expected_dims:
        raise DataError(f"{path}: {len(raw)} bytes is too short for an IDX header. {HOW_TO_GET}")
    magic = int.from_bytes(raw[0:4], "big")
    if magic != 0x0800 + expected_dims:
        raise DataError(f"{path}: bad IDX magic number {magic:#x} (expected {0x0800 + expected_dims:#x}).")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(expected_dims)]
    if dims[0] != expected_count:
        raise DataError(f"{path}: holds {dims[0]} items, expected {expected_count}.")
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * expected_dims)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path}: truncated: {body.size} of {int(np.prod(dims))} bytes of data. {HOW_TO_GET}")
    return body.reshape(dims)


def load_fashion_mnist(split: str, data_dir: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images, labels)``: uint8 ``[N, 1, 28, 28]`` and int64 ``[N]`` for ``split`` in {train, test}."""
    if split not in FILES:
        raise ValueError(f"split must be one of {sorted(FILES)}, got {split!r}")
    folder = find_data_dir(data_dir)
    img_stem, lbl_stem, count = FILES[split]
    img_path, lbl_path = _locate(folder, img_stem), _locate(folder, lbl_stem)
    if img_path is None or lbl_path is None:
        raise DataError(f"{folder}: missing {img_stem if img_path is None else lbl_stem}[.gz]. {HOW_TO_GET}")
    images = read_idx(img_path, 3, count)
    labels = read_idx(lbl_path, 1, count)
    if labels.max() >= len(CLASSES):
        raise DataError(f"{lbl_path}: label {labels.max()} is out of range 0-9.")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))
