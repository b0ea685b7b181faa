"""EAGL: entropy of quantized weights on known distributions, the quantizer's own step, weightings."""

import math

import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import RecipeError
from lowbit.mixed import build_space, eagl_entropies, eagl_gains, entropy_bits
from lowbit.mixed.eagl import probs_entropy
from lowbit.zoo import create_model, list_models

torch.set_num_threads(1)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_uniform_over_all_codes_is_b_bits(bits):
    codes = torch.arange(-(2 ** (bits - 1)), 2 ** (bits - 1)).repeat(7)
    assert entropy_bits(codes) == pytest.approx(bits, abs=1e-12)


def test_single_code_is_zero_bits():
    assert entropy_bits(torch.full((100,), 3, dtype=torch.int32)) == 0.0
    assert entropy_bits(torch.zeros(0, dtype=torch.int32)) == 0.0


def test_known_discrete_distribution():
    codes = torch.tensor([0] * 50 + [1] * 25 + [-1] * 25)  # p = 1/2, 1/4, 1/4
    assert entropy_bits(codes) == pytest.approx(1.5, abs=1e-12)
    p = torch.tensor([0.7, 0.2, 0.1, 0.0], dtype=torch.float64)
    assert probs_entropy(p) == pytest.approx(-sum(x * math.log2(x) for x in (0.7, 0.2, 0.1)), abs=1e-12)


class Three(nn.Module):
    """first (fixed) -> a -> b -> last (fixed), linear layers on 8 inputs."""

    def __init__(self):
        super().__init__()
        self.first, self.a, self.b, self.last = nn.Linear(8, 16), nn.Linear(16, 15), nn.Linear(15, 15), nn.Linear(15, 2)

    def forward(self, x):
        return self.last(self.b(self.a(self.first(x))))


MINMAX = {"weights": {"method": "minmax", "bits": 4}, "activations": {"method": "minmax", "bits": 4}}


def test_entropy_uses_the_quantizers_own_step():
    """Min-max 4-bit: step = max|w| / 7. Weights k * 0.1 (k = -7..7, equally often) land on 15
    codes equally: log2(15) bits. Weights of one value bar a single outlier: almost 0 bits."""
    model = Three()
    with torch.no_grad():
        model.a.weight.copy_((torch.arange(16 * 15) % 15 - 7).float().reshape(15, 16) * 0.1)
        w = torch.full((15, 15), 0.001)
        w[0, 0] = 1.0
        model.b.weight.copy_(w)
    space = build_space(model, MINMAX, example_input=torch.zeros(1, 8))
    assert space.candidates == ["a", "b"]
    h = eagl_entropies(model, space)
    assert h["a"] == pytest.approx(math.log2(15), abs=1e-9)
    p1 = 1 / 225
    assert h["b"] == pytest.approx(-(p1 * math.log2(p1) + (1 - p1) * math.log2(1 - p1)), abs=1e-9)
    gains = eagl_gains(model, space)
    assert gains["a"][0] > gains["b"][0] and gains["a"][1] == gains["b"][1] == 0.0
    sel = lowbit.select_precision(model, budget=space.cost({"a": 4, "b": 2}) / space.bounds()[1], recipe=MINMAX,
                                  example_input=torch.zeros(1, 8), log=lambda s: None)
    assert sel.assignment == {"a": (4, 4), "b": (2, 2)}  # the high-entropy layer keeps 4 bits


def test_learned_step_of_a_quantized_model_is_used():
    model = Three()
    space = build_space(model, "lsq-w4a4", example_input=torch.zeros(1, 8))
    qmodel = lowbit.quantize(model, "lsq-w4a4")
    with torch.no_grad():
        qmodel.a.weight_quantizer.scale.fill_(1e3)  # a huge learned step: every weight -> code 0
    h = eagl_entropies(model, space, qmodel=qmodel)
    assert h["a"] == 0.0 and h["b"] == eagl_entropies(model, space)["b"] > 0.5


def test_weightings_and_bad_weighting():
    model = Three()
    space = build_space(model, MINMAX, example_input=torch.zeros(1, 8))
    h = eagl_entropies(model, space)
    params = eagl_gains(model, space, weighting="params", entropies=h)
    assert params["a"][0] == pytest.approx(h["a"] * 16 * 15)
    macs = eagl_gains(model, space, weighting="macs", entropies=h)
    assert macs["b"][0] == pytest.approx(h["b"] * 15 * 15)
    custom = eagl_gains(model, space, weighting=lambda name, ent, cost: 2.0 * ent, entropies=h)
    assert custom["a"][0] == pytest.approx(2 * h["a"])
    with pytest.raises(RecipeError, match="weighting"):
        eagl_gains(model, space, weighting="bogus")


def test_three_precisions_interpolate_between_high_and_low():
    model = Three()
    space = build_space(model, MINMAX, example_input=torch.zeros(1, 8), precisions=(4, 3, 2))
    g = eagl_gains(model, space)
    for n in space.candidates:
        assert g[n][1] == pytest.approx(g[n][0] / 2) and g[n][2] == 0.0


def test_eagl_selection_on_resnet20_meets_the_budget_exactly():
    # its speed is a benchmark (benchmarks/eagl_speed.py, docs/RESULTS.md section eagl-speed), not a test
    model = create_model("resnet20")
    sel = lowbit.select_precision(model, 0.5, "eagl", example_input=torch.zeros(1, 1, 28, 28), log=lambda s: None)
    assert sel.cost <= 0.5 * sel.space.bounds()[1] and sel.solution.exact
    assert len(sel.gains) == len(sel.space.candidates) == 20


@pytest.mark.parametrize("name", list_models())
def test_select_precision_needs_no_example_input_for_zoo_models(name):
    model = create_model(name)
    budget = 0.97 if name == "mlp" else 0.5  # the MLP's 8-bit first and last layers hold most of its cost
    sel = lowbit.select_precision(model, budget=budget, log=lambda s: None)
    assert sel.space.costs.layers and all(c.macs > 0 for c in sel.space.costs.layers.values())
    explicit = lowbit.select_precision(model, budget=budget, example_input=torch.zeros(1, 1, 28, 28),
                                       log=lambda s: None)
    assert sel.assignment == explicit.assignment


def test_select_precision_on_an_unknown_conv_model_asks_for_one_batch():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.LazyLinear(3))
    model(torch.zeros(1, 1, 8, 8))
    with pytest.raises(RecipeError, match="needs example_input"):
        lowbit.select_precision(model, budget=1.0, log=lambda s: None)
    assert lowbit.select_precision(model, budget=1.0, example_input=torch.zeros(1, 1, 8, 8), log=lambda s: None)
