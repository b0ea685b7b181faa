"""Assignments <-> recipes (round trip, lowbit.quantize applies per-layer bits) and bad input."""

import pytest
import torch
import yaml
from torch import nn
from torch.nn import functional as F

import lowbit
from lowbit.errors import RecipeError
from lowbit.mixed import build_space, select
from lowbit.mixed.alps import parse_shard
from lowbit.qat import FinetuneConfig

torch.set_num_threads(1)
EXAMPLE = torch.zeros(1, 1, 8, 8)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.blocks = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                                    nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(),
                                    nn.Conv2d(16, 16, 1), nn.ReLU())
        self.head = nn.Linear(16 * 16, 10)

    def forward(self, x):
        return self.head(self.blocks(F.relu(self.stem(x))).flatten(1))


def quantized_bits(qmodel):
    return {n: (m.weight_quantizer.bits, m.input_quantizer.bits) for n, m in qmodel.named_modules()
            if isinstance(m, lowbit.nn.QuantMixin)}


def test_space_candidates_fixed_and_bounds():
    space = build_space(Tiny(), "lsq-w4a4", example_input=EXAMPLE)
    assert space.candidates == ["blocks.0", "blocks.2", "blocks.4"]
    assert space.fixed == {"stem": (8, 8), "head": (8, 8)}
    lo, hi = space.bounds()
    assert lo == space.cost(space.uniform(2)) < hi == space.cost(space.uniform(4))
    assert space.absolute_budget(1.0) == hi


@pytest.mark.parametrize("precisions", [(4, 2), ("w4a4", "w3a3", "w2a2")])
def test_assignment_round_trips_through_a_recipe_file(tmp_path, precisions):
    model = Tiny()
    space = build_space(model, "lsq-w4a4", example_input=EXAMPLE, precisions=precisions)
    assignment = dict(zip(space.candidates, [space.precisions[0], space.precisions[-1], space.precisions[1]]))
    sel = select(space, space.cost(assignment) / space.bounds()[1], "eagl", model=model)
    for a in (assignment, sel.assignment):
        path = tmp_path / "assignment.yaml"
        space.recipe_for(a, name="t", meta={"method": "test"}).save(path)
        data = yaml.safe_load(path.read_text())
        assert data["mixed"]["assignment"]["stem"] == "w8a8" and data["mixed"]["method"] == "test"
        recipe = lowbit.load_recipe(str(path))
        assert space.assignment_from_recipe(recipe) == a
        qmodel = lowbit.quantize(model, str(path))
        assert quantized_bits(qmodel) == {**space.fixed, **a}
        assert FinetuneConfig.from_recipe(recipe).lr == FinetuneConfig.from_recipe("lsq-w4a4").lr  # qat: kept
    saved = sel.save(tmp_path / "sel.yaml")
    assert quantized_bits(lowbit.quantize(model, str(saved))) == {**space.fixed, **sel.assignment}


def test_recipe_overrides_win_over_base_patterns_and_merge_with_them(tmp_path):
    base = {"weights": {"method": "lsq", "bits": 4}, "activations": {"method": "lsq", "bits": 4},
            "layers": {"blocks.2": {"weights": {"method": "minmax", "granularity": "channel"}},
                       "blocks.*": {"activations": {"bits": 3}}}}
    space = build_space(Tiny(), base, example_input=EXAMPLE)
    recipe = space.recipe_for(space.uniform(2))
    qmodel = lowbit.quantize(Tiny(), recipe)
    assert {quantized_bits(qmodel)[n] for n in space.candidates} == {(2, 2)}
    assert qmodel.blocks[2].weight_quantizer.method == "minmax"


def test_glob_characters_in_layer_names_are_escaped():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleDict({"a": nn.Linear(4, 4), "b[1]": nn.Linear(4, 4), "b1": nn.Linear(4, 4),
                                         "z": nn.Linear(4, 2)})

        def forward(self, x):
            for m in self.layers.values():
                x = m(x)
            return x

    space = build_space(Odd(), "lsq-w4a4", example_input=torch.zeros(1, 4))
    a = {"layers.b[1]": (2, 2), "layers.b1": (4, 4)}
    assert quantized_bits(lowbit.quantize(Odd(), space.recipe_for(a)))["layers.b1"] == (4, 4)


def test_select_methods_uniform_and_random():
    model = Tiny()
    space = build_space(model, "lsq-w4a4", example_input=EXAMPLE)
    assert set(select(space, 0.99, "uniform").assignment.values()) == {(2, 2)}
    assert set(select(space, 1.0, "uniform").assignment.values()) == {(4, 4)}
    r = select(space, 0.7, "random", seed=1)
    assert r.cost <= 0.7 * space.bounds()[1]


# ----- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [0.01, 1.5, -1.0])
def test_budget_outside_the_feasible_range(budget):
    with pytest.raises(RecipeError, match=r"feasible range.*fraction 0\.\d+.*fraction 1\.0") as exc:
        lowbit.select_precision(Tiny(), budget, example_input=EXAMPLE)
    assert "w2a2" in str(exc.value) and "w4a4" in str(exc.value)


def test_absolute_budget_errors_name_the_range():
    space = build_space(Tiny(), "lsq-w4a4", example_input=EXAMPLE)
    lo = space.bounds()[0]
    with pytest.raises(RecipeError, match=f"{lo:,}"):
        space.absolute_budget(lo - 1, absolute=True)
    assert space.absolute_budget(lo, absolute=True) == lo
    with pytest.raises(RecipeError, match="a number"):
        space.absolute_budget("half")


def test_precision_the_quantizer_cannot_do():
    with pytest.raises(RecipeError, match="w1a1.*not possible.*lsq"):
        lowbit.select_precision(Tiny(), 0.5, example_input=EXAMPLE, precisions=(4, 1))
    with pytest.raises(RecipeError, match="at least two"):
        build_space(Tiny(), "lsq-w4a4", example_input=EXAMPLE, precisions=(4, 4))
    with pytest.raises(RecipeError, match="bit width"):
        build_space(Tiny(), "lsq-w4a4", example_input=EXAMPLE, precisions=(4, "x"))


def test_models_without_layers_or_candidates():
    with pytest.raises(RecipeError, match="no Conv1d/Conv2d/Linear"):
        lowbit.select_precision(nn.Sequential(nn.ReLU()), 0.5, example_input=torch.zeros(1, 4))
    with pytest.raises(RecipeError, match="no candidate layers"):
        lowbit.select_precision(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), 0.5)


def test_other_bad_arguments():
    with pytest.raises(RecipeError, match="method"):
        lowbit.select_precision(Tiny(), 0.5, method="hawq", example_input=EXAMPLE)
    with pytest.raises(RecipeError, match="metric"):
        build_space(Tiny(), "lsq-w4a4", example_input=EXAMPLE, metric="latency")
    with pytest.raises(RecipeError, match="train_data"):
        lowbit.select_precision(Tiny(), 0.8, method="alps", example_input=EXAMPLE)
    with pytest.raises(RecipeError, match="quantized"):
        build_space(lowbit.quantize(Tiny(), "lsq-w4a4"), "lsq-w4a4", example_input=EXAMPLE)
    for bad in ("2/2", "a/b", "1"):
        with pytest.raises(RecipeError, match="shard"):
            parse_shard(bad)
    assert parse_shard("1/3") == (1, 3)
