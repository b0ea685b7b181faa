"""The KV-cache quantization point of Hugging Face causal LMs: every supported family, the cache
holding grid values during generate(), training and generation quantizing alike, clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

import lowbit  # noqa: E402
from lowbit.errors import RecipeError  # noqa: E402
from lowbit.llm.kv_cache import is_kv_quantized  # noqa: E402
from tiny_lm import FAMILY_MODELS, VOCAB, tiny_lm, token_batch  # noqa: E402

W4A8KV4 = {"weights": {"method": "lsq", "bits": 4, "granularity": "channel", "init": "mse"},
           "activations": {"method": "lsq", "bits": 8, "init": "mse"},
           "kv_cache": {"method": "lsq", "bits": 4, "init": "mse"}}


def attention_blocks(model):
    return [m for m in model.modules() if is_kv_quantized(m)]


@pytest.mark.parametrize("family", sorted(FAMILY_MODELS))
def test_cache_holds_grid_values_after_generate(family):
    model = tiny_lm(family)
    q = lowbit.quantize(model, W4A8KV4, calib_data=[token_batch()])
    blocks = attention_blocks(q)
    assert len(blocks) == 2 and all(type(b).__name__.startswith("KVQuant") for b in blocks)
    out = q.generate(token_batch(1, 6), max_new_tokens=12, do_sample=False, return_dict_in_generate=True)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    for block, layer in zip(blocks, cache.layers):
        for tensor, quantizer in ((layer.keys, block.key_quantizer), (layer.values, block.value_quantizer)):
            step = quantizer.get_scale().detach()
            assert step.shape == (2,)  # one step per KV head
            assert tensor.shape[1] == 2 and tensor.shape[2] == 17  # 6 prompt + 11 generated tokens cached
            for head in range(2):
                codes = tensor[0, head] / step[head]
                assert (codes - codes.round()).abs().max() < 1e-4  # integers times the head's step
                assert codes.round().min() >= -8 and codes.round().max() <= 7
                assert 2 < torch.unique(tensor[0, head]).numel() <= 16  # at most 2^4 values per head


def test_training_forward_quantizes_as_generation_does():
    """Without a cache (training) the same keys and values are quantized: the last position's logits of
    one full forward equal those of incremental decoding through HF's cache."""
    q = lowbit.quantize(tiny_lm(), W4A8KV4, calib_data=[token_batch()])
    ids = token_batch(1, 12, seed=4)
    with torch.no_grad():
        full = q(ids, use_cache=False).logits[:, -1]
        prefix = q(ids[:, :-1], use_cache=True)
        step = q(ids[:, -1:], cache=prefix.cache, use_cache=True).logits[:, -1]
        for block in attention_blocks(q):
            block.key_quantizer.enabled = block.value_quantizer.enabled = False
        float_cache = q(ids, use_cache=False).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)
    assert (float_cache - full).abs().max() > 1e-3  # the 4-bit cache does change the logits


def test_disabled_quantizers_give_the_float_model_exactly():
    model = tiny_lm("qwen2")
    q = lowbit.quantize(model, W4A8KV4, calib_data=[token_batch()])
    for m in q.modules():
        if isinstance(m, lowbit.quant.Quantizer):
            m.enabled = False
    ids = token_batch(2, 10, seed=2)
    with torch.no_grad():
        assert torch.equal(q(ids).logits, model(ids).logits)


def test_cache_steps_learn():
    q = lowbit.quantize(tiny_lm(), W4A8KV4, calib_data=[token_batch()])
    q.train()
    q(token_batch(2, 16, seed=3), labels=token_batch(2, 16, seed=3)).loss.backward()
    block = attention_blocks(q)[0]
    for quantizer in (block.key_quantizer, block.value_quantizer):
        assert quantizer.scale.grad is not None and quantizer.scale.grad.abs().sum() > 0


def test_summary_lists_cache_and_embedding_quantizers():
    recipe = {**W4A8KV4, "embeddings": {"method": "lsq", "bits": 8, "granularity": "channel"}}
    q = lowbit.quantize(tiny_lm(), recipe, calib_data=[token_batch()])
    text = str(lowbit.summary(q))
    assert "model.layers.1.self_attn  " in text and "key 4b lsq/ch, value 4b lsq/ch" in text
    assert "model.embed_tokens" in text and "token ids" in text
    assert q.model.embed_tokens.weight_quantizer.get_scale().shape == (VOCAB,)  # one step per token
    assert q.lowbit_report.points["kv_cache"] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]


class NotHFAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.k_proj, self.v_proj = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.k_proj(x) + self.v_proj(x)


class CustomAttention(NotHFAttention):
    pass


class Net(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.block(x))


def test_unknown_attention_class_is_an_error_naming_module_and_families():
    model = Net(CustomAttention())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RecipeError, match=r"block is a .*CustomAttention.*supported attention families: llama "
                                          r"\(LlamaAttention\), mistral"):
        lowbit.quantize(model, W4A8KV4, calib_data=[torch.randn(4, 8)], inplace=True)
    assert not any(isinstance(m, lowbit.nn.QuantMixin) for m in model.modules())  # the swap was undone
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_subclass_of_a_known_family_is_not_trusted():
    from transformers.models.llama.modeling_llama import LlamaAttention

    model = tiny_lm()
    sub = type("PatchedLlamaAttention", (LlamaAttention,), {})
    model.model.layers[1].self_attn.__class__ = sub
    with pytest.raises(RecipeError, match="model.layers.1.self_attn is a .*PatchedLlamaAttention"):
        lowbit.quantize(model, W4A8KV4)


def test_kv_cache_on_a_model_without_attention():
    with pytest.raises(RecipeError, match="has no attention block"):
        lowbit.quantize(Net(NotHFAttention().k_proj), W4A8KV4)


@pytest.mark.parametrize("section, message", [
    ({"method": "lsq", "bits": 8, "granularity": "channel"}, r"granularity must be one of \['head', 'tensor'\]"),
    ({"method": "lsq", "bits": 8, "step": 0.1}, "does not take option"),
    ({"method": "lsq"}, "needs both 'method' and 'bits'"),
    ("8bit", "a quantizer spec is a mapping"),
])
def test_kv_cache_section_is_validated(section, message):
    with pytest.raises(RecipeError, match=message):
        lowbit.load_recipe({**W4A8KV4, "kv_cache": section})


def test_per_tensor_cache_step():
    q = lowbit.quantize(tiny_lm(), {**W4A8KV4, "kv_cache": {"method": "minmax", "bits": 8, "granularity": "tensor"}},
                        calib_data=[token_batch()])
    assert attention_blocks(q)[0].key_quantizer.get_scale().shape == ()


def test_save_and_load_round_trip(tmp_path):
    q = lowbit.quantize(tiny_lm(), W4A8KV4, calib_data=[token_batch()])
    lowbit.save(q, tmp_path / "q")
    back = lowbit.load(tmp_path / "q", model=tiny_lm(seed=5))
    ids = token_batch(1, 10, seed=6)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, q.eval()(ids).logits)
    assert len(attention_blocks(back)) == 2
