"""Transformer encoders (BERT) through lowbit: every shipped recipe on tokenizer batches, quantized embedding tables,
per-feature activation steps against outlier channels, the embedding-agreement metric by hand, encoder fine-tuning,
and the tokenizer/model mismatch error. All on a tiny random BertModel."""

import pytest
import torch

import lowbit
from lowbit.errors import CalibrationError, RecipeError
from lowbit.llm.encoder import (SentenceEncoder, embedding_agreement, is_encoder, nearest_neighbours, pack,
                                sentence_embeddings, unpack)
from lowbit.nn.modules import QuantEmbedding, QuantLinear

transformers = pytest.importorskip("transformers")
VOCAB = 50


def tiny_bert(seed: int = 0, hidden: int = 16):
    """A 2-layer BertModel (hidden 16 unless told) with random weights, in eval mode."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=2 * hidden, max_position_embeddings=32)
    return transformers.BertModel(config).eval()


def token_batches(count: int, seed: int, batch: int = 8, length: int = 12) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(1, VOCAB, (batch, length), generator=g)
        mask = torch.ones_like(ids)
        mask[: batch // 2, length - 3:] = 0  # padded sentences
        out.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)})
    return out


def shipped_for_models():
    """The shipped recipes for models in general (the RL students' and the causal LMs' KV-cache recipes aside)."""
    return [r for r in lowbit.list_recipes()
            if not r.startswith("rl-") and lowbit.load_recipe(r).kv_cache is None]


@pytest.mark.parametrize("recipe", shipped_for_models())
def test_every_shipped_recipe_takes_tokenizer_batches(recipe):
    model = tiny_bert(hidden=64)  # whole groups of 64 weights for lsq-w4a8-bert
    qmodel = lowbit.quantize(model, recipe, calib_data=token_batches(2, 1))
    embeddings = [n for n, m in qmodel.named_modules() if isinstance(m, QuantEmbedding)]
    assert embeddings == ["embeddings.word_embeddings", "embeddings.position_embeddings",
                          "embeddings.token_type_embeddings"]
    batch = token_batches(1, 2)[0]
    with torch.no_grad():
        out = qmodel(**batch).last_hidden_state
    assert torch.isfinite(out).all() and out.shape == (8, 12, 64)
    assert not any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in model.modules())  # the caller's model


def test_embedding_rows_are_on_their_own_8_bit_grid():
    model = tiny_bert()
    qmodel = lowbit.quantize(model, "ptq-w8a8", calib_data=token_batches(1, 1))
    table = qmodel.embeddings.word_embeddings
    w = model.embeddings.word_embeddings.weight.detach()
    step = w.abs().amax(1) / 127
    assert torch.all(w[0] == 0)  # the padding row: nothing to quantize, code 0 whatever its step
    assert torch.allclose(table.weight_quantizer.get_scale()[1:], step[1:])
    codes = table.weight_quantizer.quantize_int(w)
    assert torch.all(codes[0] == 0) and torch.equal(codes[1:], torch.round(w[1:] / step[1:, None]).to(torch.int32))
    ids = torch.tensor([[3, 7]])
    assert torch.allclose(table(ids)[0], torch.round(w[[3, 7]] / step[[3, 7], None]) * step[[3, 7], None])


def test_stored_size_counts_quantized_embedding_tables():
    model = tiny_bert()
    fp32 = lowbit.stored_size_bytes(lowbit.quantize(model, {"weights": None, "activations": None}))
    w8 = lowbit.stored_size_bytes(lowbit.quantize(model, "ptq-w8a8-transformer", calib_data=token_batches(1, 1)))
    rows = VOCAB + 32 + 2  # word, position and token-type rows: each one fp32 step
    table_params = rows * 16
    assert fp32 - w8 >= table_params * 3 - rows * 4  # every table went from 4 bytes to 1 (+ its steps)


def test_per_feature_activation_steps_cope_with_an_outlier_channel():
    """Inputs with one feature 40x the others (as BERT's LayerNorm outputs have): one 8-bit step for the tensor
    rounds the other features to a few levels; the transformer recipe's step per input feature keeps them."""
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(16, 8))
    scale = torch.ones(16)
    scale[3] = 40.0
    with torch.no_grad():
        layer[0].weight[:, 3] /= 40.0  # the outlier feature contributes like the others
    calib, x = torch.randn(64, 5, 16) * scale, torch.randn(64, 5, 16) * scale
    with torch.no_grad():
        reference = layer(x)

    def error(recipe):
        with torch.no_grad():
            out = lowbit.quantize(layer, recipe, calib_data=[calib])(x)
        return float((out - reference).pow(2).mean() / reference.pow(2).mean())

    per_tensor = error({"weights": None, "activations": {"method": "minmax", "bits": 8}})
    per_feature = error({"weights": None, "activations": {"method": "minmax", "bits": 8, "granularity": "channel"}})
    assert per_feature < per_tensor / 20
    assert error("ptq-w8a8-transformer") < error("ptq-w8a8") / 5


def test_embedding_agreement_by_hand():
    reference = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]), dim=1)
    quantized = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 0.9]]), dim=1)
    got = embedding_agreement(reference, quantized)
    cos = (reference * quantized).sum(1)
    assert got["cosine_mean"] == pytest.approx(float(cos.mean())) and got["cosine_min"] == pytest.approx(float(cos.min()))
    assert nearest_neighbours(reference).tolist() == [1, 0, 1] and nearest_neighbours(quantized).tolist() == [2, 2, 1]
    assert got["same_neighbour"] == pytest.approx(1 / 3)


def test_sentence_embeddings_ignore_padding():
    model = tiny_bert()
    batch = token_batches(1, 3)[0]
    short = {k: v[:1, :9] for k, v in batch.items()}  # row 0 has 3 padded positions at the end
    padded = {k: v[:1] for k, v in batch.items()}
    assert torch.allclose(sentence_embeddings(model, [short]), sentence_embeddings(model, [padded]), atol=1e-5)


def test_pack_round_trip_and_objective_choice():
    batch = token_batches(1, 4)[0]
    packed = pack(batch)
    assert packed.shape == (8, 3, 12) and all(torch.equal(unpack(packed)[k], v) for k, v in batch.items())
    assert is_encoder(tiny_bert())
    from lowbit.qat.objective import objective_for

    assert isinstance(objective_for(tiny_bert()), SentenceEncoder)


def test_encoder_fine_tuning_by_distillation_reduces_the_error():
    model = tiny_bert(seed=1)
    calib, test = token_batches(2, 1), token_batches(2, 9)
    qmodel = lowbit.quantize(model, "lsq-w4a8-transformer", calib_data=calib)
    before = embedding_agreement(sentence_embeddings(model, test), sentence_embeddings(qmodel, test))["cosine_mean"]
    lowbit.finetune(qmodel, token_batches(16, 5), teacher=model,
                    config={"lr": 3e-4, "max_steps": 40, "progress": False, "epochs": 10})
    after = embedding_agreement(sentence_embeddings(model, test), sentence_embeddings(qmodel, test))["cosine_mean"]
    assert 1 - after < 0.8 * (1 - before)


def test_tokenizer_of_another_model_is_a_clear_error():
    model = tiny_bert()
    batch = token_batches(1, 1)[0]
    batch["input_ids"] = batch["input_ids"] + VOCAB  # ids beyond the vocabulary
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for recipe in ("ptq-w8a8", "ptq-w4a4-aciq"):  # the second folds batch norm first, which runs the model
        with pytest.raises(CalibrationError, match=rf"vocabulary of {VOCAB}.*another model's tokenizer"):
            lowbit.quantize(model, recipe, calib_data=[batch])
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_a_quantized_encoder_saves_and_loads_as_a_checkpoint(tmp_path):
    """(Its export is tests/test_encoder_export.py.)"""
    qmodel = lowbit.quantize(tiny_bert(), "ptq-w8a8-transformer", calib_data=token_batches(1, 1))
    lowbit.save(qmodel, tmp_path / "ckpt")
    again = lowbit.load(tmp_path / "ckpt", model=tiny_bert())
    batch = token_batches(1, 3)[0]
    with torch.no_grad():
        assert torch.equal(again.eval()(**batch).last_hidden_state, qmodel.eval()(**batch).last_hidden_state)


def test_layer_patterns_override_single_embedding_tables():
    """A ``layers`` pattern naming a table overrides the embeddings point's weights there: 8 bits, or float."""
    recipe = lowbit.load_recipe("lsq-w4a8-transformer").to_dict()
    recipe["layers"] = {"*position_embeddings": {"weights": {"bits": 8}}, "*token_type_embeddings": {"weights": None}}
    qmodel = lowbit.quantize(tiny_bert(), recipe, calib_data=token_batches(1, 1))
    tables = qmodel.embeddings
    assert tables.word_embeddings.weight_quantizer.bits == 4
    assert tables.position_embeddings.weight_quantizer.bits == 8
    assert not hasattr(tables.token_type_embeddings, "weight_quantizer")
    assert "embeddings.token_type_embeddings" in qmodel.lowbit_report.left_float
    with pytest.raises(RecipeError, match=r"'\*nowhere_embeddings' matches no.*embedding tables: embeddings\.word"):
        lowbit.quantize(tiny_bert(), {**recipe, "layers": {"*nowhere_embeddings": {"weights": {"bits": 8}}}},
                        calib_data=token_batches(1, 1))


def test_the_bert_recipe_keeps_the_sensitive_layers_at_8_bits_and_the_rest_at_4():
    """lsq-w4a8-bert: FFN inputs, attention values and output projections, position and token-type tables at 8-bit
    weights; queries, keys, FFN outputs and word embeddings at 4; every Linear input per-token 8-bit."""
    qmodel = lowbit.quantize(tiny_bert(hidden=64), "lsq-w4a8-bert", calib_data=token_batches(1, 1))
    layer = qmodel.encoder.layer[0]
    eight = [layer.intermediate.dense, layer.attention.self.value, layer.attention.output.dense,
             qmodel.embeddings.position_embeddings, qmodel.embeddings.token_type_embeddings]
    four = [layer.attention.self.query, layer.attention.self.key, layer.output.dense, qmodel.embeddings.word_embeddings]
    assert [m.weight_quantizer.bits for m in eight] == [8] * 5
    assert [m.weight_quantizer.bits for m in four] == [4] * 4
    assert layer.attention.self.query.weight_quantizer.granularity.group_size == 64
    assert {(m.input_quantizer.bits, m.input_quantizer.granularity.kind) for m in layer.modules()
            if isinstance(m, torch.nn.Linear)} == {(8, "token")}


def test_a_group_size_that_does_not_divide_a_layer_is_refused_at_quantize_time():
    """Group-wise steps need whole groups in every output channel: named before any data flows, model untouched."""
    model = tiny_bert()  # hidden size 16
    state = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = {**lowbit.load_recipe("lsq-w4a8-transformer").to_dict(),
              "weights": {"method": "lsq", "bits": 4, "granularity": "group:64", "init": "mse"}}
    with pytest.raises(RecipeError, match=r"'encoder\.layer\.0\.attention\.self\.query' weights: group:64 needs a "
                                          r"multiple of 64 .* it has 16"):
        lowbit.quantize(model, recipe, calib_data=token_batches(1, 1))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_alps_ranks_an_encoders_layers_by_a_score_on_tokenizer_batches(tmp_path):
    """ALPS on a BERT: tokenizer dict batches for calibration, fine-tuning and the score (embedding cosine to the
    float model, as benchmarks/mixed_pretrained.py does for MiniLM), one drop per candidate Linear layer."""
    from lowbit.mixed import ALPS, build_space

    model = tiny_bert(seed=1)
    held_out = token_batches(2, 9)
    reference = sentence_embeddings(model, held_out)

    def cosine(qmodel, batches):
        return 100 * embedding_agreement(reference, sentence_embeddings(qmodel, batches))["cosine_mean"]

    space = build_space(model, "lsq-w4a8-transformer", example_input=held_out[0], precisions=["w4a8", "w2a8"])
    alps = ALPS(model, space, token_batches(4, 5), held_out, steps=2, calib_data=token_batches(2, 1),
                cache_dir=tmp_path, score=cosine, config={"lr": 3e-4, "progress": False}, log=lambda _m: None)
    result = alps.run()
    assert result.complete and set(result.drops()) == set(space.candidates)
    assert 0 < result.base_accuracy <= 100 and all(abs(d) < 100 for d in result.drops().values())
