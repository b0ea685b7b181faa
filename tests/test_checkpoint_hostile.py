"""Training-side files are untrusted input too: lowbit.save folders and fine-tuning (resume) checkpoints that are
damaged, edited or forged get lowbit's CheckpointError naming the file and field; fuzz tests mutate real ones."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
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
from lowbit.checkpoint import ALIASES_KEY, read_safetensors, write_safetensors
from lowbit.data import make_loader
from lowbit.errors import CheckpointError, LowbitError
from lowbit.files import canonical_sha256
from lowbit.qat import FinetuneConfig, finetune
from lowbit.qat.state import DIGEST_KEY, META_KEY, state_digest
from lowbit.serialize import META_DIGEST_KEY
from lowbit.zoo import create_model

FUZZ = settings(max_examples=int(os.environ.get("LOWBIT_FUZZ_EXAMPLES", 30)), deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 64, 10)

    def forward(self, x):
        return self.fc(torch.flatten(F.relu(self.bn(self.conv(x))), 1))


@pytest.fixture(scope="module")
def batch():
    return next(iter(make_loader("digits", "test", 16)))[0]


@pytest.fixture(scope="module")
def calib():
    return list(make_loader("digits", "calib", 64, limit=64))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, calib, batch):
    """A lowbit.save folder of a W4A4-ACIQ Tiny (per-channel widths, frozen codes, folded batch norm) and its
    outputs."""
    torch.manual_seed(0)
    qmodel = lowbit.quantize(Tiny().eval(), "ptq-w4a4-aciq", calib_data=calib).eval()
    folder = tmp_path_factory.mktemp("saved")
    lowbit.save(qmodel, folder, extra={"note": "test"})
    with torch.no_grad():
        expected = lowbit.load(folder, Tiny())(batch)
        assert torch.equal(expected, qmodel(batch))
    return folder, expected


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return dst


def reseal_saved(folder: Path, meta: dict | None = None, state: dict | None = None, recipe: bytes | None = None):
    """Rewrite a lowbit.save folder with its digests recomputed, as a forger would."""
    meta = meta if meta is not None else json.loads((folder / "lowbit.json").read_text())
    body = {k: v for k, v in meta.items() if k != "files"}
    state = state if state is not None else load_file(str(folder / "model.safetensors"))
    write_safetensors(state, folder / "model.safetensors", metadata={META_DIGEST_KEY: canonical_sha256(body)})
    if recipe is not None:
        (folder / "recipe.yaml").write_bytes(recipe)
    files = {}
    for name in ("model.safetensors", "recipe.yaml"):
        data = (folder / name).read_bytes()
        files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (folder / "lowbit.json").write_text(json.dumps(dict(body, files=files)))


# ----- lowbit.save / lowbit.load ---------------------------------------------------------------------------------
def test_edits_to_any_file_of_a_saved_model_are_detected(saved, tmp_path):
    src = saved[0]
    folder = copy_folder(src, tmp_path / "a")
    meta = json.loads((folder / "lowbit.json").read_text())
    meta["folded"] = []
    (folder / "lowbit.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"lowbit\.json: its content does not match the digest sealed"):
        lowbit.load(folder, Tiny())
    folder = copy_folder(src, tmp_path / "b")
    (folder / "recipe.yaml").write_text((folder / "recipe.yaml").read_text().replace("bits: 4", "bits: 3"))
    with pytest.raises(CheckpointError, match=r"recipe\.yaml: \d+ bytes, lowbit\.json \(field files\.recipe\.yaml"
                                              r"\.bytes\)|recipe\.yaml: SHA-256"):
        lowbit.load(folder, Tiny())
    folder = copy_folder(src, tmp_path / "c")
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-3] ^= 1
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: SHA-256 .*field files\.model\.safetensors\.sha256"):
        lowbit.load(folder, Tiny())
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing"):
        lowbit.load(folder, Tiny())


def test_a_failed_load_leaves_the_callers_model_alone(saved, tmp_path):
    folder = copy_folder(saved[0], tmp_path)
    meta = json.loads((folder / "lowbit.json").read_text())
    meta["folded"] = [["conv", "nowhere"]]
    reseal_saved(folder, meta)
    model = Tiny()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(CheckpointError, match=r"lowbit\.json: field folded\[0\]"):
        lowbit.load(folder, model)
    assert isinstance(model.bn, nn.BatchNorm2d) and model.conv.bias is not None
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("edit,match", [
    (lambda m: m.update(version=1), r"lowbit\.json: format 'lowbit-quantized' version 1 is not"),
    (lambda m: m.update(folded=[["conv"]]), r"lowbit\.json: field folded: a list of \[layer, batch norm\]"),
    (lambda m: m.update(folded=[["fc", "conv"]]), r"lowbit\.json: field folded\[0\]: 'fc' \(Linear\) and 'conv'"),
    (lambda m: m.update(model="no-such-net"), r"lowbit\.json: fields model/dataset: unknown model"),
    (lambda m: m.update(model="mlp", dataset="imagenet"), r"lowbit\.json: fields model/dataset: unknown dataset"),
    (lambda m: m.update(model=7), r"lowbit\.json: field model"),
    (lambda m: m["files"].pop("recipe.yaml"), r"lowbit\.json: field files\.recipe\.yaml"),
])
def test_forged_saved_model_fields_are_refused(saved, tmp_path, edit, match):
    folder = copy_folder(saved[0], tmp_path)
    meta = json.loads((folder / "lowbit.json").read_text())
    edit(meta)
    if "recipe.yaml" in meta["files"]:
        reseal_saved(folder, meta)
    else:
        (folder / "lowbit.json").write_text(json.dumps(meta))
    by_name = meta.get("model") is not None  # the zoo builds it, else the float model is passed
    with pytest.raises(CheckpointError, match=match):
        lowbit.load(folder) if by_name else lowbit.load(folder, Tiny())


def test_forged_quantizer_state_is_refused_naming_the_tensor(saved, tmp_path):
    folder = copy_folder(saved[0], tmp_path)
    state = load_file(str(folder / "model.safetensors"))
    state["conv.input_quantizer.scale"] = torch.ones(3)
    reseal_saved(folder, state=state)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: conv\.input_quantizer: step \(3,\)"):
        lowbit.load(folder, Tiny())
    state["conv.input_quantizer.scale"] = load_file(str(saved[0] / "model.safetensors"))["conv.input_quantizer.scale"]
    state["conv.weight_quantizer.codes"] = torch.zeros(5, dtype=torch.int32)
    reseal_saved(folder, state=state)
    with pytest.raises(CheckpointError, match=r"conv\.weight_quantizer: frozen codes of shape \(5,\)"):
        lowbit.load(folder, Tiny())


def test_zoo_model_saved_and_loaded_by_name_and_a_forged_record_builds_nothing_big(calib, batch, tmp_path):
    torch.manual_seed(0)
    qmodel = lowbit.quantize(create_model("mlp", in_size=8).eval(), "ptq-w8a8", calib_data=calib).eval()
    lowbit.save(qmodel, tmp_path)
    with torch.no_grad():
        assert torch.equal(lowbit.load(tmp_path)(batch), qmodel(batch))
    meta = json.loads((tmp_path / "lowbit.json").read_text())
    assert meta["architecture"]["zoo"] == "mlp" and meta["model"] == "mlp"
    meta["architecture"]["kwargs"]["in_size"] = 2**20  # a 2^40 x 512 first layer, were it built
    reseal_saved(tmp_path, meta)
    with pytest.raises(CheckpointError, match=r"lowbit\.json: field architecture: mlp with .* layer 'net.1' with "
                                              r"weight shape \(512, 1099511627776\), the file holds \(512, 64\)"):
        lowbit.load(tmp_path)


# ----- fuzz: lowbit.save folders --------------------------------------------------------------------------------
JSON_VALUES = st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | \
    st.text(max_size=6) | st.lists(st.text(max_size=4), max_size=3) | st.sampled_from(["conv", "bn", "digits", "mlp"])


def _mutate_json(obj, data):
    out = copy.deepcopy(obj)
    paths, stack = [], [((), out)]
    while stack:
        path, node = stack.pop()
        if path:
            paths.append(path)
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        stack += [(path + (k,), v) for k, v in items]
    path = data.draw(st.sampled_from(sorted(paths, key=str)))
    parent = out
    for k in path[:-1]:
        parent = parent[k]
    if isinstance(parent, dict) and data.draw(st.booleans()):
        del parent[path[-1]]
    else:
        parent[path[-1]] = data.draw(JSON_VALUES)
    return out


def _mutate_bytes(data: bytes, draw) -> bytes:
    i = draw(st.integers(0, len(data) - 1))
    kind = draw(st.sampled_from(["flip", "truncate", "overwrite"]))
    if kind == "flip":
        return data[:i] + bytes([data[i] ^ (1 << draw(st.integers(0, 7)))]) + data[i + 1:]
    if kind == "truncate":
        return data[:i]
    patch = draw(st.binary(min_size=1, max_size=6))
    return data[:i] + patch + data[i + len(patch):]


def _load_outcome(folder: Path, batch):
    try:
        with torch.no_grad():
            return "ok", lowbit.load(folder, Tiny())(batch)
    except LowbitError as exc:
        return "refused", exc


@FUZZ
@given(data=st.data(), target=st.sampled_from(["lowbit.json", "recipe.yaml", "model.safetensors"]),
       forged=st.booleans())
def test_fuzz_saved_model_loads_identically_or_raises_lowbit_error(saved, batch, data, target, forged):
    """Damaged files (and, ``forged``, with every digest recomputed): identical outputs or lowbit's error."""
    src, expected = saved
    with tempfile.TemporaryDirectory() as tmp:
        folder = copy_folder(src, Path(tmp))
        path = folder / target
        if target == "lowbit.json":
            meta = _mutate_json(json.loads(path.read_text()), data)
            if forged and isinstance(meta.get("files"), dict):
                meta.pop("files")
                try:
                    reseal_saved(folder, meta)
                except (TypeError, ValueError):  # the forger's own tool choked on the edit
                    return
            else:
                path.write_text(json.dumps(meta))
        elif target == "recipe.yaml":
            text = _mutate_bytes(path.read_bytes(), data.draw)
            reseal_saved(folder, recipe=text) if forged else path.write_bytes(text)
        else:
            raw = _mutate_bytes(path.read_bytes(), data.draw)
            path.write_bytes(raw)
            if forged:
                meta = json.loads((folder / "lowbit.json").read_text())
                meta["files"]["model.safetensors"] = {"sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw)}
                (folder / "lowbit.json").write_text(json.dumps(meta))
        result = _load_outcome(folder, batch)
    assert result[0] == "refused" or forged or torch.equal(result[1], expected)


# ----- fine-tuning checkpoints (resume) ----------------------------------------------------------------------------
RECIPE = {"weights": {"method": "lsq", "bits": 4}, "activations": {"method": "lsq", "bits": 4}}
CONFIG = FinetuneConfig(optimizer="adamw", epochs=1, max_steps=3, lr=0.01, checkpoint_every=1, log_every=0, seed=3)


class Stop(Exception):
    pass


def _stop_at_2(info):
    if info["step"] == 2:
        raise Stop


def _train_data():
    return make_loader("digits", "train", 32, shuffle=True, seed=1, limit=128)  # 4 batches


def _build(calib):
    torch.manual_seed(0)
    return lowbit.quantize(Tiny(), RECIPE, calib_data=calib, calib_batches=1)


def _resume(folder: Path, calib) -> nn.Module:
    q = _build(calib)
    finetune(q, _train_data(), config=CONFIG, checkpoint_dir=folder, resume=True, log=lambda *_: None)
    return q


@pytest.fixture(scope="module")
def resumable(tmp_path_factory, calib):
    """A checkpoint at step 2 and the state an intact resume reaches at step 3."""
    folder = tmp_path_factory.mktemp("qat")
    with pytest.raises(Stop):
        finetune(_build(calib), _train_data(), config=CONFIG, checkpoint_dir=folder, log=lambda *_: None,
                 on_step=_stop_at_2)
    assert _meta(folder)["step"] == 2
    pristine = tmp_path_factory.mktemp("pristine")
    shutil.copy(folder / "last.safetensors", pristine / "last.safetensors")
    final = _resume(copy_folder(pristine, tmp_path_factory.mktemp("resumed")), calib).state_dict()
    return pristine, final


def reseal_training(folder: Path, meta: dict | None = None, tensors: dict | None = None) -> None:
    """Rewrite last.safetensors with its digest recomputed, as a forger would."""
    path = folder / "last.safetensors"
    tensors = tensors if tensors is not None else load_file(str(path))
    if meta is None:
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            text = f.metadata()[META_KEY]
    else:
        text = json.dumps(meta, sort_keys=True)
    write_safetensors(tensors, path, metadata={META_KEY: text, DIGEST_KEY: state_digest(text, tensors)})


def _meta(folder: Path) -> dict:
    from safetensors import safe_open
    with safe_open(str(folder / "last.safetensors"), "pt") as f:
        return json.loads(f.metadata()[META_KEY])


@pytest.mark.parametrize("edit,match", [
    (lambda m: m.update(step=-1), r"field step: an integer >= 0"),
    (lambda m: m.update(epoch="1"), r"field epoch"),
    (lambda m: m["rng"].update(torch="AAAA"), r"field rng"),
    (lambda m: m["rng"]["python"][1].pop(), r"field rng"),
    (lambda m: m["stats"].update(epoch=[0, 0]), r"field stats"),
    (lambda m: m["optimizer"]["param_groups"][0].update(lr="fast"), r"field optimizer\.param_groups\[0\]"),
    (lambda m: m["optimizer"]["param_groups"].pop(), r"field optimizer\.param_groups: \d+ groups"),
    (lambda m: m["fingerprint"]["architecture_detail"]["tensors"].update({"fc.weight": "[3] float32"}),
     r"field fingerprint"),
])
def test_forged_resume_fields_are_refused(resumable, calib, tmp_path, edit, match):
    folder = copy_folder(resumable[0], tmp_path)
    meta = _meta(folder)
    edit(meta)
    reseal_training(folder, meta)
    with pytest.raises(CheckpointError, match=r"last\.safetensors: " + match + "|" + match):
        _resume(folder, calib)


def test_forged_resume_tensor_of_another_shape_is_refused(resumable, calib, tmp_path):
    folder = copy_folder(resumable[0], tmp_path)
    tensors = load_file(str(folder / "last.safetensors"))
    tensors["model.fc.input_quantizer.scale"] = torch.ones(4)
    reseal_training(folder, tensors=tensors)
    with pytest.raises(CheckpointError, match=r"tensor model\.fc\.input_quantizer\.scale is \[4\]"):
        _resume(folder, calib)


def test_damaged_resume_checkpoint_is_refused(resumable, calib, tmp_path):
    folder = copy_folder(resumable[0], tmp_path)
    data = bytearray((folder / "last.safetensors").read_bytes())
    data[-5] ^= 0x10
    (folder / "last.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"last\.safetensors: its tensors or metadata do not match the digest"):
        _resume(folder, calib)


@FUZZ
@given(data=st.data(), forged=st.booleans(), in_tensors=st.booleans())
def test_fuzz_resume_ends_identically_or_raises_lowbit_error(resumable, calib, data, forged, in_tensors):
    """Mutated metadata or tensor bytes (``forged``: digest recomputed): resume reaches the intact run's state or
    raises lowbit's error."""
    src, final = resumable
    with tempfile.TemporaryDirectory() as tmp:
        folder = copy_folder(src, Path(tmp))
        path = folder / "last.safetensors"
        if in_tensors and not forged:
            path.write_bytes(_mutate_bytes(path.read_bytes(), data.draw))
        elif in_tensors:
            tensors = load_file(str(path))
            key = data.draw(st.sampled_from(sorted(k for k, v in tensors.items() if v.numel())))
            flat = tensors[key].reshape(-1).view(torch.uint8).clone()
            flat[data.draw(st.integers(0, flat.numel() - 1))] ^= 1 << data.draw(st.integers(0, 7))
            tensors[key] = flat.view(tensors[key].dtype).reshape(tensors[key].shape)
            reseal_training(folder, tensors=tensors)
        else:
            meta = _mutate_json(_meta(folder), data)
            if forged:
                reseal_training(folder, meta)
            else:
                tensors = load_file(str(path))
                old = _meta(folder)
                write_safetensors(tensors, path, metadata={META_KEY: json.dumps(meta, sort_keys=True),
                                                           DIGEST_KEY: state_digest(json.dumps(old, sort_keys=True),
                                                                                    tensors)})
        try:
            state = _resume(folder, calib).state_dict()
        except LowbitError:
            return
    if not forged:
        assert all(torch.equal(v, final[k]) for k, v in state.items())


class Tied(nn.Module):
    """An embedding and an output layer sharing one weight (a language model's usual tie)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(self.embed(tokens).mean(1))


def test_tied_weights_survive_save_and_load(tmp_path):
    torch.manual_seed(0)
    tokens = torch.randint(0, 16, (4, 5))
    qmodel = lowbit.quantize(Tied().eval(), "ptq-w8a8", calib_data=[tokens])
    lowbit.save(qmodel, tmp_path)
    assert json.loads(read_safetensors(tmp_path / "model.safetensors")[1][ALIASES_KEY]) == {"head.weight":
                                                                                             "embed.weight"}
    back = lowbit.load(tmp_path, Tied())
    assert back.head.weight is back.embed.weight
    with torch.no_grad():
        assert torch.equal(back(tokens), qmodel(tokens))
