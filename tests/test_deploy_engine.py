"""The integer reference engine: fixed-point arithmetic against exact rationals, agreement with the fake-quant
model on digits for every zoo model, FAQ's pure shifts, fractional zero points, and what it refuses."""

import math
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lowbit
from lowbit.data import make_loader
from lowbit.deploy import ExportError, IntegerEngine, quantize_multiplier, rounding_shift
from lowbit.deploy.engine import requantize
from lowbit.nn.modules import QuantMixin
from lowbit.zoo import checkpoint_path, create_model


# ----- fixed-point arithmetic ---------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(m=st.floats(1e-9, 1e6, allow_nan=False), negative=st.booleans())
def test_multiplier_is_a_31_bit_mantissa_and_shift(m, negative):
    m = -m if negative else m
    m0, n = quantize_multiplier(m)
    assert 2**30 <= abs(m0) < 2**31 and 0 <= n <= 62
    assert abs(Fraction(m0, 2**n) - Fraction(m)) <= Fraction(abs(m)) / 2**30


def test_multiplier_of_a_power_of_two_is_exact():
    for k in range(-30, 20):
        m0, n = quantize_multiplier(2.0**k)
        assert m0 == 2**30 and Fraction(m0, 2**n) == Fraction(2) ** k
    assert quantize_multiplier(0.0) == (0, 0)


def _exact_round(fr: Fraction, mode: str) -> int:
    floor = math.floor(fr)
    rest = fr - floor
    if mode == "half_up":
        return floor + (rest >= Fraction(1, 2))
    return floor + (rest > Fraction(1, 2) or (rest == Fraction(1, 2) and floor % 2 == 1))


@settings(max_examples=300, deadline=None)
@given(x=st.integers(-2**61, 2**61), n=st.integers(0, 40), mode=st.sampled_from(["half_even", "half_up"]))
def test_rounding_shift_is_exact(x, n, mode):
    got = int(rounding_shift(torch.tensor([x]), n, mode))
    assert got == _exact_round(Fraction(x, 2**n), mode)


@settings(max_examples=200, deadline=None)
@given(acc=st.lists(st.integers(-2**31, 2**31 - 1), min_size=1, max_size=8), m=st.floats(1e-7, 1.0))
def test_requantize_matches_the_real_multiplier(acc, m):
    """round(acc * M0 / 2^n) is the exact rounding of acc * (M0 2^-n), and within one unit of acc * m."""
    m0, n = quantize_multiplier(m)
    got = requantize(torch.tensor(acc), torch.tensor(m0), torch.tensor(n)).tolist()
    for a, g in zip(acc, got):
        assert g == _exact_round(Fraction(a) * Fraction(m0, 2**n), "half_even")
        assert abs(g - a * m) <= 0.5 + abs(a * m) * 2**-30


@settings(max_examples=300, deadline=None)
@given(t=st.integers(-2**62 + 1, 2**62 - 1), m0=st.integers(-2**31 + 1, 2**31 - 1), n=st.integers(0, 62),
       mode=st.sampled_from(["half_even", "half_up"]))
def test_requantize_of_wide_values_is_exact(t, m0, n, mode):
    """Wide (int64) values: the 93-bit product is emulated in 64-bit pieces, and the rounding stays exact."""
    exact = Fraction(t * m0, 2**n)
    if abs(exact) >= 2**62:
        return
    got = int(requantize(torch.tensor([t]), torch.tensor(m0), torch.tensor(n), mode))
    assert got == _exact_round(exact, mode)


# ----- engine vs fake-quant on digits ---------------------------------------------------------
@pytest.fixture(scope="module")
def data():
    calib = list(make_loader("digits", "calib", 64, limit=64))
    x = next(iter(make_loader("digits", "test", 64)))[0]
    return calib, x


def _input_codes(qmodel, x) -> dict[str, torch.Tensor]:
    codes, hooks = {}, []
    for name, m in qmodel.named_modules():
        if isinstance(m, QuantMixin) and m.input_quantizer is not None:
            hooks.append(m.register_forward_pre_hook(
                lambda mod, inp, name=name: codes.__setitem__(name, mod.input_quantizer.quantize_int(inp[0]))))
    with torch.no_grad():
        out = qmodel(x)
    for h in hooks:
        h.remove()
    return codes, out


FAQ_POW2 = {"weights": {"method": "faq", "bits": 4}, "activations": {"method": "faq", "bits": 4},
            "layers": {"@first": {"weights": {"bits": 8}, "activations": {"bits": 8}},
                       "@last": {"weights": {"bits": 8}, "activations": {"bits": 8}}},
            "ptq": {"fold_bn": True}}


@pytest.mark.parametrize("name", ["resnet20", "vgg", "mobilenet", "mlp"])
@pytest.mark.parametrize("recipe", ["ptq-w8a8", "ptq-w4a4-aciq"])
def test_engine_agrees_with_fake_quant(name, recipe, data, tmp_path):
    calib, x = data
    torch.manual_seed(0)
    qmodel = lowbit.quantize(create_model(name, in_size=8).eval(), recipe, calib_data=calib).eval()
    engine = IntegerEngine.from_model(qmodel)
    out = engine.run(x, capture=True)
    assert out.values.dtype == torch.int32 and engine.stats["saturated"] == 0
    ref_codes, ref = _input_codes(qmodel, x)
    assert (out.values.argmax(1) == ref.argmax(1)).float().mean() >= 0.98
    assert torch.allclose(out.dequantize(), ref, atol=0.05 * ref.abs().max().item())
    for layer, codes in ref_codes.items():  # the integer codes every layer reads, code for code
        diff = (engine.captured[layer] - codes).abs()
        # float ties rounded apart, then propagated through a random-weight net: a few codes one step off, rarely more
        assert (diff > 0).float().mean().item() <= 0.02 and (diff > 1).float().mean().item() <= 0.005, layer
    assert torch.equal(engine.captured[engine.graph.layers[0]], ref_codes[engine.graph.layers[0]])  # input: exact
    # from the written folder: the same integers
    lowbit.export(qmodel, tmp_path)
    assert torch.equal(IntegerEngine.from_path(tmp_path).run(x).values, out.values)


def test_int32_bias_mode_is_the_standard_pipeline(data, tmp_path):
    """bias="int32" adds the exported int32 bias in accumulator units (what integer runtimes do); the default
    adds the exact bias in the requantisation frame. Both run; the exact one is at least as close."""
    calib, x = data
    torch.manual_seed(0)
    qmodel = lowbit.quantize(create_model("mlp", in_size=8).eval(), "ptq-w4a4-minmax", calib_data=calib).eval()
    lowbit.export(qmodel, tmp_path)
    exact, rounded = IntegerEngine.from_path(tmp_path), IntegerEngine.from_path(tmp_path, bias="int32")
    assert exact.summary_counts()["exact_bias"] == 3 and rounded.summary_counts()["exact_bias"] == 0
    with torch.no_grad():
        ref = qmodel(x)
    err_exact = (exact(x) - ref).abs().max()
    err_rounded = (rounded(x) - ref).abs().max()
    assert err_exact <= err_rounded and err_exact < 1e-4 * ref.abs().max()
    lowbit.export(qmodel, tmp_path / "int32", float_bias=False)  # without float biases: the int32 ones
    assert IntegerEngine.from_path(tmp_path / "int32").summary_counts()["exact_bias"] == 0
    assert torch.equal(IntegerEngine.from_path(tmp_path / "int32").run(x).values, rounded.run(x).values)


def test_faq_power_of_two_steps_run_as_pure_shifts(data):
    calib, x = data
    torch.manual_seed(0)
    qmodel = lowbit.quantize(create_model("resnet20", in_size=8).eval(), FAQ_POW2, calib_data=calib).eval()
    engine = IntegerEngine.from_model(qmodel)
    counts = engine.summary_counts()
    assert counts["pure_shift"] == counts["layers"] == 22
    assert "pure shift" in engine.describe()
    with torch.no_grad():
        ref = qmodel(x)
    assert (engine.predict(x) == ref.argmax(1)).float().mean() >= 0.98


class _Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.fc = nn.Linear(6 * 64, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.dw(torch.relu(self.conv(x)))).flatten(1))


def test_fractional_weight_zero_points_are_exact(data):
    """Bias correction gives fractional per-channel weight zero points: the engine's correction term
    z_w * sum(q_x - z_x) makes the logits the exact rounding of the real layer output."""
    calib, x = data
    torch.manual_seed(3)
    recipe = {"weights": {"method": "minmax", "bits": 4, "granularity": "channel", "bias_correction": True},
              "activations": {"method": "minmax", "bits": 8}}
    qmodel = lowbit.quantize(_Depthwise().eval(), recipe, calib_data=calib).eval()
    exp = lowbit.deploy.build_export(qmodel)
    fc = exp.layers["fc"]
    assert not torch.equal(fc.weight_grid.zero_point, fc.weight_grid.zero_point.round())
    engine = IntegerEngine(exp)
    assert engine.kernels["fc"].has_corr and engine.kernels["dw"].has_corr  # depthwise (groups=6) too
    out = engine.run(x, capture=True)
    ref_codes, _ = _input_codes(qmodel, x)
    assert torch.equal(engine.captured["dw"], ref_codes["dw"]) and torch.equal(engine.captured["fc"], ref_codes["fc"])
    # float64 reference of the last layer from the integers: sum (q_w - z_w)(q_x - z_x) s_w s_x + b
    qx = engine.captured["fc"].double() - float(fc.input_grid.zero_point)
    g = fc.weight_grid
    w = (fc.weight_codes.double() - g.zero_point.double()[:, None]) * g.scale.double()[:, None]
    y = qx @ w.T * float(fc.input_grid.scale) + fc.bias.double()
    err = (out.values.double() - y * 2.0**out.exponent).abs().max().item()
    assert err <= 0.5 + 1e-4  # the logits' rounding (after a 2^-19 finer wide value)


def test_negative_batch_norm_gamma_gives_negative_steps(data):
    """A batch norm left after a conv is folded into the weight step; a negative gamma gives a negative step."""
    calib, x = data
    torch.manual_seed(0)
    model = create_model("resnet20", in_size=8).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.randn_like(m.weight))
                m.bias.copy_(0.1 * torch.randn_like(m.bias))
    qmodel = lowbit.quantize(model, "ptq-w8a8", calib_data=calib).eval()
    exp = lowbit.deploy.build_export(qmodel)
    assert bool((exp.layers["layer1.0.conv1"].weight_grid.scale < 0).any())
    engine = IntegerEngine(exp)
    with torch.no_grad():
        ref = qmodel(x)
    assert (engine.predict(x) == ref.argmax(1)).float().mean() >= 0.98


def test_engine_takes_integer_codes_and_holds_integers_only(data):
    calib, x = data
    torch.manual_seed(0)
    qmodel = lowbit.quantize(create_model("vgg", in_size=8).eval(), "ptq-w8a8", calib_data=calib).eval()
    engine = IntegerEngine.from_model(qmodel)
    assert engine.input_rep.kind == "codes"
    codes = engine._quantize_float(x, engine.input_rep)
    assert codes.dtype == torch.int32
    assert torch.equal(engine.run(codes).values, engine.run(x).values)
    for k in engine.kernels.values():
        tensors = [k.weight, getattr(k, "bias", torch.zeros(1, dtype=torch.int64)), k.n]
        assert all(not t.is_floating_point() for t in tensors)
        assert k.weight.dtype in (torch.int32, torch.int64)


def test_engine_refuses_what_it_cannot_run(data):
    calib, _ = data
    torch.manual_seed(0)
    grouped = {"weights": {"method": "minmax", "bits": 4, "granularity": "group:16"},
               "activations": {"method": "minmax", "bits": 8}}
    qmodel = lowbit.quantize(create_model("mlp", in_size=8).eval(), grouped, calib_data=calib)
    with pytest.raises(ExportError, match=r"layer 'net.1'.*group-wise"):
        IntegerEngine.from_model(qmodel)
    float_input = {"weights": {"method": "minmax", "bits": 8, "granularity": "channel"}, "activations": None}
    qmodel = lowbit.quantize(create_model("mlp", in_size=8).eval(), float_input, calib_data=calib)
    with pytest.raises(ExportError, match=r"layer 'net.1' \(linear\).*input in float"):
        IntegerEngine.from_model(qmodel)


# ----- the full Fashion-MNIST test set (slow: also benchmarks/export_engine.py) ------------------
@pytest.mark.slow
@pytest.mark.skipif(not checkpoint_path("resnet20").is_file() or
                    not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="needs the shipped ResNet-20 checkpoint and Fashion-MNIST")
@pytest.mark.parametrize("recipe", ["ptq-w8a8", "ptq-w4a4-minmax", "ptq-w4a4-aciq"])
def test_engine_on_fashion_mnist_test_set(recipe):
    from lowbit.zoo import pretrained

    model = pretrained("resnet20")
    qmodel = lowbit.quantize(model, recipe, calib_data=make_loader("fashion-mnist", "calib", 128, limit=512)).eval()
    engine = IntegerEngine.from_model(qmodel)
    agree = fq = integer = total = 0
    with torch.no_grad():
        for x, y in make_loader("fashion-mnist", "test", 500):
            a, b = qmodel(x).argmax(1), engine.predict(x)
            agree += int((a == b).sum())
            fq += int((a == y).sum())
            integer += int((b == y).sum())
            total += len(y)
    assert agree / total >= 0.999
    assert abs(fq - integer) / total * 100 <= 0.05
