"""IDX parsing, the fixed dataset splits, and the seeded in-memory loader."""

from __future__ import annotations

import gzip
import hashlib
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from lowbit.data import DATASETS, dataset_info, load_fashion_mnist, load_split, make_loader
from lowbit.data import datasets as ds
from lowbit.data import fashion_mnist as fm
from lowbit.data.loaders import TensorLoader, random_crop_flip
from lowbit.errors import DataError

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(not (FMNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
                                  reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


def idx_bytes(arr: np.ndarray) -> bytes:
    arr = np.asarray(arr, dtype=np.uint8)
    header = struct.pack(">I", 0x0800 + arr.ndim) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return header + arr.tobytes()


def write_idx(path: Path, arr: np.ndarray) -> Path:
    data = idx_bytes(arr)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


# --------------------------------------------------------------------------- IDX parsing

@pytest.mark.parametrize("name", ["images-idx3-ubyte", "images-idx3-ubyte.gz"])
def test_read_idx_roundtrip_raw_and_gz(tmp_path, name):
    arr = np.arange(5 * 3 * 4, dtype=np.uint8).reshape(5, 3, 4) * 3
    out = fm.read_idx(write_idx(tmp_path / name, arr), 3, 5)
    assert out.dtype == np.uint8 and out.shape == (5, 3, 4)
    np.testing.assert_array_equal(out, arr)


def test_read_idx_labels(tmp_path):
    labels = np.array([3, 1, 4, 1, 5, 9, 2, 6], dtype=np.uint8)
    out = fm.read_idx(write_idx(tmp_path / "lbl.gz", labels), 1, 8)
    np.testing.assert_array_equal(out, labels)


def test_read_idx_truncated_body_names_file(tmp_path):
    path = tmp_path / "short-idx3-ubyte"
    path.write_bytes(idx_bytes(np.ones((4, 5, 5)))[:-7])
    with pytest.raises(DataError, match="short-idx3-ubyte.*truncated"):
        fm.read_idx(path, 3, 4)


def test_read_idx_truncated_gzip_names_file(tmp_path):
    path = tmp_path / "cut-idx3-ubyte.gz"
    blob = gzip.compress(idx_bytes(np.random.default_rng(0).integers(0, 255, (50, 9, 9))))
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="cut-idx3-ubyte.gz"):
        fm.read_idx(path, 3, 50)


def test_read_idx_short_header(tmp_path):
    path = tmp_path / "tiny-idx3-ubyte"
    path.write_bytes(b"\x00\x00\x08\x03\x00")
    with pytest.raises(DataError, match="tiny-idx3-ubyte"):
        fm.read_idx(path, 3, 1)


def test_read_idx_bad_magic_names_file(tmp_path):
    path = tmp_path / "magic-idx3-ubyte"
    data = bytearray(idx_bytes(np.zeros((2, 3, 3))))
    data[2] = 0x0D  # float32 type code instead of uint8
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="magic-idx3-ubyte.*magic"):
        fm.read_idx(path, 3, 2)
    # a labels file where an images file is expected (1 dim instead of 3) is also refused
    lbl = write_idx(tmp_path / "labels-idx1-ubyte", np.zeros(2))
    with pytest.raises(DataError, match="labels-idx1-ubyte"):
        fm.read_idx(lbl, 3, 2)


def test_read_idx_wrong_count(tmp_path):
    path = write_idx(tmp_path / "x-idx1-ubyte", np.zeros(7))
    with pytest.raises(DataError, match="holds 7 items, expected 8"):
        fm.read_idx(path, 1, 8)


def test_missing_data_dir_says_how_to_install(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", tmp_path / "nowhere")
    with pytest.raises(DataError) as err:
        load_fashion_mnist("test", tmp_path)  # exists, but empty
    assert "apt-get install dataset-fashion-mnist" in str(err.value)
    assert isinstance(err.value, FileNotFoundError)


def _tiny_fmnist(folder: Path, monkeypatch, n_train=6, n_test=4, bad_label=False) -> Path:
    monkeypatch.setattr(fm, "FILES", {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", n_train),
                                      "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", n_test)})
    rng = np.random.default_rng(1)
    write_idx(folder / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (n_train, 28, 28)))
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.arange(n_train) % 10)
    write_idx(folder / "t10k-images-idx3-ubyte", rng.integers(0, 256, (n_test, 28, 28)))  # raw, not gz
    labels = np.arange(n_test) % 10
    if bad_label:
        labels[-1] = 10
    write_idx(folder / "t10k-labels-idx1-ubyte", labels)
    return folder


def test_load_fashion_mnist_from_env_dir(tmp_path, monkeypatch):
    _tiny_fmnist(tmp_path, monkeypatch)
    monkeypatch.setenv(fm.ENV_VAR, str(tmp_path))
    monkeypatch.setattr(fm, "DEFAULT_DIRS", ())
    x, y = load_fashion_mnist("train")
    assert x.shape == (6, 1, 28, 28) and x.dtype == torch.uint8
    assert y.dtype == torch.int64 and y.tolist() == [0, 1, 2, 3, 4, 5]
    xt, yt = load_fashion_mnist("test", tmp_path)
    assert xt.shape == (4, 1, 28, 28) and yt.tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("calib", tmp_path)


def test_label_out_of_range(tmp_path, monkeypatch):
    _tiny_fmnist(tmp_path, monkeypatch, bad_label=True)
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.*out of range"):
        load_fashion_mnist("test", tmp_path)


def test_missing_labels_file(tmp_path, monkeypatch):
    _tiny_fmnist(tmp_path, monkeypatch)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_fashion_mnist("test", tmp_path)


# --------------------------------------------------------------------------- real Fashion-MNIST

@pytest.fixture(scope="module")
def fmnist():
    train_x, train_y = load_fashion_mnist("train")
    return {"official": (train_x, train_y),
            **{s: load_split("fashion-mnist", s) for s in ("train", "calib", "test")}}


def _hashes(images: torch.Tensor) -> Counter:
    flat = images.reshape(images.shape[0], -1).numpy()
    return Counter(hashlib.sha1(row.tobytes()).hexdigest() for row in flat)


@needs_fmnist
def test_fmnist_split_sizes_and_labels(fmnist):
    sizes = {s: fmnist[s][0].shape[0] for s in ("train", "calib", "test")}
    assert sizes == {"train": 55000, "calib": 5000, "test": 10000}
    for s in ("train", "calib", "test"):
        x, y = fmnist[s]
        assert x.shape[1:] == (1, 28, 28) and x.dtype == torch.uint8
        assert y.min() >= 0 and y.max() <= 9
    assert torch.bincount(fmnist["test"][1], minlength=10).tolist() == [1000] * 10
    assert dataset_info("fashion-mnist").calib_size == 5000


@needs_fmnist
def test_fmnist_calib_and_train_partition_the_official_training_set(fmnist):
    calib_idx, train_idx = ds._fixed_split(60000, 5000)
    assert len(set(calib_idx.tolist()) & set(train_idx.tolist())) == 0
    assert sorted(calib_idx.tolist() + train_idx.tolist()) == list(range(60000))
    off_x, off_y = fmnist["official"]
    assert torch.equal(fmnist["calib"][0], off_x[calib_idx]) and torch.equal(fmnist["calib"][1], off_y[calib_idx])
    assert torch.equal(fmnist["train"][0], off_x[train_idx]) and torch.equal(fmnist["train"][1], off_y[train_idx])
    # by content as well: calib + train is exactly the official training multiset of images
    assert _hashes(fmnist["calib"][0]) + _hashes(fmnist["train"][0]) == _hashes(off_x)
    # and the calibration split is not a slice of the file (it is spread over the whole set)
    assert calib_idx.min() < 1000 and calib_idx.max() > 59000


@needs_fmnist
def test_fmnist_loader_normalises_with_dataset_stats(fmnist):
    loader = make_loader("fashion-mnist", "calib", batch_size=100, limit=300)
    assert len(loader) == 3
    batches = list(loader)
    x = torch.cat([b[0] for b in batches])
    raw, _ = fmnist["calib"]
    info = DATASETS["fashion-mnist"]
    torch.testing.assert_close(x, (raw[:300].float() / 255 - info.mean) / info.std)


# --------------------------------------------------------------------------- digits

def test_digits_splits():
    parts = {s: load_split("digits", s) for s in ("train", "calib", "test")}
    assert {s: p[0].shape[0] for s, p in parts.items()} == {"train": 1257, "calib": 180, "test": 360}
    for x, y in parts.values():
        assert x.shape[1:] == (1, 8, 8) and x.dtype == torch.uint8
        assert 0 <= y.min() and y.max() <= 9
    # max pixel 16 in the source maps to 255
    assert int(parts["train"][0].max()) == 255
    from sklearn.datasets import load_digits
    full = torch.from_numpy(load_digits().images).mul(255 / 16).round().to(torch.uint8).unsqueeze(1)
    union = _hashes(parts["train"][0]) + _hashes(parts["calib"][0]) + _hashes(parts["test"][0])
    assert union == _hashes(full)
    with pytest.raises(ValueError, match="split"):
        load_split("digits", "val")
    with pytest.raises(ValueError, match="image_folder"):
        dataset_info("cifar10")


def test_make_loader_limit_and_determinism():
    a = make_loader("digits", "train", batch_size=100, shuffle=True, augment=True, seed=3, limit=250)
    b = make_loader("digits", "train", batch_size=100, shuffle=True, augment=True, seed=3, limit=250)
    assert len(a) == 3
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    with pytest.raises(ValueError, match="limit"):
        make_loader("digits", "train", limit=0)


# --------------------------------------------------------------------------- TensorLoader

def _toy(n=37, c=1, h=6, w=6):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8), torch.arange(n)


def _batches(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def test_loader_same_seed_same_batches():
    x, y = _toy()
    one = _batches(TensorLoader(x, y, 8, shuffle=True, augment=True, seed=5))
    two = _batches(TensorLoader(x, y, 8, shuffle=True, augment=True, seed=5))
    assert len(one) == 5
    for (xa, ya), (xb, yb) in zip(one, two):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_loader_epoch_and_seed_change_order():
    x, y = _toy()
    loader = TensorLoader(x, y, 37, shuffle=True, seed=5)
    e0 = next(iter(loader))[1]
    loader.set_epoch(1)
    e1 = next(iter(loader))[1]
    loader.set_epoch(0)
    assert torch.equal(next(iter(loader))[1], e0)  # epochs are reproducible on their own
    other = next(iter(TensorLoader(x, y, 37, shuffle=True, seed=6)))[1]
    assert not torch.equal(e0, e1) and not torch.equal(e0, other)
    assert sorted(e0.tolist()) == sorted(e1.tolist()) == list(range(37))  # a permutation, nothing lost


def test_loader_no_shuffle_keeps_order_and_normalises():
    x, y = _toy()
    loader = TensorLoader(x, y, 10, mean=0.5, std=0.25)
    got = _batches(loader)
    assert [b[0].shape[0] for b in got] == [10, 10, 10, 7]
    assert torch.equal(torch.cat([b[1] for b in got]), y)
    torch.testing.assert_close(torch.cat([b[0] for b in got]), (x.float() / 255 - 0.5) / 0.25)
    assert len(TensorLoader(x, y, 10, drop_last=True)) == 3
    assert sum(1 for _ in TensorLoader(x, y, 10, drop_last=True)) == 3
    with pytest.raises(ValueError):
        TensorLoader(x, y[:-1])


def _shifted_versions(img: torch.Tensor, pad: int) -> list[torch.Tensor]:
    _, h, w = img.shape
    padded = torch.nn.functional.pad(img, (pad, pad, pad, pad))
    out = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy:dy + h, dx:dx + w]
            out += [crop, crop.flip(-1)]
    return out


@pytest.mark.parametrize("pad", [0, 1, 2])
def test_random_crop_flip_is_a_shift_or_flip_of_the_input(pad):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 2, 7, 9, generator=g) + 0.1  # distinct, non-zero pixels: matches are unambiguous
    out = random_crop_flip(x, pad, torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    used = Counter()
    for i in range(x.shape[0]):
        cands = _shifted_versions(x[i], pad)
        hits = [k for k, c in enumerate(cands) if torch.equal(out[i], c)]
        assert hits, f"image {i} is not a {pad}-pixel shift / flip of its input"
        used[hits[0]] += 1
        # every non-zero output pixel is an input pixel (zero fill only)
        vals = set(x[i].flatten().tolist())
        assert set(out[i][out[i] != 0].tolist()) <= vals
    # flips happen and, with padding, several shifts are used
    assert any(k % 2 == 1 for k in used) and any(k % 2 == 0 for k in used)
    if pad:
        assert len({k // 2 for k in used}) > 3


def test_random_crop_flip_without_flip_only_shifts():
    x = torch.rand(64, 1, 6, 6, generator=torch.Generator().manual_seed(2)) + 0.1
    out = random_crop_flip(x, 1, torch.Generator().manual_seed(3), flip=False)
    for i in range(x.shape[0]):
        cands = _shifted_versions(x[i], 1)
        assert any(torch.equal(out[i], c) for c in cands[0::2])  # even entries: not mirrored
        if not torch.equal(out[i], x[i]):
            assert not torch.equal(out[i], x[i].flip(-1))


def test_digits_augmentation_never_mirrors():
    # a mirrored digit is a different (or no) digit: the digits loader shifts but never flips
    assert DATASETS["digits"].hflip is False and DATASETS["fashion-mnist"].hflip is True
    loader = make_loader("digits", "calib", batch_size=180, shuffle=False, augment=True, seed=0)
    assert loader.flip is False and loader.pad == 1
    x_aug, _ = next(iter(loader))
    raw, _ = load_split("digits", "calib")
    info = DATASETS["digits"]
    x = raw.float() / 255
    aug = x_aug * info.std + info.mean
    mirrored_only = 0
    for i in range(x.shape[0]):
        cands = _shifted_versions(x[i], 1)
        plain = any(torch.allclose(aug[i], c, atol=1e-5) for c in cands[0::2])
        mirror = any(torch.allclose(aug[i], c, atol=1e-5) for c in cands[1::2])
        assert plain or mirror
        mirrored_only += mirror and not plain
    assert mirrored_only == 0
