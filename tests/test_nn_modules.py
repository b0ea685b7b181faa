"""Quantized Conv1d / Conv2d / Linear: parameter sharing, forward by hand, modes, state dicts, to_float."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.nn import QuantConv1d, QuantConv2d, QuantLinear, QuantMixin
from lowbit.quant import make_quantizer



def float_layers():
    torch.manual_seed(0)
    return {
        "conv1d": (nn.Conv1d(3, 4, 3, stride=2, padding=1, dilation=2), QuantConv1d, (5, 3, 11), F.conv1d),
        "conv2d": (nn.Conv2d(3, 4, 3, stride=2, padding=1), QuantConv2d, (5, 3, 7, 7), F.conv2d),
        "linear": (nn.Linear(6, 5), QuantLinear, (7, 6), None),
    }


def apply_float(layer, x, w):
    """The float op of ``layer`` with the weight replaced by ``w``."""
    if isinstance(layer, nn.Linear):
        return F.linear(x, w, layer.bias)
    op = F.conv1d if isinstance(layer, nn.Conv1d) else F.conv2d
    return op(x, w, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)


def minmax_weight_by_hand(w, bits):
    """Per-output-channel symmetric signed grid: s_c = max|W_c| / (2^(b-1) - 1)."""
    qmax = 2 ** (bits - 1) - 1
    s = w.abs().reshape(w.shape[0], -1).amax(1) / qmax
    s = s.reshape(-1, *([1] * (w.dim() - 1)))
    return torch.clamp(torch.round(w / s), -qmax - 1, qmax) * s


def minmax_input_by_hand(x, bits):
    """Per-tensor min-max grid set from ``x`` itself: signed if ``x`` has a negative value."""
    if (x < 0).any():
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        s = x.abs().max() / qmax
    else:
        qmin, qmax = 0, 2**bits - 1
        s = x.max() / qmax
    return torch.clamp(torch.round(x / s), qmin, qmax) * s


def quant_pair(bits_w=4, bits_a=4):
    return (make_quantizer("minmax", bits=bits_w, role="weight", granularity="channel"),
            make_quantizer("minmax", bits=bits_a, role="activation"))


@pytest.mark.parametrize("kind", ["conv1d", "conv2d", "linear"])
def test_from_float_shares_parameters_and_keeps_state_dict_keys(kind):
    layer, qcls, shape, _ = float_layers()[kind]
    q = qcls.from_float(layer, *quant_pair())
    assert isinstance(q, type(layer)) and isinstance(q, QuantMixin)
    assert q.weight is layer.weight and q.bias is layer.bias
    float_keys = set(layer.state_dict())
    keys = set(q.state_dict())
    assert float_keys <= keys
    extra = keys - float_keys
    assert extra and all(k.startswith(("weight_quantizer.", "input_quantizer.")) for k in extra)
    assert {k.split(".")[0] for k in extra} == {"weight_quantizer", "input_quantizer"}
    # an optimizer step on the quantized layer moves the float layer's weight (the same tensor)
    before = layer.weight.detach().clone()
    opt = torch.optim.SGD(q.parameters(), lr=0.1)
    q.train()
    x = torch.randn(*shape)
    q(x).square().sum().backward()
    opt.step()
    assert not torch.equal(layer.weight.detach(), before)


@pytest.mark.parametrize("kind", ["conv1d", "conv2d", "linear"])
@pytest.mark.parametrize("relu", [False, True], ids=["signed-input", "unsigned-input"])
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_forward_is_float_op_on_fake_quantized_input_and_weight(kind, relu, bits):
    layer, qcls, shape, _ = float_layers()[kind]
    layer.eval()
    torch.manual_seed(1)
    x = torch.randn(*shape)
    if relu:
        x = x.relu()
    q = qcls.from_float(layer, *quant_pair(bits, bits)).eval()
    with torch.no_grad():
        got = q(x)
        want = apply_float(layer, minmax_input_by_hand(x, bits), minmax_weight_by_hand(layer.weight, bits))
        plain = layer(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, plain, atol=1e-4)  # quantization did something
    assert q.input_quantizer.signed is (not relu)


@pytest.mark.parametrize("kind", ["conv1d", "conv2d", "linear"])
def test_weight_only_and_input_only(kind):
    layer, qcls, shape, _ = float_layers()[kind]
    x = torch.randn(*shape)
    wq = make_quantizer("minmax", bits=4, role="weight", granularity="channel")
    q = qcls.from_float(layer, wq, None).eval()
    with torch.no_grad():
        torch.testing.assert_close(q(x), apply_float(layer, x, minmax_weight_by_hand(layer.weight, 4)),
                                   rtol=1e-5, atol=1e-6)
    aq = make_quantizer("minmax", bits=4, role="activation")
    q = qcls.from_float(layer, None, aq).eval()
    with torch.no_grad():
        torch.testing.assert_close(q(x), apply_float(layer, minmax_input_by_hand(x, 4), layer.weight),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["conv1d", "conv2d", "linear"])
def test_no_quantizers_is_exactly_the_float_layer(kind):
    layer, qcls, shape, _ = float_layers()[kind]
    x = torch.randn(*shape)
    q = qcls.from_float(layer, None, None)
    assert torch.equal(q(x), layer(x))
    assert set(q.state_dict()) == set(layer.state_dict())


@pytest.mark.parametrize("start_training", [True, False])
def test_train_eval_modes_propagate_to_quantizers(start_training):
    layer = nn.Conv2d(2, 3, 3)
    layer.train(start_training)
    q = QuantConv2d.from_float(layer, *quant_pair())
    assert q.training is start_training
    assert q.weight_quantizer.training is start_training and q.input_quantizer.training is start_training
    q.eval()
    assert not q.weight_quantizer.training and not q.input_quantizer.training
    q.train()
    assert q.weight_quantizer.training and q.input_quantizer.training
    model = nn.Sequential(q, nn.ReLU())
    model.eval()
    assert not q.training and not q.input_quantizer.training


def test_to_float_returns_the_plain_layer():
    for kind, (layer, qcls, shape, _) in float_layers().items():
        q = qcls.from_float(layer, *quant_pair()).eval()
        f = q.to_float()
        assert type(f) is type(layer), kind
        assert not isinstance(f, QuantMixin) and not hasattr(f, "weight_quantizer")
        assert f.weight is layer.weight and f.bias is layer.bias
        assert set(f.state_dict()) == set(layer.state_dict())
        x = torch.randn(*shape)
        assert torch.equal(f(x), layer(x))
        assert not torch.equal(q(x), layer(x))
        assert f.training is q.training
        # a side left float (quantizer None) leaves no attribute behind either
        f = qcls.from_float(layer, None, None).to_float()
        assert type(f) is type(layer) and "weight_quantizer" not in vars(f) and "input_quantizer" not in vars(f)


def test_hooks_are_not_shared_between_float_and_quantized_layer():
    layer = nn.Linear(4, 3)
    q = QuantLinear.from_float(layer, *quant_pair())
    calls = []
    q.register_forward_hook(lambda *a: calls.append("q"))
    layer(torch.randn(2, 4))
    assert calls == []  # registering on the quantized layer leaves the float layer alone
    q(torch.randn(2, 4))
    assert calls == ["q"]
    f = q.to_float()
    f.register_forward_hook(lambda *a: calls.append("f"))
    q(torch.randn(2, 4))
    assert calls == ["q", "q"]  # and the other way round


def test_isinstance_of_float_type_holds_in_a_prepared_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    q = lowbit.quantize(model, calib_data=[torch.randn(2, 1, 6, 6)])
    assert isinstance(q[0], nn.Conv2d) and isinstance(q[0], QuantConv2d)
    assert isinstance(q[3], nn.Linear) and isinstance(q[3], QuantLinear)
    assert [type(m) for m in q.modules() if isinstance(m, (nn.Conv2d, nn.Linear))] == [QuantConv2d, QuantLinear]


# ----- state dict round trip into a freshly prepared model -------------------------------------

class Net2d(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8 * 3 * 3, 5)

    def forward(self, x):
        return self.fc(torch.flatten(F.relu(self.conv2(F.relu(self.conv1(x)))), 1))


class Net1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6, 3)

    def forward(self, x):
        return self.fc(torch.flatten(F.relu(self.conv(x)), 1))


MODELS = {"2d": (Net2d, (4, 3, 6, 6)), "1d": (Net1d, (4, 2, 6))}
RECIPES = {
    "minmax-per-channel-acts": {"weights": {"method": "minmax", "bits": 4, "granularity": "channel"},
                                "activations": {"method": "minmax", "bits": 4, "granularity": "channel"}},
    "lsq-per-channel": {"weights": {"method": "lsq", "bits": 4, "granularity": "channel"},
                        "activations": {"method": "lsq", "bits": 4, "granularity": "channel"}},
    "sawb-pact": {"weights": {"method": "sawb", "bits": 4, "granularity": "channel"},
                  "activations": {"method": "pact", "bits": 4}},
    "lsq-pact-per-channel": {"weights": {"method": "lsq", "bits": 3},
                             "activations": {"method": "pact", "bits": 3, "granularity": "channel"}},
}


def learned_tensors(model):
    """The quantizers' learned parameters (LSQ steps, PACT clips), by name."""
    return {name: p.detach().clone() for name, p in model.named_parameters()
            if name.rpartition(".")[0].endswith(("weight_quantizer", "input_quantizer"))}


@pytest.mark.parametrize("model_kind", list(MODELS))
@pytest.mark.parametrize("recipe_name", list(RECIPES))
def test_state_dict_round_trip_into_fresh_prepared_model(model_kind, recipe_name):
    torch.manual_seed(0)
    cls, shape = MODELS[model_kind]
    model = cls().eval()
    recipe = RECIPES[recipe_name]
    calib = [torch.randn(*shape) for _ in range(2)]
    q = lowbit.quantize(model, recipe, calib_data=calib)
    learned_before = learned_tensors(q)
    assert bool(learned_before) == (recipe_name != "minmax-per-channel-acts")
    if learned_before:  # a few optimizer steps move the learned steps / clips
        q.train()
        opt = torch.optim.SGD(q.parameters(), lr=0.05)
        for _ in range(3):
            opt.zero_grad()
            q(torch.randn(*shape)).square().mean().backward()
            opt.step()
        learned_after = learned_tensors(q)
        assert any(not torch.equal(learned_before[k], learned_after[k]) for k in learned_before)
    q.eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        want = q(x)
    state = copy.deepcopy(q.state_dict())

    fresh = lowbit.quantize(cls().eval(), recipe)  # no calibration: per-channel steps still scalars
    fresh.load_state_dict(state)
    fresh.eval()
    with torch.no_grad():
        got = fresh(x)
    assert torch.equal(got, want)
    for name, m in q.named_modules():
        if isinstance(m, QuantMixin) and m.input_quantizer is not None:
            other = fresh.get_submodule(name).input_quantizer
            assert bool(other.initialized)
            assert other.get_scale().shape == m.input_quantizer.get_scale().shape
            if recipe["activations"].get("granularity") == "channel":
                width = m.in_channels if hasattr(m, "in_channels") else m.in_features
                assert other.get_scale().numel() == width
    # learned quantizer parameters are Parameters after loading (an optimizer can keep training them)
    for name, t in learned_tensors(fresh).items():
        assert name in learned_before
    assert set(dict(fresh.named_parameters())) == set(dict(q.named_parameters()))
    assert not torch.equal(q(x), model(x))


@pytest.mark.parametrize("method", ["minmax", "sawb"])
def test_eval_after_training_uses_the_grid_of_the_current_weights(method):
    """Dynamic weight grids are set at each training forward; an optimizer step then moves the weight, so
    switching to eval must re-derive the grid, or eval (and export) would quantize with a stale step."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    q = QuantLinear.from_float(layer, make_quantizer(method, bits=4, role="weight", granularity="channel"), None)
    model = nn.Sequential(q)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(8, 6)).square().sum().backward()
        opt.step()
    model.eval()
    reference = make_quantizer(method, bits=4, role="weight", granularity="channel")
    reference.init_from(layer.weight.detach())
    torch.testing.assert_close(q.weight_quantizer.get_scale(), reference.get_scale())
    x = torch.randn(3, 6)
    with torch.no_grad():
        torch.testing.assert_close(q(x), F.linear(x, reference(layer.weight), layer.bias))
        if method == "minmax":
            torch.testing.assert_close(q(x), F.linear(x, minmax_weight_by_hand(layer.weight, 4), layer.bias))
