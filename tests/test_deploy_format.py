"""The deployment folder: packed weights, exact sizes, manifest, checksums, versions, load, bad input."""

import json
import math

import pytest
import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

import lowbit
from lowbit.data import make_loader
from lowbit.errors import CheckpointError
from lowbit.deploy import ExportError, ExportFileError, IntegerEngine, build_export, fp32_checkpoint_bytes, read_export
from lowbit.deploy.format import ARENA_DTYPES, FORMAT, FORMAT_VERSION, MANIFEST_DIGEST_KEY
from lowbit.nn.modules import QuantMixin
from lowbit.zoo import create_model


@pytest.fixture(scope="module")
def calib():
    return list(make_loader("digits", "calib", 64, limit=64))


@pytest.fixture(scope="module")
def batch():
    return next(iter(make_loader("digits", "test", 64)))[0]


def quantized(name, recipe, calib, seed=0):
    torch.manual_seed(seed)
    return lowbit.quantize(create_model(name, in_size=8).eval(), recipe, calib_data=calib).eval()


@pytest.fixture(scope="module")
def resnet_aciq(calib):
    return quantized("resnet20", "ptq-w4a4-aciq", calib)


def test_reload_is_bit_identical(resnet_aciq, calib, batch, tmp_path):
    """ACIQ + per-channel widths + bias correction + folded BN: load() gives the same outputs, bit for bit."""
    lowbit.export(resnet_aciq, tmp_path)
    model = lowbit.load_export(tmp_path)
    with torch.no_grad():
        assert torch.equal(model(batch), resnet_aciq(batch))
    mlp = quantized("mlp", "ptq-w8a8", calib)
    lowbit.export(mlp, tmp_path / "mlp")
    with torch.no_grad():
        assert torch.equal(lowbit.load_export(tmp_path / "mlp")(batch), mlp(batch))


def test_int32_only_biases_reload_close(resnet_aciq, batch, tmp_path):
    lowbit.export(resnet_aciq, tmp_path / "both")
    entry = json.loads((tmp_path / "both" / "manifest.json").read_text())["layers"]["layer1.0.conv1"]
    assert entry["bias"]["int32"][0] == "bias.int32" and entry["bias"]["float"][0] == "bias.float"
    lowbit.export(resnet_aciq, tmp_path, float_bias=False)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["float_bias"] is False
    entry = manifest["layers"]["layer1.0.conv1"]
    assert entry["bias"]["int32"][0] == "bias.int32" and "float" not in entry["bias"]
    size = (tmp_path / "model.safetensors").stat().st_size
    assert size == expected_file_bytes(resnet_aciq, float_bias=False)[0]
    both = (tmp_path / "both" / "model.safetensors").stat().st_size
    assert both == expected_file_bytes(resnet_aciq)[0]
    assert expected_file_bytes(resnet_aciq)[1] - expected_file_bytes(resnet_aciq, float_bias=False)[1] == 4 * 794
    with torch.no_grad():
        a, b = lowbit.load_export(tmp_path)(batch), resnet_aciq(batch)
    assert (a - b).abs().max() < 1e-2 * b.abs().max()
    assert (a.argmax(1) == b.argmax(1)).float().mean() >= 0.95


def test_every_integer_and_grid_round_trips(resnet_aciq, tmp_path):
    built = build_export(resnet_aciq)
    lowbit.export(resnet_aciq, tmp_path)
    read = read_export(tmp_path)
    assert read.graph.to_list() == built.graph.to_list()
    widths_seen = set()
    for name, a in built.layers.items():
        b = read.layers[name]
        assert torch.equal(a.weight_codes, b.weight_codes), name
        assert torch.equal(a.bias_int32, b.bias_int32), name
        for ga, gb in ((a.weight_grid, b.weight_grid), (a.input_grid, b.input_grid)):
            assert torch.equal(ga.scale, gb.scale) and torch.equal(ga.zero_point, gb.zero_point), name
            assert torch.equal(torch.as_tensor(ga.qmin), torch.as_tensor(gb.qmin)), name
            if ga.channel_bits is not None:
                assert torch.equal(ga.channel_bits, gb.channel_bits), name
                widths_seen |= set(ga.channel_bits.tolist())
    assert len(widths_seen) >= 3  # bit allocation gave mixed per-channel widths


def _w_recipe(bits):
    return {"weights": {"method": "minmax", "bits": bits, "granularity": "channel"},
            "activations": {"method": "minmax", "bits": bits},
            "layers": {"@first": {"weights": {"bits": 8}, "activations": {"bits": 8}},
                       "@last": {"weights": {"bits": 8}, "activations": {"bits": 8}}},
            "ptq": {"fold_bn": True}}


def _stored_values(t: torch.Tensor) -> int:
    """Values the format stores for a zero point: none when all are 0, one when all are equal, else each."""
    if not bool((t != 0).any()):
        return 0
    return 1 if bool((t == t.reshape(-1)[0]).all()) else t.numel()


def expected_file_bytes(qmodel, *, float_bias: bool = True) -> tuple[int, int]:
    """``(file bytes, tensor data bytes)`` of the export of ``qmodel``, from the format's rules applied to the
    model's own quantizers: weight codes take ``numel`` bytes at a uniform 8 bits (int8), else
    ``ceil(sum of the element widths / 8)`` per layer; per-channel widths ``ceil(5 C / 8)`` bytes; each step,
    stored zero point and bias value 4 bytes (the int32 bias always, the float32 one with ``float_bias``); the
    file is safetensors' header for arenas of these sizes (its metadata holding a 64-hex-digit digest) followed
    by the data, nothing else."""
    counts = dict.fromkeys(ARENA_DTYPES, 0)
    for m in qmodel.modules():
        if not isinstance(m, QuantMixin):
            continue
        w, wg, ig = m.weight_quantizer, m.weight_quantizer.grid(), m.input_quantizer.grid()
        n, channels = m.weight.numel(), m.weight.shape[0]
        if w.channel_bits.numel():
            counts["weight.packed"] += math.ceil(int(w.channel_bits.sum()) * (n // channels) / 8)
            counts["weight.channel_bits"] += math.ceil(5 * channels / 8)
        elif w.bits == 8:
            counts["weight.int8"] += n
        else:
            counts["weight.packed"] += math.ceil(n * w.bits / 8)
        counts["weight.scale"] += wg.scale.numel()
        counts["weight.zero_point"] += _stored_values(wg.zero_point)
        counts["input.scale"] += ig.scale.numel()
        counts["input.zero_point"] += _stored_values(ig.zero_point)
        if m.input_quantizer.channel_bits.numel():
            counts["input.channel_bits"] += math.ceil(5 * m.input_quantizer.channel_bits.numel() / 8)
        if m.bias is not None:
            counts["bias.int32"] += channels
            counts["bias.float"] += channels if float_bias else 0
    arenas = {k: torch.zeros(c, dtype=ARENA_DTYPES[k]) for k, c in counts.items() if c}
    data = sum(t.numel() * t.element_size() for t in arenas.values())
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), MANIFEST_DIGEST_KEY: "0" * 64}
    return len(safetensors_bytes(arenas, metadata=metadata)), data


@pytest.mark.parametrize("bits,max_fraction", [(4, 1 / 7.5), (2, 1 / 14)])
def test_resnet20_file_size_is_exactly_the_formats_bytes(bits, max_fraction, calib, tmp_path):
    """Random-weight ResNet-20, first and last layers 8-bit: the file holds exactly the bytes the format's rules
    give, with and without float biases, and that is at most 1/7.5 (W4) or 1/14 (W2) of the fp32 checkpoint."""
    torch.manual_seed(0)
    model = create_model("resnet20").eval()
    fp32 = fp32_checkpoint_bytes(model)
    qmodel = lowbit.quantize(model, _w_recipe(bits), calib_data=calib)
    for float_bias in (True, False):
        folder = tmp_path / str(float_bias)
        lowbit.export(qmodel, folder, float_bias=float_bias)
        size = (folder / "model.safetensors").stat().st_size
        file_bytes, data_bytes = expected_file_bytes(qmodel, float_bias=float_bias)
        assert size == file_bytes
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["tensors"]["bytes"] == size
        assert sum(e["stored_bytes"] for e in manifest["layers"].values()) == data_bytes
        first, mid = manifest["graph"][1]["layer"], "layer2.0.conv1"
        assert manifest["layers"][first]["weight"]["data"] == ["weight.int8", 0, 9 * 16]  # one byte per weight
        assert manifest["layers"][mid]["weight"]["data"][2] == 32 * 16 * 9 * bits // 8
    assert size <= fp32 * max_fraction, (size, fp32)


def test_manifest_describes_the_export(resnet_aciq, tmp_path):
    lowbit.export(resnet_aciq, tmp_path, input_shape=[1, 1, 8, 8])
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["format"] == "lowbit-export" and m["format_version"] == 2 and m["lowbit_version"] == lowbit.__version__
    assert m["architecture"] == {"zoo": "resnet20", "kwargs": {"num_classes": 10, "in_channels": 1}}
    assert len(m["tensors"]["sha256"]) == 64
    assert m["tensors"]["bytes"] == (tmp_path / "model.safetensors").stat().st_size
    conv = m["layers"]["layer2.0.conv1"]
    assert conv["weight"]["bits"] == "per-channel" and conv["weight"]["mean_bits"] <= 4.5
    assert conv["weight"]["zero_point"][0] == "weight.zero_point"  # bias correction: fractional zero points
    assert conv["input"]["granularity"] == "channel" and conv["input"]["method"] == "aciq"
    assert m["layers"]["conv1"]["weight"]["storage"] == "int8" and m["layers"]["conv1"]["weight"]["bits"] == 8
    assert m["layers"]["conv1"]["bn_folded"] == {"module": "bn1", "at": "quantize"}
    assert m["recipe"]["ptq"] == {"fold_bn": True}
    assert [n["op"] for n in m["graph"]].count("add") == 9


def test_batch_norm_left_in_the_model_is_folded_into_the_weight_step(calib, batch, tmp_path):
    qmodel = quantized("resnet20", "ptq-w8a8", calib)  # no fold_bn: BN after every quantized conv
    lowbit.export(qmodel, tmp_path)
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["layers"]["layer1.0.conv2"]["bn_folded"] == {"module": "layer1.0.bn2", "at": "export"}
    exp = read_export(tmp_path)
    codes = qmodel.layer1[0].conv2.weight_quantizer.quantize_int(qmodel.layer1[0].conv2.weight)
    assert torch.equal(exp.layers["layer1.0.conv2"].weight_codes, codes.long())  # codes unchanged: not re-quantized
    with torch.no_grad():
        a, b = lowbit.load_export(tmp_path)(batch), qmodel(batch)
    # the same real function up to float rounding (an occasional activation code flips by one step)
    assert (a - b).abs().mean() < 1e-3 * b.abs().max() and (a - b).abs().max() < 5e-2 * b.abs().max()
    assert (a.argmax(1) == b.argmax(1)).float().mean() >= 0.95


def test_tampered_tensor_file_is_refused(resnet_aciq, tmp_path):
    lowbit.export(resnet_aciq, tmp_path)
    path = tmp_path / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        lowbit.load_export(tmp_path)
    with pytest.raises(ExportFileError, match="SHA-256"):
        IntegerEngine.from_path(tmp_path)
    path.write_bytes(bytes(data[:-100]))
    with pytest.raises(ExportFileError, match="tensors.bytes.*truncated"):
        read_export(tmp_path)


def test_unknown_format_version_is_refused(resnet_aciq, tmp_path):
    lowbit.export(resnet_aciq, tmp_path)
    mpath = tmp_path / "manifest.json"
    manifest = json.loads(mpath.read_text())
    manifest["format_version"] = 99
    mpath.write_text(json.dumps(manifest))
    with pytest.raises(ExportFileError, match=r"format version 99 is unknown.*\[2\]"):
        lowbit.load_export(tmp_path)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(ExportFileError, match="no manifest.json"):
        lowbit.load_export(tmp_path)


def test_layer_left_float_is_exported_float_and_marked(calib, batch, tmp_path):
    recipe = {"weights": {"method": "minmax", "bits": 8, "granularity": "channel"},
              "activations": {"method": "minmax", "bits": 8}, "skip": ["fc"], "ptq": {"fold_bn": True}}
    qmodel = quantized("resnet20", recipe, calib)
    lowbit.export(qmodel, tmp_path)
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["layers"]["fc"]["quantized"] is False and m["layers"]["fc"]["weight"]["float"] is True
    assert m["left_float"] == {"fc": "skipped by the recipe"}
    with torch.no_grad():
        assert torch.equal(lowbit.load_export(tmp_path)(batch), qmodel(batch))
    with pytest.raises(ExportError, match=r"layer 'fc' \(linear\).*float"):
        IntegerEngine.from_path(tmp_path)


class _Gelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.act = nn.GELU()
        self.fc = nn.Linear(4 * 36, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.act(self.conv(x)), 1))


class _Sigmoid(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 36, 10)

    def forward(self, x):
        return self.fc(torch.sigmoid(self.conv(x)).flatten(1))


def test_unsupported_operations_name_module_and_op(calib):
    with pytest.raises(ExportError, match=r"module 'act' \(GELU\).*GELU"):
        build_export(lowbit.quantize(_Gelu().eval(), "ptq-w8a8", calib_data=calib))
    with pytest.raises(ExportError, match=r"'sigmoid'.*top-level forward|top-level forward.*'sigmoid'"):
        build_export(lowbit.quantize(_Sigmoid().eval(), "ptq-w8a8", calib_data=calib))


class _Custom(nn.Module):
    """Not a zoo model: conv-bn-relu, max-pool, x.view(x.size(0), -1), two linears."""

    def __init__(self, hidden=32):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(8 * 16, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn(self.conv(x))))
        return self.fc2(torch.relu(self.fc1(x.view(x.size(0), -1))))


class _CustomNoPool(_Custom):
    def forward(self, x):  # same layers, another computation
        x = nn.functional.avg_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def test_user_model_reloads_with_its_architecture_only(calib, batch, tmp_path):
    torch.manual_seed(1)
    model = _Custom().eval()
    qmodel = lowbit.quantize(model, "ptq-w8a8", calib_data=calib)
    lowbit.export(qmodel, tmp_path, arch="custom-cnn-v1")
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["architecture"] == {"zoo": None, "name": "custom-cnn-v1"}
    with pytest.raises(ExportFileError, match="not a zoo model"):
        lowbit.load_export(tmp_path)
    reloaded = lowbit.load_export(tmp_path, _Custom())
    with torch.no_grad():
        assert torch.allclose(reloaded(batch), qmodel(batch), atol=1e-5)
    assert isinstance(model.bn, nn.BatchNorm2d)  # the caller's model is left alone
    with pytest.raises(ExportFileError, match="weight shape|structure"):
        lowbit.load_export(tmp_path, _Custom(hidden=16))
    with pytest.raises(ExportFileError, match="no module 'bn'"):
        lowbit.load_export(tmp_path, _Gelu())
    with pytest.raises(ExportFileError, match="structure differs"):
        lowbit.load_export(tmp_path, _CustomNoPool())
    patched = _Custom()
    patched.forward = lambda x: x  # an instance-level forward is not what fx traces: refused
    with pytest.raises(ExportFileError, match="instance"):
        lowbit.load_export(tmp_path, patched)


def test_cli_export_prints_sizes_and_verifies(tmp_path, capsys):
    from lowbit.checkpoint import save_checkpoint
    from lowbit.cli import main

    torch.manual_seed(0)
    weights = tmp_path / "mlp.safetensors"
    save_checkpoint(create_model("mlp", in_size=8), weights)
    out = tmp_path / "deploy"
    assert main(["export", "--model", "mlp", "--dataset", "digits", "--weights", str(weights), "--recipe",
                 "ptq-w4a4-minmax", "--calib-images", "64", "--out", str(out), "--verify", "64"]) == 0
    text = capsys.readouterr().out
    assert "fp32 checkpoint" in text and "smaller" in text and "integer engine" in text
    assert (out / "model.safetensors").is_file() and (out / "manifest.json").is_file()
    assert lowbit.load_export(out) is not None
    assert main(["export", "--quantized", str(tmp_path / "missing"), "--dataset", "digits", "--out", str(out)]) == 2
