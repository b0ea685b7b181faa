"""A quantized Hugging Face encoder (BERT) through lowbit.export / lowbit.load_export: the transformer export
(lowbit.deploy.transformer) with model_kind "encoder", reloaded into a float model of the same config."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lowbit  # noqa: E402
from lowbit.deploy import ExportError, ExportFileError  # noqa: E402
from lowbit.deploy.format import MANIFEST_FILE  # noqa: E402
from test_encoder_ptq import tiny_bert, token_batches  # noqa: E402


def hidden(model, batches):
    with torch.no_grad():
        return [model(**b).last_hidden_state for b in batches]


@pytest.fixture(scope="module", params=["ptq-w8a8-transformer", "lsq-w4a8-transformer"])
def exported(request, tmp_path_factory):
    qmodel = lowbit.quantize(tiny_bert(), request.param, calib_data=token_batches(2, 0)).eval()
    path = lowbit.export(qmodel, tmp_path_factory.mktemp("bert") / "export")
    return qmodel, path


def test_encoder_export_reloads_bit_for_bit_into_another_float_model(exported):
    qmodel, path = exported
    assert json.loads((path / MANIFEST_FILE).read_text())["model_kind"] == "encoder"
    other = tiny_bert(seed=1)  # same config, other weights: every tensor must come from the export
    before = {k: v.clone() for k, v in other.state_dict().items()}
    reloaded = lowbit.load_export(path, model=other)
    batches = token_batches(2, 5)
    for a, b in zip(hidden(qmodel, batches), hidden(reloaded, batches)):
        assert torch.equal(a, b)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())  # the caller's model is untouched


def test_packed_loading_refuses_per_feature_input_steps_with_the_reason(exported):
    """The -transformer recipes give each Linear input one step per feature, which the packed kernels (one integer
    matrix product with a per-tensor input grid) cannot run exactly: refused, naming the layer, not approximated."""
    _, path = exported
    with pytest.raises(ExportError, match="attention.self.query.*channel-wise"):
        lowbit.load_export(path, model=tiny_bert(), packed="int8")


def test_encoder_export_refuses_a_model_of_another_config(exported):
    _, path = exported
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32, layer_norm_eps=1e-6)
    with pytest.raises(ExportFileError, match="layer_norm_eps"):
        lowbit.load_export(path, model=transformers.BertModel(config).eval())
    with pytest.raises(ExportFileError, match="float architecture"):
        lowbit.load_export(path)
