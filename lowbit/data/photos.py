"""The natural photos available offline, and ImageNet-style preprocessing of them.

No ImageNet image can be had here (``../shared/DATA.md``), so ImageNet classifiers are measured by
agreement with their float selves on these photos: scikit-learn's ``china.jpg`` and ``flower.jpg``
(427x640) and the colour photographs bundled with scikit-image (``astronaut``, ``chelsea``,
``coffee``, ``rocket``, ``motorcycle_left``, ``motorcycle_right``, ``hubble_deep_field``,
``retina``). :func:`photo_views` multiplies them with standard test-time views (centre and corner
crops at two scales, each also mirrored) and says how many there are.

:class:`Preprocessing` is torchvision's evaluation transform without torchvision: resize the short
side (bilinear, antialiased), centre crop, ``(x / 255 - mean) / std`` per channel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lowbit.errors import DataError, MissingExtraError

SKLEARN_PHOTOS = ("china", "flower")
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "motorcycle_right",
                  "hubble_deep_field", "retina")
PHOTOS = SKLEARN_PHOTOS + SKIMAGE_PHOTOS


@dataclass(frozen=True)
class Preprocessing:
    """How published ImageNet weights expect an image: resize the short side, centre crop, normalise."""

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        """A ``[3, crop, crop]`` float tensor of one ``H x W x 3`` uint8 image."""
        return self.normalize(centre_crop(resize_short_side(to_tensor(image), self.resize), self.crop))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = torch.tensor(self.mean).reshape(3, 1, 1), torch.tensor(self.std).reshape(3, 1, 1)
        return (x - mean) / std


def to_tensor(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``[3, H, W]`` floats in [0, 1] from an ``H x W x 3`` uint8 array (grey images are repeated to 3 channels)."""
    x = torch.from_numpy(np.array(image, copy=True))
    if x.dim() == 2:
        x = x.unsqueeze(-1).expand(*x.shape, 3)
    if x.dim() != 3 or x.shape[-1] not in (3, 4):
        raise DataError(f"an image is H x W x 3 (or x 4, or H x W grey), got shape {tuple(x.shape)}")
    return x[..., :3].permute(2, 0, 1).float() / 255.0


def resize_short_side(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    return F.interpolate(x.unsqueeze(0), size=(round(h * scale), round(w * scale)), mode="bilinear",
                         antialias=True, align_corners=False).squeeze(0)


def centre_crop(x: torch.Tensor, size: int, offset: tuple[int, int] | None = None) -> torch.Tensor:
    """A ``size`` square crop; ``offset`` (top, left) places it elsewhere than the centre."""
    h, w = x.shape[-2:]
    top, left = offset if offset is not None else ((h - size) // 2, (w - size) // 2)
    return x[..., top:top + size, left:left + size]


def load_photo(name: str) -> np.ndarray:
    """One offline photo as an ``H x W x 3`` uint8 array. Raises :class:`MissingExtraError` when the package
    holding it (scikit-learn or scikit-image: ``pip install 'lowbit[vision]'``) is missing."""
    if name not in PHOTOS:
        raise DataError(f"unknown photo {name!r}; the offline photos are {list(PHOTOS)}")
    try:
        if name in SKLEARN_PHOTOS:
            from sklearn.datasets import load_sample_image  # deferred: scikit-learn is optional

            return load_sample_image(f"{name}.jpg")
        import skimage.data  # deferred: scikit-image is optional (the `vision` extra)

        if name.startswith("motorcycle_"):  # the stereo pair: (left, right, disparity)
            return np.asarray(skimage.data.stereo_motorcycle()[0 if name.endswith("left") else 1])
        return np.asarray(getattr(skimage.data, name)())
    except ImportError as exc:
        raise MissingExtraError(f"photo {name!r} needs {'scikit-learn' if name in SKLEARN_PHOTOS else 'scikit-image'}:"
                                " pip install 'lowbit[vision]'") from exc


def available_photos() -> list[str]:
    """The photos whose package is installed."""
    out = []
    for name in PHOTOS:
        try:
            load_photo(name)
        except MissingExtraError:
            continue
        out.append(name)
    return out


def photo_views(images: list[np.ndarray], prep: Preprocessing, *, scales: tuple[int, ...] = (256, 320),
                flips: bool = True) -> torch.Tensor:
    """Standard test-time views of each image: at each short-side size in ``scales``, the centre and the four
    corner crops of ``prep.crop``, each also mirrored if ``flips``: ``len(images) * len(scales) * 5 * (1 + flips)``
    normalised views, ``[N, 3, crop, crop]``, in a fixed order."""
    views = []
    for image in images:
        x = to_tensor(image)
        for size in scales:
            r = resize_short_side(x, size)
            h, w = r.shape[-2:]
            c = prep.crop
            for offset in (None, (0, 0), (0, w - c), (h - c, 0), (h - c, w - c)):
                v = prep.normalize(centre_crop(r, c, offset))
                views.append(v)
                if flips:
                    views.append(v.flip(-1))
    return torch.stack(views)
