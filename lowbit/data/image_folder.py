"""Your own images, laid out ``root/<class>/<image>``, without torchvision.

``ImageFolder(root)`` finds the class folders (sorted by name -> class indices 0..K-1)
and the images in each (``.png .jpg .jpeg .bmp .webp``, any case; hidden files and other
files are ignored), decodes them with Pillow and returns ``(uint8 tensor [C, H, W], label)``
with ``C`` = 1 for grey-scale files and 3 for colour ones. The transforms below are plain
torch ops on such tensors and compose with :class:`Compose`::

    tf = Compose([RGB(), Resize(32), CenterCrop(32), ToTensor(), Normalize(MEAN, STD)])
    for x, y in folder_loader("photos/", batch_size=64, shuffle=True, seed=0, transform=tf):
        ...

Random transforms (:class:`RandomCrop`, :class:`RandomHorizontalFlip`) draw from the
generator they are handed: :func:`folder_loader` hands them one seeded by ``seed`` and the
epoch, so every epoch is reproducible on its own, like :class:`~lowbit.data.loaders.TensorLoader`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lowbit.errors import DataError

IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def _pil_image():
    try:  # Pillow is optional (the `data` extra)
        from PIL import Image
    except ImportError as exc:
        raise ImportError("reading image folders needs Pillow: pip install 'lowbit[data]'") from exc
    return Image


# --------------------------------------------------------------------------- transforms


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        h = w = size
    else:
        h, w = (int(s) for s in size)
    if h < 1 or w < 1:
        raise ValueError(f"sizes must be >= 1, got {size}")
    return h, w


def _check_chw(x: torch.Tensor, who: str) -> None:
    if x.ndim != 3:
        raise ValueError(f"{who}: expected an image tensor [C, H, W], got shape {tuple(x.shape)}")


class Compose:
    """Apply transforms in order; random ones get the same generator."""

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        for t in self.transforms:
            x = t(x, gen) if getattr(t, "random", False) else t(x)
        return x

    def __repr__(self) -> str:
        return f"Compose({self.transforms})"


class Resize:
    """Scale so the *shorter* side is ``size`` (aspect ratio kept), bilinear with antialiasing.

    uint8 in -> uint8 out (rounded); float in -> float out.
    """

    def __init__(self, size: int):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"Resize: size must be a positive int (the shorter side), got {size!r}")
        self.size = size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_chw(x, "Resize")
        h, w = x.shape[-2:]
        if h <= w:
            nh, nw = self.size, max(1, int(self.size * w / h))
        else:
            nh, nw = max(1, int(self.size * h / w)), self.size
        if (nh, nw) == (h, w):
            return x
        out = F.interpolate(x[None].float(), size=(nh, nw), mode="bilinear", align_corners=False,
                            antialias=True)[0]
        if x.dtype == torch.uint8:
            return out.round_().clamp_(0, 255).to(torch.uint8)
        return out.to(x.dtype)

    def __repr__(self) -> str:
        return f"Resize({self.size})"


def _pad_to(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Zero-pad symmetrically up to at least ``h x w``."""
    ph, pw = max(0, h - x.shape[-2]), max(0, w - x.shape[-1])
    if ph == 0 and pw == 0:
        return x
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


class CenterCrop:
    """Crop the central ``size`` (int or ``(h, w)``); smaller images are zero-padded first."""

    def __init__(self, size: int | Sequence[int]):
        self.size = _pair(size)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_chw(x, "CenterCrop")
        th, tw = self.size
        x = _pad_to(x, th, tw)
        h, w = x.shape[-2:]
        top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
        return x[..., top:top + th, left:left + tw]

    def __repr__(self) -> str:
        return f"CenterCrop({self.size})"


class RandomCrop:
    """Crop a random ``size`` window after zero-padding ``padding`` pixels on every side."""

    random = True

    def __init__(self, size: int | Sequence[int], padding: int = 0, seed: int = 0):
        if padding < 0:
            raise ValueError(f"RandomCrop: padding must be >= 0, got {padding}")
        self.size, self.padding = _pair(size), padding
        self._gen = torch.Generator().manual_seed(seed)  # used only when no generator is handed in

    def __call__(self, x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        _check_chw(x, "RandomCrop")
        gen = self._gen if gen is None else gen
        p = self.padding
        if p:
            x = F.pad(x, (p, p, p, p))
        th, tw = self.size
        x = _pad_to(x, th, tw)
        h, w = x.shape[-2:]
        top = int(torch.randint(0, h - th + 1, (1,), generator=gen))
        left = int(torch.randint(0, w - tw + 1, (1,), generator=gen))
        return x[..., top:top + th, left:left + tw]

    def __repr__(self) -> str:
        return f"RandomCrop({self.size}, padding={self.padding})"


class RandomHorizontalFlip:
    """Mirror left-right with probability ``p``."""

    random = True

    def __init__(self, p: float = 0.5, seed: int = 0):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"RandomHorizontalFlip: p must be in [0, 1], got {p}")
        self.p = p
        self._gen = torch.Generator().manual_seed(seed)

    def __call__(self, x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        _check_chw(x, "RandomHorizontalFlip")
        gen = self._gen if gen is None else gen
        return x.flip(-1) if float(torch.rand((), generator=gen)) < self.p else x

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class ToTensor:
    """uint8 [C, H, W] in 0..255 -> float32 in [0, 1] (float input passes through as float32)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_chw(x, "ToTensor")
        return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()

    def __repr__(self) -> str:
        return "ToTensor()"


class Normalize:
    """``(x - mean[c]) / std[c]`` per channel; a single mean/std applies to every channel."""

    def __init__(self, mean: float | Sequence[float], std: float | Sequence[float]):
        self.mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        self.std = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        if self.mean.numel() != self.std.numel() and 1 not in (self.mean.numel(), self.std.numel()):
            raise ValueError(f"Normalize: {self.mean.numel()} means but {self.std.numel()} stds")
        if (self.std <= 0).any():
            raise ValueError(f"Normalize: std must be > 0, got {self.std.tolist()}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_chw(x, "Normalize")
        if x.dtype == torch.uint8:
            raise TypeError("Normalize expects a float image: put ToTensor() before it")
        c = x.shape[0]
        for name, v in (("mean", self.mean), ("std", self.std)):
            if v.numel() not in (1, c):
                raise ValueError(f"Normalize: {v.numel()} {name} values for an image with {c} channels "
                                 "(add Grayscale() or RGB() before it to fix the channel count)")
        return (x - self.mean[:, None, None]) / self.std[:, None, None]

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean.tolist()}, std={self.std.tolist()})"


class Grayscale:
    """3 channels -> 1 with ITU-R 601-2 luma weights (as Pillow's ``convert('L')``); 1 channel passes."""

    WEIGHTS = (0.299, 0.587, 0.114)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_chw(x, "Grayscale")
        if x.shape[0] == 1:
            return x
        if x.shape[0] != 3:
            raise ValueError(f"Grayscale: expected 1 or 3 channels, got {x.shape[0]}")
        w = torch.tensor(self.WEIGHTS, dtype=torch.float32)[:, None, None]
        y = (x.float() * w).sum(0, keepdim=True)
        return y.round_().clamp_(0, 255).to(torch.uint8) if x.dtype == torch.uint8 else y.to(x.dtype)

    def __repr__(self) -> str:
        return "Grayscale()"


class RGB:
    """1 channel -> 3 (repeated); 3 channels pass."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_chw(x, "RGB")
        if x.shape[0] == 3:
            return x
        if x.shape[0] != 1:
            raise ValueError(f"RGB: expected 1 or 3 channels, got {x.shape[0]}")
        return x.expand(3, -1, -1).clone()

    def __repr__(self) -> str:
        return "RGB()"


# --------------------------------------------------------------------------- dataset


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMG_EXTENSIONS and not p.name.startswith(".")


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """Decode one image file to uint8 ``[C, H, W]`` (C = 1 grey, 3 colour; alpha dropped)."""
    Image = _pil_image()
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in _GREY_MODES:
                if im.mode.startswith("I") or im.mode == "F":
                    arr = np.asarray(im, dtype=np.float64)
                    top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
                    arr = np.clip(np.round(arr * (255.0 / top)), 0, 255).astype(np.uint8)
                else:
                    arr = np.asarray(im.convert("L"), dtype=np.uint8)
                arr = arr[None]
            else:
                arr = np.asarray(im.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)
    except ImportError:
        raise
    except Exception as exc:  # UnidentifiedImageError, truncated data, decompression bomb, ...
        raise DataError(f"{path}: cannot be read as an image ({type(exc).__name__}: {exc}); "
                        "the file is damaged or not an image: remove or replace it") from exc
    return torch.from_numpy(np.array(arr, dtype=np.uint8, order="C", copy=True))  # writable, contiguous


class ImageFolder:
    """Images in ``root/<class>/*.{png,jpg,jpeg,bmp,webp}``; classes sorted by folder name.

    ``dataset[i]`` is ``(transform(image), label)`` with ``image`` a uint8 ``[C, H, W]``
    tensor. ``samples`` lists ``(path, label)``; ``targets`` the labels.
    """

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None):
        self.root = Path(root)
        self.transform = transform
        if not self.root.is_dir():
            raise DataError(f"{self.root}: no such folder; expected root/<class>/<image> "
                            f"with images {', '.join(IMG_EXTENSIONS)}")
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not self.classes:
            raise DataError(f"{self.root}: has no class folders; lay images out as "
                            f"{self.root}/<class name>/<image>.png (one folder per class)")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[Path, int]] = []
        for c in self.classes:
            files = sorted(p for p in (self.root / c).iterdir() if p.is_file() and _is_image(p))
            if not files:
                raise DataError(f"{self.root / c}: class folder {c!r} holds no images "
                                f"({', '.join(IMG_EXTENSIONS)}); add some or remove the folder")
            self.samples += [(p, self.class_to_idx[c]) for p in files]
        self.targets = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int, gen: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
        """Like ``dataset[index]``, handing ``gen`` to random transforms."""
        path, label = self.samples[index]
        x = read_image(path)
        if self.transform is not None:
            x = self.transform(x, gen) if (gen is not None and _takes_gen(self.transform)) else self.transform(x)
        return x, label

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        return self.load(index % len(self))

    def __repr__(self) -> str:
        return f"ImageFolder({str(self.root)!r}, {len(self)} images, {len(self.classes)} classes)"


def _takes_gen(transform: Callable) -> bool:
    return isinstance(transform, Compose) or getattr(transform, "random", False)


class FolderLoader:
    """Batches ``(float32 x [B, C, H, W], int64 y [B])`` over an :class:`ImageFolder`.

    Images left as uint8 by the transform are scaled to [0, 1]. Shuffling and random
    transforms draw from a generator seeded by ``seed`` and the epoch (see ``set_epoch``).
    """

    def __init__(self, dataset: ImageFolder, batch_size: int = 64, *, shuffle: bool = False,
                 seed: int = 0, drop_last: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset, self.batch_size, self.shuffle = dataset, batch_size, shuffle
        self.seed, self.drop_last, self.epoch = seed, drop_last, 0

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        n = len(self.dataset)
        order = torch.randperm(n, generator=gen).tolist() if self.shuffle else list(range(n))
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            items = [self.dataset.load(i, gen) for i in idx]
            shapes = {tuple(x.shape) for x, _ in items}
            if len(shapes) > 1:
                raise DataError(f"{self.dataset.root}: images of different shapes {sorted(shapes)[:4]} cannot "
                                "be batched; add e.g. Compose([RGB(), Resize(S), CenterCrop(S)]) as transform")
            x = torch.stack([x for x, _ in items])
            x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
            yield x, torch.tensor([y for _, y in items], dtype=torch.int64)


def folder_loader(root: str | os.PathLike | ImageFolder, batch_size: int = 64, shuffle: bool = False,
                  seed: int = 0, transform: Callable | None = None, *, drop_last: bool = False) -> FolderLoader:
    """A seeded, worker-free batch iterator over ``root/<class>/<image>`` (or an :class:`ImageFolder`)."""
    if isinstance(root, ImageFolder):
        if transform is not None:
            raise ValueError("pass the transform to ImageFolder or to folder_loader, not both")
        dataset = root
    else:
        dataset = ImageFolder(root, transform)
    return FolderLoader(dataset, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last)
