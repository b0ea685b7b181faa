"""Per-token activation steps (``granularity: token``): each token's min-max step computed from the input as it
arrives; through quantize, the transformer export and back, and refused where steps must be calibrated."""

import json

import pytest
import torch
from torch import nn

import lowbit
from lowbit.deploy import ExportError
from lowbit.errors import RecipeError
from lowbit.deploy.format import MANIFEST_FILE
from lowbit.quant import make_quantizer


def tokens(seed=0):
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(seed))
    x[0, 1] *= 100  # one outlier token
    return x


def test_symmetric_per_token_steps_are_each_tokens_max_over_127():
    q = make_quantizer("minmax", bits=8, role="activation", granularity="token")
    x = tokens()
    s = x.abs().amax(-1, keepdim=True) / 127
    expected = torch.clamp(torch.round(x / s), -128, 127) * s
    assert torch.equal(q(x), expected)
    assert torch.equal(q.quantize_int(x).abs().amax(-1), torch.full((2, 5), 127, dtype=torch.int32))
    q.eval()
    assert torch.equal(q(x), expected)  # inference computes the steps the same way


def test_an_outlier_token_leaves_the_other_tokens_steps_alone():
    x = tokens()
    per_token = make_quantizer("minmax", bits=8, role="activation", granularity="token")
    per_tensor = make_quantizer("minmax", bits=8, role="activation")
    others = torch.ones(2, 5, dtype=torch.bool)
    others[0, 1] = False
    err_token = (per_token(x) - x).abs().amax(-1)[others]
    err_tensor = (per_tensor(x) - x).abs().amax(-1)[others]
    assert float(err_token.max()) <= float(x.abs().amax(-1)[others].max()) / 127 / 2 + 1e-6
    assert float(err_token.max()) * 20 < float(err_tensor.max())


def test_asymmetric_per_token_grid_spans_each_tokens_range():
    q = make_quantizer("minmax", bits=8, role="activation", granularity="token", symmetric=False)
    x = tokens(1)
    lo, hi = x.amin(-1, keepdim=True).clamp_max(0), x.amax(-1, keepdim=True).clamp_min(0)
    assert bool(((q(x) - x).abs() <= (hi - lo) / 255 / 2 * (1 + 1e-5)).all())


@pytest.mark.parametrize("method, role", [("lsq", "activation"), ("percentile", "activation"),
                                          ("minmax", "weight")])
def test_token_steps_need_minmax_activations(method, role):
    with pytest.raises(ValueError, match="token"):
        make_quantizer(method, bits=8, role=role, granularity="token")


def test_cnn_export_refuses_per_token_inputs_with_the_fix():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    recipe = {"weights": {"method": "minmax", "bits": 8, "granularity": "channel"},
              "activations": {"method": "minmax", "bits": 8, "granularity": "token"}}
    qmodel = lowbit.quantize(model, recipe, calib_data=[torch.randn(4, 16)])
    with pytest.raises(ExportError, match="per token.*granularity 'tensor' or 'channel'"):
        lowbit.export(qmodel, "unused-folder", input_shape=(1, 16))


def test_encoder_with_per_token_inputs_exports_and_reloads_bit_for_bit(tmp_path):
    pytest.importorskip("transformers")
    from test_encoder_ptq import tiny_bert, token_batches  # needs transformers

    recipe = lowbit.load_recipe("ptq-w8a8-transformer").to_dict()
    recipe["activations"] = {"method": "minmax", "bits": 8, "granularity": "token", "symmetric": False}
    qmodel = lowbit.quantize(tiny_bert(), recipe, calib_data=token_batches(2, 0)).eval()
    path = lowbit.export(qmodel, tmp_path / "export")
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    grid = manifest["layers"]["encoder.layer.0.attention.self.query"]["input"]
    assert grid["granularity"] == "token" and grid["symmetric"] is False and "scale" not in grid
    reloaded = lowbit.load_export(path, model=tiny_bert(seed=1))
    packed = lowbit.load_export(path, model=tiny_bert(seed=1), packed="int8")  # per-feature steps are refused here
    for batch in token_batches(2, 5):
        with torch.no_grad():
            want = qmodel(**batch).last_hidden_state
            assert torch.equal(want, reloaded(**batch).last_hidden_state)
            torch.testing.assert_close(packed(**batch).last_hidden_state, want, rtol=1e-4, atol=1e-4)


def test_a_recipe_asking_token_steps_of_a_learned_quantizer_is_refused_at_load():
    with pytest.raises(RecipeError, match="lsq cannot compute a step per token.*minmax"):
        lowbit.load_recipe({"activations": {"method": "lsq", "bits": 8, "granularity": "token"}})


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("kernel", ["int8", "int4"])
def test_packed_linear_runs_per_token_steps_in_one_integer_product(symmetric, kernel):
    from lowbit.deploy.packed import PackedLinear  # the deploy layer, above the quantizers tested above
    from lowbit.deploy.layers import layer_from_module

    recipe = {"weights": {"method": "minmax", "bits": 4, "granularity": "channel"},
              "activations": {"method": "minmax", "bits": 8, "granularity": "token", "symmetric": symmetric}}
    x = tokens(2)[..., :16].repeat(1, 1, 4) + 0.5  # 64 features; shifted so asymmetric grids have a zero point
    qlayer = lowbit.quantize(nn.Sequential(nn.Linear(64, 32)), recipe, calib_data=[x]).eval()[0]
    packed = PackedLinear(layer_from_module("fc", qlayer), kernel)
    assert packed.kernel == kernel
    with torch.no_grad():
        got, want = packed(x), qlayer(x)
    if kernel == "int8":  # exact int32 accumulation: float32 rounding only
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:  # bfloat16 accumulator: 8 significant bits
        assert bool(((got - want).abs() <= 2.0**-8 * want.abs().amax() * 4).all())


def test_a_causal_lm_with_per_token_inputs_exports_reloads_and_packs(tmp_path):
    pytest.importorskip("transformers")
    from tiny_lm import tiny_lm, token_batch  # needs transformers

    model = tiny_lm(hidden_size=64, intermediate_size=128)
    qmodel = lowbit.quantize(model, "ptq-w8a8kv8-token", calib_data=[token_batch()]).eval()
    path = lowbit.export(qmodel, tmp_path / "export")
    ids = token_batch(seed=4)
    with torch.no_grad():
        want = qmodel(ids).logits
        assert torch.equal(lowbit.load_export(path, model=model)(ids).logits, want)
        packed = lowbit.load_export(path, model=model, packed="int8")(ids).logits
    torch.testing.assert_close(packed, want, rtol=1e-4, atol=1e-4)


def test_token_steps_on_a_convolution_are_refused_naming_the_layer_and_the_fix():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    recipe = {"activations": {"method": "minmax", "bits": 8, "granularity": "token"}}
    with pytest.raises(RecipeError, match="layer '0' inputs.*Conv2d.*granularity: tensor"):
        lowbit.quantize(model, recipe, calib_data=[torch.randn(2, 1, 6, 6)])
    recipe["layers"] = {"0": {"activations": {"granularity": "tensor"}}}
    assert lowbit.quantize(model, recipe, calib_data=[torch.randn(2, 1, 6, 6)]).lowbit_report.quantized
