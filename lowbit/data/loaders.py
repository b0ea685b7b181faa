"""In-memory batch loaders with seeded shuffling and on-the-fly augmentation.

The reference datasets are small enough to live in memory as uint8 tensors, so a
loader is a permutation and a few tensor ops per batch: no worker processes, and the
same seed gives the same batches on every machine.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class TensorLoader:
    """Iterate ``(x, y)`` batches over uint8 images ``[N, C, H, W]`` and int64 labels.

    ``x`` is float32, scaled to [0, 1] and normalised with ``(x - mean) / std``.
    With ``augment=True`` each image gets a random crop from a ``pad``-pixel zero-padded
    copy and, if ``flip``, a random horizontal flip (the standard CIFAR-style augmentation;
    turn ``flip`` off where mirroring changes the class, e.g. digits).
    Shuffling and augmentation draw from a private generator seeded by ``seed`` and the
    epoch number, so every epoch is reproducible on its own (needed for resume).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 128, *,
                 shuffle: bool = False, augment: bool = False, pad: int = 2, seed: int = 0,
                 mean: float = 0.0, std: float = 1.0, drop_last: bool = False, flip: bool = True):
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.augment, self.pad = batch_size, shuffle, augment, pad
        self.seed, self.mean, self.std, self.drop_last, self.flip = seed, mean, std, drop_last, flip
        self.epoch = 0

    def __len__(self) -> int:
        n = self.images.shape[0]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        n = self.images.shape[0]
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.images[idx].float().div_(255.0)
            if self.augment:
                x = random_crop_flip(x, self.pad, gen, flip=self.flip)
            yield (x - self.mean) / self.std, self.labels[idx]


def random_crop_flip(x: torch.Tensor, pad: int, gen: torch.Generator, *, flip: bool = True) -> torch.Tensor:
    """Random ``pad``-pixel translation (zero fill) and, if ``flip``, horizontal flip, per image."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]
    out = padded[torch.arange(n)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None], rows, cols]
    if flip:
        mirrored = torch.rand(n, generator=gen) < 0.5
        out[mirrored] = out[mirrored].flip(-1)
    return out
