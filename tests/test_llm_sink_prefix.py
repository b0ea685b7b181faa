"""The cache's float sink prefix (kv_cache.sink_prefix, PrefixQuant): the quantized model runs every
sequence after the prefix's float keys and values, in forward, calibration, fine-tuning, generate()
and save/load; bad settings are clear errors."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

import lowbit  # noqa: E402
from lowbit.deploy import ExportFileError  # noqa: E402
from lowbit.deploy.transformer import build_transformer, load_transformer, read_transformer  # noqa: E402
from lowbit.errors import LowbitError, RecipeError  # noqa: E402
from lowbit.llm import has_sink_prefix  # noqa: E402
from lowbit.quant.base import Quantizer  # noqa: E402
from tests.test_deploy_hostile import manifest_of, reseal  # noqa: E402
from tiny_lm import FAMILY_MODELS, VOCAB, tiny_lm, token_batch  # noqa: E402

PREFIX = [3, 7]
RECIPE = {"weights": {"method": "lsq", "bits": 4, "granularity": "channel", "init": "mse"},
          "activations": {"method": "lsq", "bits": 8, "init": "mse"},
          "kv_cache": {"method": "lsq", "bits": 8, "init": "mse", "sink_prefix": PREFIX}}


def quantizers_off(model):
    for m in model.modules():
        if isinstance(m, Quantizer):
            m.enabled = False
    return model


def prefixed(ids):
    return torch.cat([torch.tensor(PREFIX).expand(ids.shape[0], -1), ids], 1)


@pytest.mark.parametrize("family", sorted(FAMILY_MODELS))
def test_forward_runs_after_the_float_prefix(family):
    """With its quantizers off, the prefixed model's logits are the float model's on prefix + tokens,
    the prefix's own positions dropped; the caller's float model is left as it was."""
    model = tiny_lm(family)
    q = lowbit.quantize(model, RECIPE, calib_data=[token_batch()])
    assert has_sink_prefix(q) and not has_sink_prefix(model)
    assert f"sink prefix: tokens {PREFIX}" in str(lowbit.summary(q))
    assert type(q).__name__ == f"SinkPrefixed{type(model).__name__}"
    ids = token_batch(2, 10, seed=3)
    with torch.no_grad():
        want = model(prefixed(ids), use_cache=False).logits[:, len(PREFIX):]
        got = quantizers_off(q)(input_ids=ids, use_cache=False).logits
        masked = q(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert got.shape == (2, 10, VOCAB)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(masked, want, rtol=1e-5, atol=1e-5)


def test_prefix_keys_and_values_are_the_float_models():
    model = tiny_lm()
    q = lowbit.quantize(model, RECIPE, calib_data=[token_batch()])
    with torch.no_grad():
        out = model(torch.tensor([PREFIX]), use_cache=True)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    assert torch.equal(q.lowbit_sink_prefix.token_ids, torch.tensor(PREFIX))
    for i, layer in enumerate(cache.layers):
        torch.testing.assert_close(getattr(q.lowbit_sink_prefix, f"key_{i}"), layer.keys)
        torch.testing.assert_close(getattr(q.lowbit_sink_prefix, f"value_{i}"), layer.values)


def test_prefix_changes_the_quantized_model():
    plain = lowbit.quantize(tiny_lm(), {**RECIPE, "kv_cache": {"method": "lsq", "bits": 8, "init": "mse"}},
                            calib_data=[token_batch()])
    q = lowbit.quantize(tiny_lm(), RECIPE, calib_data=[token_batch()])
    ids = token_batch(1, 8, seed=2)
    with torch.no_grad():
        assert (q(ids).logits - plain(ids).logits).abs().max() > 1e-3


def test_generate_returns_the_callers_tokens_and_continues_after_the_prefix():
    model = tiny_lm()
    q = lowbit.quantize(model, RECIPE, calib_data=[token_batch()])
    ids = token_batch(1, 5, seed=4)
    out = q.generate(ids, max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 11) and torch.equal(out[:, :5], ids)
    float_out = quantizers_off(q).generate(ids, max_new_tokens=6, do_sample=False)
    reference = model.generate(prefixed(ids), attention_mask=torch.ones(1, 7, dtype=torch.long), max_new_tokens=6,
                               do_sample=False)
    assert torch.equal(float_out, reference[:, len(PREFIX):])
    as_dict = q.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(as_dict.sequences, float_out)


def test_fine_tuning_and_save_load_keep_the_prefix(tmp_path):
    q = lowbit.quantize(tiny_lm(), RECIPE, calib_data=[token_batch()])
    lowbit.finetune(q, [token_batch(2, 12, seed=s) for s in range(3)], teacher=tiny_lm(),
                    config={"epochs": 1, "lr": 1e-3, "progress": False, "checkpoint_every": 0})
    lowbit.save(q, tmp_path / "q")
    back = lowbit.load(tmp_path / "q", model=tiny_lm(seed=5))
    assert has_sink_prefix(back)
    ids = token_batch(1, 9, seed=6)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, q.eval()(ids).logits)


def test_gradient_checkpointing_with_a_prefix_is_refused():
    q = lowbit.quantize(tiny_lm(), RECIPE, calib_data=[token_batch()]).train()
    (getattr(q, "activation_checkpointing_enable", None) or q.gradient_checkpointing_enable)()
    with pytest.raises(LowbitError, match="gradient checkpointing"):
        q(token_batch(1, 6), use_cache=False)


@pytest.mark.parametrize("tokens, message", [
    ([], "bos .* or a list of 1 to 64 token ids"),
    ([1, -2], "a list of 1 to 64 token ids"),
    ("1", "a list of 1 to 64 token ids"),
    ([True], "a list of 1 to 64 token ids"),
    (list(range(65)), "a list of 1 to 64 token ids"),
])
def test_bad_sink_prefix_is_a_recipe_error(tokens, message):
    with pytest.raises(RecipeError, match=message):
        lowbit.load_recipe({**RECIPE, "kv_cache": {**RECIPE["kv_cache"], "sink_prefix": tokens}})


def test_bos_is_the_configs_bos_token():
    q = lowbit.quantize(tiny_lm(bos_token_id=5), {**RECIPE, "kv_cache": {**RECIPE["kv_cache"], "sink_prefix": "bos"}},
                        calib_data=[token_batch()])
    assert q.lowbit_sink_prefix.token_ids.tolist() == [5]
    with pytest.raises(RecipeError, match="the model's config has no bos_token_id"):
        lowbit.quantize(tiny_lm(bos_token_id=None),
                        {**RECIPE, "kv_cache": {**RECIPE["kv_cache"], "sink_prefix": "bos"}}, calib_data=[token_batch()])


def test_token_outside_the_vocabulary_leaves_the_model_untouched():
    model = tiny_lm()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RecipeError, match=f"outside the model's vocabulary of {VOCAB}"):
        lowbit.quantize(model, {**RECIPE, "kv_cache": {**RECIPE["kv_cache"], "sink_prefix": [VOCAB]}},
                        calib_data=[token_batch()], inplace=True)
    assert not has_sink_prefix(model) and not hasattr(model, "lowbit_sink_prefix")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_export_round_trip_keeps_the_prefix(tmp_path):
    """The export holds the prefix's tokens and float keys/values; the reloaded model (also packed) runs after it,
    with the fake-quant model's logits."""
    q = lowbit.quantize(tiny_lm(), RECIPE, calib_data=[token_batch()])
    lowbit.export(q, tmp_path / "e")
    manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert manifest["sink_prefix"]["tokens"] == PREFIX and len(manifest["sink_prefix"]["keys"]) == 2
    assert manifest["architecture"]["name"].endswith(".LlamaForCausalLM")
    back = lowbit.load_export(tmp_path / "e", model=tiny_lm(seed=3))
    assert has_sink_prefix(back)
    ids = token_batch(1, 9, seed=6)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, q.eval()(ids).logits)
    out = back.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, q.generate(ids, max_new_tokens=4, do_sample=False))


@pytest.mark.parametrize("edit, message", [
    (lambda p: p.update(tokens=[1, "x"]), r"sink_prefix.tokens: .*token ids"),
    (lambda p: p.update(values=p["values"][:1]), "as many keys as values"),
    (lambda p: p["keys"][0].update(shape=[1, 2, 5, 8]), r"\[1, kv heads, 2 tokens, head dim\]"),
])
def test_damaged_export_prefix_is_a_clear_error(tmp_path, edit, message):
    q = lowbit.quantize(tiny_lm(), RECIPE, calib_data=[token_batch()])
    lowbit.export(q, tmp_path / "e")
    manifest = manifest_of(tmp_path / "e")
    edit(manifest["sink_prefix"])
    reseal(tmp_path / "e", manifest)  # as a forger would: the seal passes, the field checks must not
    with pytest.raises(ExportFileError, match=message):
        read_transformer(tmp_path / "e")


def test_export_prefix_outside_the_vocabulary_is_refused():
    exp = build_transformer(lowbit.quantize(tiny_lm(), RECIPE, calib_data=[token_batch()]))
    exp.sink_prefix.token_ids = torch.tensor([3, VOCAB + 5])  # a forged prefix the model cannot embed
    with pytest.raises(ExportFileError, match=f"token {VOCAB + 5} is outside the model's vocabulary of {VOCAB}"):
        load_transformer(exp, tiny_lm())


def test_shipped_sink_recipe_is_silq_w4a8kv8_with_the_measured_changes():
    """silq-w4a8kv8-sink is what benchmarks/llm.py measured as silq-w4a8kv8 + asymmetric-activations + sink-prefix
    (at the learning rates chosen on the calib split): nothing else differs."""
    base = lowbit.load_recipe("silq-w4a8kv8").to_dict()
    sink = lowbit.load_recipe("silq-w4a8kv8-sink").to_dict()
    assert sink["activations"] == {**base["activations"], "asymmetric": True}
    assert sink["kv_cache"] == {**base["kv_cache"], "sink_prefix": "bos"}
    assert sink["qat"] == {**base["qat"], "lr": 5e-5, "quantizer_lr_mult": 3.0}
    drop = {"name", "description", "activations", "kv_cache", "qat"}
    assert {k: v for k, v in sink.items() if k not in drop} == {k: v for k, v in base.items() if k not in drop}
