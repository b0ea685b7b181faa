"""Causal-LM export (lowbit.export / lowbit.load_export) and packed int4/int8 inference, on the tiny Llama."""

import json
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import lowbit
from lowbit.deploy import ExportError, ExportFileError, PackedLinear, pack_model
from lowbit.errors import LowbitError
from lowbit.deploy.read import read_manifest, read_tensors
from lowbit.nn.modules import QuantLinear
from lowbit.quant import LSQQuantizer
from tests.test_deploy_hostile import FUZZ, _mutate, copy_export, manifest_of, reseal, write_manifest
from tests.tiny_lm import tiny_lm, token_batch

# hidden 64, MLP 128, head dim 16: every Linear fits the int4 kernel (out % 16, in % 32); tied lm_head
SHAPES = dict(hidden_size=64, intermediate_size=128, head_dim=16, tie_word_embeddings=True)


def quantized(recipe="silq-w4a8kv8", **kw):
    model = tiny_lm(**{**SHAPES, **kw})
    return model, lowbit.quantize(model, recipe, calib_data=[token_batch()])


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model, qmodel = quantized()
    folder = tmp_path_factory.mktemp("lm") / "export"
    before = state(qmodel)
    lowbit.export(qmodel, folder)
    assert same_state(before, state(qmodel))  # the caller's model is only read
    return model, qmodel, folder


def test_round_trip_logits_are_bit_identical_in_a_fresh_model(exported):
    model, qmodel, folder = exported
    fresh = tiny_lm(**SHAPES, seed=7)  # other random weights: every tensor must come from the export
    before = state(fresh)
    loaded = lowbit.load_export(folder, model=fresh)
    assert same_state(before, state(fresh))
    ids = token_batch(seed=3)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, qmodel(ids).logits)
        # and through generate(): the cache holds the exported grids
        prompt = ids[:1, :6]
        assert torch.equal(loaded.generate(prompt, max_new_tokens=6, do_sample=False),
                           qmodel.generate(prompt, max_new_tokens=6, do_sample=False))


def test_manifest_holds_packed_weights_and_every_step(exported):
    _, qmodel, folder = exported
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["model_kind"] == "causal-lm"
    q = manifest["layers"]["model.layers.0.mlp.up_proj"]
    assert q["weight"]["bits"] == 4 and q["weight"]["storage"] == "packed"
    assert q["weight"]["data"][2] == 128 * 64 // 2  # two 4-bit codes per byte
    assert q["weight"]["scale_shape"] == [128] and q["input"]["bits"] == 8 and q["input"]["scale_shape"] == []
    assert manifest["layers"]["lm_head"]["weight"]["storage"] == "int8"
    assert manifest["layers"]["model.embed_tokens"]["type"] == "embedding"
    kv = manifest["kv_cache"]["model.layers.1.self_attn"]
    assert kv["family"] == "llama" and kv["shape"] == [2, 16] and kv["key"]["scale_shape"] == [2]
    tensors = read_tensors(folder, read_manifest(folder))
    step = qmodel.model.layers[1].self_attn.value_quantizer.get_scale().detach()
    ref = kv["value"]["scale"]
    assert torch.equal(tensors["kv.scale"][ref[1]:ref[1] + ref[2]], step)
    assert set(manifest["float_tensors"]) == {"model.norm.weight"} | {
        f"model.layers.{i}.{n}.weight" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")}


def _edited(folder, dst, edit, *, forged):
    """A copy of the export in ``dst`` with ``edit`` applied to its manifest; ``forged``: resealed (digests
    recomputed, as a forger would), else the old seal is left."""
    out = copy_export(folder, dst)
    manifest = manifest_of(out)
    edit(manifest)
    if forged:
        reseal(out, manifest)
    else:
        (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_an_edited_bit_width_or_step_is_refused(exported, tmp_path):
    model, _, folder = exported
    copy = _edited(folder, tmp_path / "a", lambda m: m["layers"]["lm_head"]["weight"].update(bits=7), forged=False)
    with pytest.raises(ExportFileError, match="does not match the digest sealed"):
        lowbit.load_export(copy, model=model)
    copy = copy_export(folder, tmp_path / "b")
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-3] ^= 0x10  # a bit of the last arena (a step or a code)
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ExportFileError, match="SHA-256"):
        lowbit.load_export(copy, model=model)


def test_a_resealed_forgery_is_caught_by_the_field_checks(exported, tmp_path):
    model, _, folder = exported
    copy = _edited(folder, tmp_path / "a", lambda m: m["kv_cache"]["model.layers.0.self_attn"]["key"].update(
        scale_shape=[3]), forged=True)
    with pytest.raises(ExportFileError, match=r"kv_cache\['model.layers.0.self_attn'\].key.scale_shape"):
        lowbit.load_export(copy, model=model)
    # a declared shape far beyond the file: refused before allocation
    copy = _edited(folder, tmp_path / "b", lambda m: m["float_tensors"]["model.norm.weight"].update(
        shape=[2**31 - 1, 2**31 - 1]), forged=True)
    with pytest.raises(ExportFileError, match="names 64 elements, the declared shape needs"):
        lowbit.load_export(copy, model=model)


def test_loading_needs_the_exported_architecture(exported):
    _, _, folder = exported
    with pytest.raises(ExportFileError, match="loaded into its float architecture"):
        lowbit.load_export(folder)
    with pytest.raises(ExportFileError, match="num_attention_heads"):
        lowbit.load_export(folder, model=tiny_lm(**{**SHAPES, "num_attention_heads": 8, "head_dim": 8}))
    with pytest.raises(ExportFileError, match="Qwen2ForCausalLM"):
        lowbit.load_export(folder, model=tiny_lm("qwen2", **SHAPES))


def test_what_cannot_be_exported_is_refused_by_name(tmp_path):
    model, qmodel = quantized()
    qmodel.model.layers[0].self_attn.query_quantizer = LSQQuantizer(bits=8)  # a point the format has no field for
    with pytest.raises(ExportError, match=r"'model.layers.0.self_attn.query_quantizer'.*holds the weights and inputs "
                                          r"of Linear layers.*KV cache"):
        lowbit.export(qmodel, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(ExportError, match="nothing quantized"):
        lowbit.export(model, tmp_path / "y")


@pytest.mark.parametrize("recipe,kernel", [("silq-w4a8kv8", "int4"), ("rtn-w8a8kv8", "int4"),
                                           ("rtn-w4a4kv4", "int4"), ("silq-w4a8kv8", "int8"),
                                           ("silq-w4a8kv8-sink", "int4"), ("silq-w4a8kv8-sink", "int8")])
def test_packed_linear_matches_the_fake_quant_linear(recipe, kernel):
    _, qmodel = quantized(recipe)
    packed = pack_model(qmodel, kernel)
    x = torch.randn(3, 5, 64) * 2
    for name, m in packed.named_modules():
        if not isinstance(m, PackedLinear) or m.in_features != 64:
            continue
        ref = qmodel.get_submodule(name)
        assert isinstance(ref, QuantLinear) and not hasattr(m, "weight")
        with torch.no_grad():
            got, want = m(x), ref(x)
        if m.kernel == "int8":  # exact int32 accumulation: float32 rounding only
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        else:  # the int4 kernel returns bfloat16: the accumulator rounded to 8 significant bits
            codes = ref.weight_quantizer.quantize_int(ref.weight).float()
            q = m.input_codes(x.reshape(-1, 64), m.input_zero)
            bound = 2.0**-8 * (q @ codes.T).abs().reshape(got.shape) * m.output_step
            assert bool(((got - want).abs() <= bound + 1e-6).all())
    assert {m.kernel for m in packed.modules() if isinstance(m, PackedLinear)} == \
        ({"int8"} if recipe.startswith("rtn-w8") or kernel == "int8" else {"int4", "int8"})  # lm_head: 8-bit


def test_packed_model_generates_like_the_fake_quant_model_and_leaves_it_alone():
    _, qmodel = quantized("silq-w4a8kv8")
    before = state(qmodel)
    packed = pack_model(qmodel)
    assert same_state(before, state(qmodel))
    ids = token_batch(seed=4)
    with torch.no_grad():
        a, b = packed(ids).logits, qmodel(ids).logits
    assert (a - b).abs().max() < 0.05 * b.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9
    weights = sum(m.weight_bytes() for m in packed.modules() if hasattr(m, "weight_bytes"))
    float_weights = sum(p.numel() * 4 for n, p in qmodel.named_parameters() if n.endswith("proj.weight"))
    assert weights < float_weights / 4


@pytest.mark.parametrize("recipe", ["silq-w4a8kv8", "silq-w4a8kv8-sink"])  # -sink: asymmetric inputs, [0, 255]
def test_the_int8_kernel_keeps_the_whole_model_on_the_fake_quant_logits(recipe):
    _, qmodel = quantized(recipe)
    ids = token_batch(seed=4)
    with torch.no_grad():
        a, b = pack_model(qmodel, "int8")(ids).logits, qmodel(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_loading_an_export_packed_equals_packing_the_loaded_model(exported):
    model, _, folder = exported
    before = state(model)
    ids = token_batch(seed=4)
    for kernel in ("int4", "int8"):
        direct = lowbit.load_export(folder, model=model, packed=kernel)
        assert not any(isinstance(m, QuantLinear) for m in direct.modules())
        with torch.no_grad():
            via_fake_quant = pack_model(lowbit.load_export(folder, model=model), kernel)
            assert torch.equal(direct(ids).logits, via_fake_quant(ids).logits)
    assert same_state(before, state(model))


def test_pack_refuses_a_layer_outside_its_kernels():
    _, qmodel = quantized("silq-w4a8kv8")
    qmodel.model.layers[1].mlp.down_proj.input_quantizer = None  # W4A16: no integer input codes
    with pytest.raises(ExportError, match=r"'model.layers.1.mlp.down_proj': its input is float; packed inference "
                                          r"runs Linear layers with signed weights"):
        pack_model(qmodel)


def test_cli_export_then_generate_and_eval_packed(tmp_path, capsys):
    from lowbit.cli import main
    from lowbit.zoo.language import bytellama_path

    if not bytellama_path().is_file():
        pytest.skip("no shipped bytellama checkpoint")
    out = tmp_path / "export"
    assert main(["llm", "export", "--model", "bytellama", "--recipe", "rtn-w4a8kv8", "--calib-windows", "1",
                 "--length", "64", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "bit-identical logits" in printed and (out / "manifest.json").is_file()
    assert main(["llm", "generate", "--model", "bytellama", "--export", str(out), "--packed", "--prompt", "ROMEO.",
                 "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO.")
    assert main(["llm", "eval", "--model", "bytellama", "--export", str(out), "--packed", "--eval-windows", "1",
                 "--length", "64", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    metrics = json.loads(lines[-1])
    assert metrics["perplexity"] > 1 and metrics["agreement"] > 50  # against the float model
    assert lines[-2].startswith("packed export: perplexity")


@FUZZ
@given(data=st.data(), forged=st.booleans())
def test_fuzz_manifest_edits_give_identical_logits_or_lowbit_error(exported, data, forged):
    """As tests/test_deploy_hostile.py for CNN exports: edited manifests (``forged``: resealed, so that only the
    field checks stand between the file and the model) load to identical logits or raise lowbit's error."""
    model, qmodel, folder = exported
    ids = token_batch(batch=1, length=8, seed=5)
    with torch.no_grad():
        expected = qmodel(ids).logits
    mutated = _mutate(manifest_of(folder), data)
    with tempfile.TemporaryDirectory() as tmp:
        copy = copy_export(folder, Path(tmp))
        if not write_manifest(copy, mutated, forged):
            return
        try:
            with torch.no_grad():
                logits = lowbit.load_export(copy, model=model)(ids).logits
        except LowbitError:
            return
    assert forged or torch.equal(logits, expected)
