"""Export folders are untrusted input: damaged, edited and forged folders get lowbit's ExportFileError, naming
the file and the field, never a raw torch error or a large allocation; a fuzz test mutates a real export."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

import lowbit
from lowbit.data import make_loader
from lowbit.deploy import ExportError, ExportFileError, IntegerEngine, read_export
from lowbit.deploy.write import write_files
from lowbit.errors import LowbitError
from lowbit.zoo import create_model


class Net(nn.Module):
    """conv-bn-relu, a residual block, max and average pooling, flatten, linear: every graph op the format has."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(8, 16, 3, padding=1)
        self.avg = nn.AvgPool2d(2)
        self.fc = nn.Linear(16 * 4, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.pool(F.relu(x + self.bn2(self.conv2(x))))
        return self.fc(torch.flatten(self.avg(F.relu(self.conv3(x))), 1))


@pytest.fixture(scope="module")
def batch():
    return next(iter(make_loader("digits", "test", 32)))[0]


@pytest.fixture(scope="module")
def source(tmp_path_factory, batch):
    """A W4A4-ACIQ export (per-channel widths, fractional zero points, per-channel input steps) and its outputs."""
    torch.manual_seed(0)
    calib = list(make_loader("digits", "calib", 64, limit=64))
    qmodel = lowbit.quantize(Net().eval(), "ptq-w4a4-aciq", calib_data=calib).eval()
    folder = tmp_path_factory.mktemp("export")
    lowbit.export(qmodel, folder)
    with torch.no_grad():
        expected = _outputs(folder, batch)
    assert torch.equal(expected[0], qmodel(batch))
    return folder, expected


@pytest.fixture(scope="module")
def mlp_export(tmp_path_factory):
    torch.manual_seed(0)
    calib = list(make_loader("digits", "calib", 64, limit=64))
    qmodel = lowbit.quantize(create_model("mlp", in_size=8).eval(), "ptq-w8a8", calib_data=calib).eval()
    folder = tmp_path_factory.mktemp("mlp")
    lowbit.export(qmodel, folder)
    return folder


def copy_export(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("manifest.json", "model.safetensors"):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def reseal(folder: Path, manifest: dict) -> None:
    """Write ``manifest`` with digests recomputed, as a forger would: integrity then passes, validation must not."""
    write_files(folder, load_file(str(folder / "model.safetensors")), manifest)


def reseal_bytes(folder: Path, data: bytes) -> None:
    """Replace the tensor file by ``data`` and fix the manifest's size and SHA-256 of it."""
    (folder / "model.safetensors").write_bytes(data)
    manifest = manifest_of(folder)
    manifest["tensors"].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    (folder / "manifest.json").write_text(json.dumps(manifest))


def conv(manifest: dict, name: str = "conv2") -> dict:
    return manifest["layers"][name]


# ----- integrity: edits are detected ------------------------------------------------------------------------
@pytest.mark.parametrize("edit", [
    lambda m: conv(m)["weight"].update(bits="per-channel", nominal_bits=3),
    lambda m: conv(m, "conv1")["weight"].update(qmin=-7),
    lambda m: conv(m)["input"].update(signed=True),
    lambda m: conv(m)["weight"]["scale"].__setitem__(1, 1),
    lambda m: m["graph"][3].update(op="relu"),
    lambda m: m["architecture"].update(name="other"),
])
def test_any_manifest_edit_is_detected(source, tmp_path, edit):
    folder = copy_export(source[0], tmp_path)
    manifest = manifest_of(folder)
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportFileError, match=r"manifest\.json: its content does not match the digest sealed into "
                                              r"model\.safetensors"):
        lowbit.load_export(folder, Net())


def test_damaged_tensor_file_is_detected(source, tmp_path):
    folder = copy_export(source[0], tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:-1] + bytes([data[-1] ^ 0x80]))
    with pytest.raises(ExportFileError, match=r"model\.safetensors: SHA-256 .*\(field tensors\.sha256\)"):
        read_export(folder)
    (folder / "model.safetensors").write_bytes(data[:1000])
    with pytest.raises(ExportFileError, match=r"model\.safetensors: 1000 bytes, .*tensors\.bytes.*truncated"):
        read_export(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ExportFileError, match=r"model\.safetensors: missing \(manifest\.json lists it, field "
                                              r"tensors\)"):
        read_export(folder)


def test_swapped_tensor_file_is_detected(source, mlp_export, tmp_path):
    folder = copy_export(source[0], tmp_path)
    other = (mlp_export / "model.safetensors").read_bytes()
    reseal_bytes(folder, other)  # the manifest even names the other file's digest: the seal does not match
    with pytest.raises(ExportFileError, match="content does not match the digest sealed"):
        read_export(folder)


# ----- validation: a forger who recomputes the digests ------------------------------------------------------
FORGED = [
    ("a declared shape that does not match its slice", lambda m: conv(m)["weight_shape"].__setitem__(1, 4),
     r"layers\['conv2'\]\.input\.scale_shape|layers\['conv2'\]\.weight\.data: names \d+ elements"),
    ("a huge declared shape", lambda m: conv(m, "fc").update(weight_shape=[2**30, 2**30]),
     r"layers\['fc'\]\.weight\.scale_shape|layers\['fc'\]\.weight\.\w+: names"),
    ("negative bits", lambda m: conv(m, "conv1")["weight"].update(bits=-3), r"layers\['conv1'\]\.weight\.bits"),
    ("zero bits", lambda m: conv(m, "conv1")["weight"].update(bits=0), r"layers\['conv1'\]\.weight\.bits"),
    ("absurd bits", lambda m: conv(m, "conv1")["weight"].update(bits=4096), r"layers\['conv1'\]\.weight\.bits"),
    ("bits as text", lambda m: conv(m, "conv1")["weight"].update(bits="8"), r"layers\['conv1'\]\.weight\.bits"),
    ("bits as a bool", lambda m: conv(m, "conv1")["input"].update(bits=True), r"layers\['conv1'\]\.input\.bits"),
    ("qmin above qmax", lambda m: conv(m, "conv1")["weight"].update(qmin=5, qmax=-5),
     r"layers\['conv1'\]\.weight\.qmax"),
    ("a range wider than the bits", lambda m: conv(m, "conv1")["input"].update(qmin=0, qmax=1023),
     r"layers\['conv1'\]\.input\.qmax"),
    ("per-channel widths without channels", lambda m: conv(m)["weight"].update(granularity="tensor"),
     r"layers\['conv2'\]\.weight\.scale_shape"),
    ("a reference outside its tensor", lambda m: conv(m)["weight"]["scale"].__setitem__(1, 10**12),
     r"layers\['conv2'\]\.weight\.scale: elements \[1000000000000, "),
    ("a reference into another tensor", lambda m: conv(m)["weight"]["scale"].__setitem__(0, "input.scale"),
     r"layers\['conv2'\]\.weight\.scale: points into 'input\.scale'"),
    ("a malformed reference", lambda m: conv(m)["weight"].update(scale="weight.scale"),
     r"layers\['conv2'\]\.weight\.scale: a tensor reference"),
    ("a signedness that is not a bool", lambda m: conv(m)["input"].update(signed=1),
     r"layers\['conv2'\]\.input\.signed"),
    ("an unknown layer type", lambda m: conv(m).update(type="conv3d"), r"layers\['conv2'\]\.type"),
    ("an unknown graph op", lambda m: m["graph"][2].update(op="gelu"), r"graph\[2\]\.op: unknown op 'gelu'"),
    ("a graph input that names no node", lambda m: m["graph"][2].update(inputs=["nowhere"]),
     r"graph\[2\]\.inputs: \['nowhere'\] name no earlier node"),
    ("a pooling window beyond the bound", lambda m: next(n for n in m["graph"] if n["op"] == "avgpool2d")
     ["attrs"].update(kernel=[100000, 2]), r"graph\[\d+\]\.attrs\.kernel"),
    ("a layer the graph does not use", lambda m: m["layers"].update(extra=conv(m)), r"layers: describes"),
    ("a missing field", lambda m: conv(m)["weight"].pop("storage"), r"layers\['conv2'\]\.weight\.storage"),
    ("a file name that climbs out", lambda m: m["tensors"].update(file="../model.safetensors"), r"tensors\.file"),
    ("an absolute file name", lambda m: m["tensors"].update(file="/etc/passwd"), r"tensors\.file"),
    ("a file name with a folder", lambda m: m["tensors"].update(file="sub/model.safetensors"), r"tensors\.file"),
]


@pytest.mark.parametrize("what,edit,field", FORGED, ids=[f[0] for f in FORGED])
def test_forged_field_is_refused_naming_file_and_field(source, tmp_path, what, edit, field):
    folder = copy_export(source[0], tmp_path)
    manifest = manifest_of(folder)
    edit(manifest)
    if "file" in manifest["tensors"] and manifest["tensors"]["file"] != "model.safetensors":
        (folder / "manifest.json").write_text(json.dumps(manifest))  # the seal cannot name an outside file
    else:
        reseal(folder, manifest)
    with pytest.raises(ExportFileError, match=rf"manifest\.json: field ({field})"):
        lowbit.load_export(folder, Net())
    with pytest.raises(ExportFileError, match=rf"manifest\.json: field ({field})"):
        IntegerEngine.from_path(folder)


def test_a_huge_shape_fails_on_counts_before_anything_is_decoded(source, tmp_path):
    folder = copy_export(source[0], tmp_path)
    manifest = manifest_of(folder)
    conv(manifest, "fc")["weight_shape"] = [2**31 - 1, 2**31 - 1]  # 2^62 weights, ~2^61 bytes at 4 bits
    conv(manifest, "fc")["weight"]["scale_shape"] = [2**31 - 1]
    reseal(folder, manifest)
    with pytest.raises(ExportFileError, match=r"field layers\['fc'\]\.weight\.scale: names 10 elements, the declared "
                                              r"shape needs 2147483647"):
        read_export(folder)


def test_engine_names_the_node_an_input_of_another_shape_fails_at(source, batch, tmp_path):
    engine = IntegerEngine.from_path(source[0])
    with pytest.raises(ExportError, match=r"fx node 'fc' \(linear\) cannot run on an input batch of shape "
                                          r"\(32, 1, 4, 8\)"):
        engine(batch[:, :, :4])
    folder = copy_export(source[0], tmp_path)  # a forged graph whose pooling no longer fits the classifier
    manifest = manifest_of(folder)
    next(n for n in manifest["graph"] if n["op"] == "avgpool2d")["attrs"].update(kernel=[1, 1], stride=[1, 1])
    reseal(folder, manifest)
    with pytest.raises(ExportFileError, match="structure differs"):
        lowbit.load_export(folder, Net())
    with pytest.raises(ExportError, match=r"fx node 'fc' \(linear\) cannot run .*mat1 and mat2"):
        IntegerEngine.from_path(folder)(batch)


def test_forged_tensor_values_are_refused(source, tmp_path):
    folder = copy_export(source[0], tmp_path)
    manifest = manifest_of(folder)
    tensors = load_file(str(folder / "model.safetensors"))
    key, offset, _ = conv(manifest)["weight"]["scale"]
    tensors[key][offset] = 0.0
    write_files(folder, tensors, manifest)
    with pytest.raises(ExportFileError, match=r"field layers\['conv2'\]\.weight\.scale: holds 0\.0; every value must "
                                              "be finite and non-zero"):
        read_export(folder)
    tensors[key][offset] = float("nan")
    write_files(folder, tensors, manifest)
    with pytest.raises(ExportFileError, match=r"weight\.scale: holds nan"):
        read_export(folder)
    tensors = load_file(str(source[0] / "model.safetensors"))
    key, offset, _ = conv(manifest, "conv1")["weight"]["data"]  # 8-bit layer: int8 codes
    tensors[key][offset] = -128
    manifest = manifest_of(source[0])
    conv(manifest, "conv1")["weight"]["qmin"] = -127  # a restricted grid whose codes now fall outside it
    write_files(folder, tensors, manifest)
    with pytest.raises(ExportFileError, match=r"layers\['conv1'\]\.weight\.data: holds codes outside"):
        read_export(folder)


def test_nan_in_the_manifest_is_not_json(source, tmp_path):
    folder = copy_export(source[0], tmp_path)
    text = (folder / "manifest.json").read_text().replace('"float_bias": true', '"float_bias": NaN')
    (folder / "manifest.json").write_text(text)
    with pytest.raises(ExportFileError, match="manifest.json: not valid JSON"):
        read_export(folder)


def test_zoo_record_cannot_make_lowbit_build_a_huge_model(mlp_export, tmp_path):
    folder = copy_export(mlp_export, tmp_path)
    manifest = manifest_of(folder)
    assert manifest["architecture"] == {"zoo": "mlp", "kwargs": {"in_channels": 1, "num_classes": 10, "in_size": 8}}
    manifest["architecture"]["kwargs"]["in_size"] = 2**20  # a 2^40 x 512 first layer, were it built
    reseal(folder, manifest)
    with pytest.raises(ExportFileError, match=r"field architecture .* does not describe this export: .* layer "
                                              r"'net.1' with weight shape \(512, 1099511627776\), the file holds "
                                              r"\(512, 64\)"):
        lowbit.load_export(folder)
    manifest["architecture"] = {"zoo": "no-such-net", "kwargs": {}}
    reseal(folder, manifest)
    with pytest.raises(ExportFileError, match="unknown model 'no-such-net'"):
        lowbit.load_export(folder)


# ----- fuzz -----------------------------------------------------------------------------------------------------
def _paths(obj, prefix=()):
    """Every path (tuple of keys and indices) into a JSON tree."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.sampled_from([0, 1, -1, 2**31, 2**62, 10**30])
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8)
    | st.sampled_from(["conv", "linear", "per-channel", "weight.scale", "bias.int32", "relu", "output", "channel"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)


def write_manifest(folder: Path, manifest: dict, forged: bool) -> bool:
    """Write an edited ``manifest`` into ``folder``, resealed (digests recomputed) when ``forged``; False when
    the forger's own tool cannot reseal the edit (nothing to test then)."""
    if not forged:
        (folder / "manifest.json").write_text(json.dumps(manifest))
        return True
    try:
        reseal(folder, manifest)
    except (KeyError, TypeError, AttributeError, ValueError):
        return False
    return True


def _mutate(manifest: dict, data) -> dict:
    """A copy of ``manifest`` with one to three fields replaced by any JSON value, deleted, or nudged by one."""
    out = copy.deepcopy(manifest)
    for _ in range(data.draw(st.integers(1, 3))):
        paths = [p for p in _paths(out) if p]
        path = data.draw(st.sampled_from(paths))
        parent = out
        for k in path[:-1]:
            parent = parent[k]
        key, old = path[-1], parent[path[-1]]
        action = data.draw(st.sampled_from(["replace", "delete", "nudge"]))
        if action == "delete" and isinstance(parent, dict):
            del parent[key]
        elif action == "nudge" and isinstance(old, int) and not isinstance(old, bool):
            parent[key] = old + data.draw(st.sampled_from([-1, 1]))
        else:
            parent[key] = data.draw(JSON_VALUES)
    return out


def _outputs(folder: Path, batch: torch.Tensor) -> list:
    """The outputs of the rebuilt model and of the integer engine, each run on its own, each None when lowbit
    refused the folder: any other exception fails the test."""
    runs = (lambda: lowbit.load_export(folder, Net())(batch), lambda: IntegerEngine.from_path(folder)(batch))
    out = []
    for run in runs:
        try:
            with torch.no_grad():
                out.append(run())
        except LowbitError:
            out.append(None)
    return out


def _same_or_refused(outputs: list, expected: list) -> bool:
    return all(o is None or torch.equal(o, e) for o, e in zip(outputs, expected))


FUZZ = settings(max_examples=int(os.environ.get("LOWBIT_FUZZ_EXAMPLES", 40)), deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(data=st.data(), forged=st.booleans())
def test_fuzz_manifest_edits_give_identical_outputs_or_lowbit_error(source, batch, data, forged):
    """Edited manifests (and, ``forged``, with the digests recomputed after the edit, so that only the field
    checks stand between the file and the engine): identical outputs or lowbit's error, never another one."""
    src, expected = source
    mutated = _mutate(manifest_of(src), data)
    with tempfile.TemporaryDirectory() as tmp:
        folder = copy_export(src, Path(tmp))
        if not write_manifest(folder, mutated, forged):
            return
        outputs = _outputs(folder, batch)
    assert forged or _same_or_refused(outputs, expected)


def _mutate_bytes(data: bytes, draw) -> bytes:
    kind = draw(st.sampled_from(["flip", "truncate", "extend", "overwrite"]))
    if kind == "flip":
        i = draw(st.integers(0, len(data) - 1))
        return data[:i] + bytes([data[i] ^ (1 << draw(st.integers(0, 7)))]) + data[i + 1:]
    if kind == "truncate":
        return data[:draw(st.integers(0, len(data) - 1))]
    if kind == "extend":
        return data + draw(st.binary(min_size=1, max_size=16))
    i = draw(st.integers(0, len(data) - 1))
    patch = draw(st.binary(min_size=1, max_size=8))
    return data[:i] + patch + data[i + len(patch):]


@FUZZ
@given(data=st.data(), forged=st.booleans())
def test_fuzz_tensor_bytes_give_identical_outputs_or_lowbit_error(source, batch, data, forged):
    """Damaged tensor files (and, ``forged``, with the manifest's size and SHA-256 fixed to match)."""
    src, expected = source
    raw = (src / "model.safetensors").read_bytes()
    mutated = _mutate_bytes(raw, data.draw)
    with tempfile.TemporaryDirectory() as tmp:
        folder = copy_export(src, Path(tmp))
        if forged:
            reseal_bytes(folder, mutated)
        else:
            (folder / "model.safetensors").write_bytes(mutated)
        outputs = _outputs(folder, batch)
    assert forged or _same_or_refused(outputs, expected)
