"""ImageFolder, its torch transforms and the seeded folder loader, on a tiny folder of real files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lowbit.data import ImageFolder, folder_loader
from lowbit.data.image_folder import (RGB, CenterCrop, Compose, Grayscale, Normalize, RandomCrop,
                                      RandomHorizontalFlip, Resize, ToTensor, read_image)
from lowbit.errors import DataError

Image = pytest.importorskip("PIL.Image")

# class folder -> [(file name, (width, height), mode)]; listed out of order on purpose
LAYOUT = {
    "zebra": [("z1.png", (12, 10), "RGB"), ("z0.JPG", (9, 14), "RGB")],
    "apple": [("a0.png", (10, 10), "L"), ("a1.bmp", (16, 8), "RGB"), ("a2.webp", (11, 13), "RGB")],
    "mango": [("m0.jpeg", (20, 15), "RGB"), ("m1.png", (8, 8), "RGBA")],
}


def _pixels(w: int, h: int, mode: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    arr = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    return arr[..., 0] if channels == 1 else arr


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "imgs"
    seed = 0
    for cls, files in LAYOUT.items():
        (root / cls).mkdir(parents=True)
        for name, (w, h), mode in files:
            seed += 1
            Image.fromarray(_pixels(w, h, mode, seed)).save(root / cls / name)
        (root / cls / "notes.txt").write_text("not an image")  # ignored
    (root / ".hidden").mkdir()  # ignored: not a class
    (root / "README.md").write_text("ignored")  # files at the top level are not classes
    return root


def test_classes_sorted_and_indices(folder):
    ds = ImageFolder(folder)
    assert ds.classes == ["apple", "mango", "zebra"]
    assert ds.class_to_idx == {"apple": 0, "mango": 1, "zebra": 2}
    assert len(ds) == 7
    assert ds.targets == [0, 0, 0, 1, 1, 2, 2]
    names = [p.name for p, _ in ds.samples]
    assert names == ["a0.png", "a1.bmp", "a2.webp", "m0.jpeg", "m1.png", "z0.JPG", "z1.png"]
    for i, (path, label) in enumerate(ds.samples):
        x, y = ds[i]
        assert y == label == ds.class_to_idx[path.parent.name]
        assert x.dtype == torch.uint8 and x.ndim == 3
    assert ds[0][0].shape == (1, 10, 10)  # grey file -> 1 channel
    assert ds[1][0].shape == (3, 8, 16)  # [C, H, W] of a 16x8 (w x h) image
    assert ds[4][0].shape == (3, 8, 8)  # alpha dropped
    assert torch.equal(ds[-1][0], ds[6][0])
    with pytest.raises(IndexError):
        ds[7]


def test_lossless_pixels_read_exactly(folder):
    ds = ImageFolder(folder)
    png = ds[6][0]  # zebra/z1.png, seed 1, RGB 12x10
    assert torch.equal(png, torch.from_numpy(_pixels(12, 10, "RGB", 1)).permute(2, 0, 1))
    grey = ds[0][0]  # apple/a0.png, seed 3
    assert torch.equal(grey[0], torch.from_numpy(_pixels(10, 10, "L", 3)))
    rgba = ds[4][0]  # mango/m1.png, seed 7: RGBA -> RGB keeps the colour channels
    assert torch.equal(rgba, torch.from_numpy(_pixels(8, 8, "RGBA", 7)[..., :3]).permute(2, 0, 1))


def test_resize_shorter_side_then_center_crop(folder):
    tf = Compose([RGB(), Resize(6), CenterCrop(6), ToTensor()])
    ds = ImageFolder(folder, tf)
    for i in range(len(ds)):
        x, _ = ds[i]
        assert x.shape == (3, 6, 6) and x.dtype == torch.float32
        assert 0.0 <= x.min() and x.max() <= 1.0
    # Resize keeps the aspect ratio: 16x8 (w x h) -> shorter side 6 -> 12 wide
    assert Resize(6)(torch.zeros(3, 8, 16, dtype=torch.uint8)).shape == (3, 6, 12)
    assert Resize(6)(torch.zeros(1, 20, 15)).shape == (1, 8, 6)
    # CenterCrop takes the middle: rows/cols 1..3 of a 5x5 ramp
    ramp = torch.arange(25, dtype=torch.float32).reshape(1, 5, 5)
    assert torch.equal(CenterCrop(3)(ramp), ramp[:, 1:4, 1:4])
    # and zero-pads an image smaller than the crop
    small = CenterCrop((4, 6))(torch.ones(1, 2, 2))
    assert small.shape == (1, 4, 6) and small.sum() == 4 and small[0, 1:3, 2:4].eq(1).all()


def test_resize_constant_image_stays_constant_uint8():
    x = torch.full((3, 9, 13), 77, dtype=torch.uint8)
    y = Resize(4)(x)
    assert y.dtype == torch.uint8 and y.shape == (3, 4, 5) and y.eq(77).all()


def test_normalise_constant_image_exact():
    x = torch.full((3, 4, 4), 51, dtype=torch.uint8)  # 51 / 255 = 0.2
    mean, std = (0.2, 0.1, 0.4), (0.5, 0.25, 0.1)
    y = Compose([ToTensor(), Normalize(mean, std)])(x)
    expected = [(0.2 - 0.2) / 0.5, (0.2 - 0.1) / 0.25, (0.2 - 0.4) / 0.1]  # 0, 0.4, -2
    for c in range(3):
        torch.testing.assert_close(y[c], torch.full((4, 4), expected[c]), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="channels"):
        Normalize(mean, std)(torch.zeros(1, 2, 2))
    with pytest.raises(TypeError, match="ToTensor"):
        Normalize(0.5, 0.5)(x)
    with pytest.raises(ValueError, match="std"):
        Normalize(0.0, 0.0)


def test_grayscale_and_rgb_conversion():
    rgb = torch.tensor([[[255]], [[0]], [[0]]], dtype=torch.uint8)  # pure red
    assert Grayscale()(rgb).tolist() == [[[76]]]  # round(0.299 * 255), as PIL's convert('L')
    img = torch.from_numpy(_pixels(5, 4, "RGB", 9)).permute(2, 0, 1)
    pil = np.array(Image.fromarray(img.permute(1, 2, 0).numpy()).convert("L"))
    assert (Grayscale()(img)[0].int() - torch.from_numpy(pil).int()).abs().max() <= 1
    grey = torch.arange(6, dtype=torch.uint8).reshape(1, 2, 3)
    three = RGB()(grey)
    assert three.shape == (3, 2, 3) and all(torch.equal(three[c], grey[0]) for c in range(3))
    assert Grayscale()(grey) is grey and RGB()(three) is three


def test_random_crop_and_flip_are_seeded_and_valid():
    x = torch.arange(1, 1 + 3 * 6 * 6, dtype=torch.float32).reshape(3, 6, 6)
    crop = RandomCrop(6, padding=2)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a = [crop(x, g1) for _ in range(20)]
    b = [crop(x, g2) for _ in range(20)]
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    windows = [padded[:, i:i + 6, j:j + 6] for i in range(5) for j in range(5)]
    seen = set()
    for out in a:
        matches = [k for k, w in enumerate(windows) if torch.equal(out, w)]
        assert matches, "a random crop must be a window of the padded image"
        seen.add(matches[0])
    assert len(seen) > 3
    flip = RandomHorizontalFlip(0.5)
    outs = [flip(x, torch.Generator().manual_seed(s)) for s in range(20)]
    assert all(torch.equal(o, x) or torch.equal(o, x.flip(-1)) for o in outs)
    assert any(torch.equal(o, x) for o in outs) and any(torch.equal(o, x.flip(-1)) for o in outs)
    assert torch.equal(RandomHorizontalFlip(1.0)(x), x.flip(-1))


def test_folder_loader_batches_and_deterministic_shuffle(folder):
    tf = Compose([RGB(), Resize(8), RandomCrop(8), RandomHorizontalFlip(), ToTensor()])
    a = folder_loader(folder, batch_size=3, shuffle=True, seed=11, transform=tf)
    b = folder_loader(folder, batch_size=3, shuffle=True, seed=11, transform=tf)
    assert len(a) == 3
    ba, bb = list(a), list(b)
    assert [x.shape[0] for x, _ in ba] == [3, 3, 1]
    for (xa, ya), (xb, yb) in zip(ba, bb):
        assert xa.shape[1:] == (3, 8, 8) and xa.dtype == torch.float32 and ya.dtype == torch.int64
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    labels = torch.cat([y for _, y in ba])
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 2, 2]
    # another epoch or seed changes the order; going back to epoch 0 reproduces it
    orders = []
    for seed, epoch in [(11, 0), (11, 1), (12, 0), (13, 0), (11, 0)]:
        loader = folder_loader(folder, batch_size=7, shuffle=True, seed=seed, transform=Compose([RGB(), Resize(4), CenterCrop(4)]))
        loader.set_epoch(epoch)
        x, _ = next(iter(loader))
        orders.append(x)
    assert torch.equal(orders[0], orders[4])
    assert not all(torch.equal(orders[0], o) for o in orders[1:4])
    # no shuffle: file order, and uint8 images are scaled to [0, 1]
    plain = folder_loader(folder, batch_size=7, transform=Compose([RGB(), Resize(4), CenterCrop(4)]))
    x, y = next(iter(plain))
    assert y.tolist() == ImageFolder(folder).targets
    ref = Compose([RGB(), Resize(4), CenterCrop(4)])(read_image(ImageFolder(folder).samples[2][0]))
    torch.testing.assert_close(x[2], ref.float() / 255)


def test_folder_loader_needs_uniform_shapes(folder):
    with pytest.raises(DataError, match="different shapes"):
        list(folder_loader(folder, batch_size=7))


def test_missing_root_and_no_classes(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        ImageFolder(tmp_path / "absent")
    (tmp_path / "loose.png").write_bytes(b"")
    with pytest.raises(DataError, match="no class folders"):
        ImageFolder(tmp_path)


def test_empty_class_folder_is_named(folder):
    (folder / "empty_cls").mkdir()
    (folder / "empty_cls" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="empty_cls.*no images"):
        ImageFolder(folder)


def test_corrupt_image_is_named(folder):
    bad = folder / "mango" / "m9_broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    ds = ImageFolder(folder)  # listing does not decode
    idx = [p.name for p, _ in ds.samples].index("m9_broken.png")
    with pytest.raises(DataError, match="m9_broken.png"):
        ds[idx]
    with pytest.raises(DataError, match="m9_broken.png"):
        list(folder_loader(folder, batch_size=2, transform=Compose([RGB(), Resize(4), CenterCrop(4)])))
    # a truncated but well-started image too
    good = folder / "zebra" / "z1.png"
    cut = folder / "zebra" / "z2_cut.png"
    cut.write_bytes(good.read_bytes()[:60])
    with pytest.raises(DataError, match="z2_cut.png"):
        read_image(cut)
