"""Recipes: YAML and dict forms, override merging, @first/@last, skip, float sides, errors, shipped recipes."""

import textwrap

import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import RecipeError
from lowbit.nn import QuantMixin
from lowbit.prepare import resolve_plan
from lowbit.recipe import Recipe, load_recipe



ISSUE_YAML = textwrap.dedent("""\
    weights: {method: sawb, bits: 4, granularity: channel}
    activations: {method: pact, bits: 4}
    layers:
      "conv1": {weights: {bits: 8}, activations: {bits: 8}}
      "fc":    {weights: {bits: 8}, activations: {bits: 8}}
    skip: ["head.*"]
    """)
ISSUE_DICT = {
    "weights": {"method": "sawb", "bits": 4, "granularity": "channel"},
    "activations": {"method": "pact", "bits": 4},
    "layers": {"conv1": {"weights": {"bits": 8}, "activations": {"bits": 8}},
               "fc": {"weights": {"bits": 8}, "activations": {"bits": 8}}},
    "skip": ["head.*"],
}
NAMES = ["conv1", "conv2", "fc", "head.0", "head.2"]


class Net(nn.Module):
    """conv1 -> conv2 -> fc -> head (two Linears): every name the issue's recipe talks about."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)
        self.fc = nn.Linear(8, 16)
        self.head = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3))
        return self.head(torch.relu(self.fc(x)))


def net():
    torch.manual_seed(0)
    return Net().eval()


def calib():
    torch.manual_seed(1)
    return [torch.randn(4, 1, 6, 6) for _ in range(2)]


def plan_of(recipe, model=None):
    return resolve_plan(model or net(), load_recipe(recipe))


def write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# ----- the issue's recipe ---------------------------------------------------------------------

def test_issue_recipe_yaml_file_and_dict_give_the_same_specs(tmp_path):
    path = write(tmp_path, ISSUE_YAML)
    from_yaml, left_yaml = plan_of(path)
    from_str_path, _ = plan_of(str(path))
    from_dict, left_dict = plan_of(ISSUE_DICT)
    from_obj, _ = plan_of(Recipe(**{k: v for k, v in ISSUE_DICT.items()}))
    assert from_yaml == from_dict == from_str_path == from_obj
    assert left_yaml == left_dict
    eight = ({"method": "sawb", "bits": 8, "granularity": "channel"}, {"method": "pact", "bits": 8})
    four = ({"method": "sawb", "bits": 4, "granularity": "channel"}, {"method": "pact", "bits": 4})
    assert from_yaml == {"conv1": eight, "conv2": four, "fc": eight}
    assert set(left_yaml) == {"head.0", "head.2"} and all("skip" in why for why in left_yaml.values())
    # the recipe given as a dict must not be modified by loading it
    assert ISSUE_DICT["layers"]["conv1"] == {"weights": {"bits": 8}, "activations": {"bits": 8}}


def test_issue_recipe_quantizes_the_model(tmp_path):
    x = torch.randn(3, 1, 6, 6)
    q_yaml = lowbit.quantize(net(), write(tmp_path, ISSUE_YAML), calib_data=calib())
    q_dict = lowbit.quantize(net(), ISSUE_DICT, calib_data=calib())
    with torch.no_grad():
        assert torch.equal(q_yaml(x), q_dict(x))
    assert q_yaml.lowbit_report.quantized == q_dict.lowbit_report.quantized
    assert isinstance(q_yaml.conv1, QuantMixin) and isinstance(q_yaml.fc, QuantMixin)
    assert not isinstance(q_yaml.head[0], QuantMixin) and not isinstance(q_yaml.head[2], QuantMixin)
    assert q_yaml.conv1.weight_quantizer.bits == 8 and q_yaml.conv1.input_quantizer.bits == 8
    assert q_yaml.conv2.weight_quantizer.bits == 4 and q_yaml.conv2.input_quantizer.bits == 4
    assert q_yaml.conv2.weight_quantizer.method == "sawb" and q_yaml.conv2.input_quantizer.method == "pact"
    assert q_yaml.conv2.weight_quantizer.granularity.kind == "channel"
    assert q_yaml.fc.weight_quantizer.bits == 8


# ----- merging --------------------------------------------------------------------------------

def test_override_keeps_method_and_options_when_only_bits_change():
    plan, _ = plan_of({"weights": {"method": "minmax", "bits": 4, "granularity": "channel", "symmetric": False},
                       "activations": {"method": "percentile", "bits": 4, "percentile": 99.5},
                       "layers": {"conv2": {"weights": {"bits": 6}, "activations": {"bits": 8}}}})
    w, a = plan["conv2"]
    assert w == {"method": "minmax", "bits": 6, "granularity": "channel", "symmetric": False}
    assert a == {"method": "percentile", "bits": 8, "percentile": 99.5}
    assert plan["conv1"][1] == {"method": "percentile", "bits": 4, "percentile": 99.5}


def test_override_changing_method_drops_method_specific_options():
    plan, _ = plan_of({"weights": {"method": "minmax", "bits": 4, "granularity": "channel", "symmetric": False},
                       "activations": {"method": "percentile", "bits": 4, "percentile": 99.5},
                       "layers": {"fc": {"weights": {"method": "lsq"}, "activations": {"method": "minmax", "bits": 8}},
                                  "conv2": {"activations": {"method": "percentile", "bits": 6}}}})
    w, a = plan["fc"]
    assert w == {"method": "lsq", "bits": 4, "granularity": "channel"}  # symmetric dropped, common keys kept
    assert a == {"method": "minmax", "bits": 8}  # percentile dropped
    # naming the same method again is not a change: its options stay
    assert plan["conv2"][1] == {"method": "percentile", "bits": 6, "percentile": 99.5}
    q = lowbit.quantize(net(), {"weights": {"method": "minmax", "bits": 4, "symmetric": False},
                                "layers": {"fc": {"weights": {"method": "lsq"}}}}, calib_data=calib())
    assert q.fc.weight_quantizer.method == "lsq" and q.conv1.weight_quantizer.method == "minmax"


def test_override_with_options_of_a_new_method():
    plan, _ = plan_of({"activations": {"method": "minmax", "bits": 8},
                       "layers": {"conv*": {"activations": {"method": "percentile", "percentile": 99.0}}}})
    assert plan["conv1"][1] == {"method": "percentile", "bits": 8, "percentile": 99.0}
    assert plan["fc"][1] == {"method": "minmax", "bits": 8}


def test_later_patterns_win():
    plan, _ = plan_of({"layers": {"conv*": {"weights": {"bits": 6}}, "conv2": {"weights": {"bits": 3}}}})
    assert plan["conv1"][0]["bits"] == 6 and plan["conv2"][0]["bits"] == 3
    plan, _ = plan_of({"layers": {"conv2": {"weights": {"bits": 3}}, "conv*": {"weights": {"bits": 6}}}})
    assert plan["conv1"][0]["bits"] == 6 and plan["conv2"][0]["bits"] == 6
    assert plan["fc"][0]["bits"] == 8  # the default recipe's bits where no pattern matches


def test_glob_patterns_are_shell_style_on_module_names():
    plan, _ = plan_of({"layers": {"head.?": {"activations": {"bits": 3}}, "*.2": {"weights": {"bits": 2}}}})
    assert plan["head.0"][1]["bits"] == 3 and plan["head.2"][1]["bits"] == 3
    assert plan["head.2"][0]["bits"] == 2 and plan["head.0"][0]["bits"] == 8
    assert plan["fc"][1]["bits"] == 8


def test_first_and_last_aliases():
    plan, _ = plan_of({"weights": {"method": "minmax", "bits": 4},
                       "activations": {"method": "minmax", "bits": 4},
                       "layers": {"@first": {"weights": {"bits": 8}}, "@last": {"activations": {"bits": 2}}}})
    assert plan["conv1"] == ({"method": "minmax", "bits": 8}, {"method": "minmax", "bits": 4})
    assert plan["head.2"] == ({"method": "minmax", "bits": 4}, {"method": "minmax", "bits": 2})
    assert all(plan[n] == ({"method": "minmax", "bits": 4}, {"method": "minmax", "bits": 4})
               for n in ("conv2", "fc", "head.0"))


def separable_net():
    """stem conv -> depthwise 3x3 -> pointwise 1x1 -> a grouped (not depthwise) conv -> linear."""
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1, groups=4),
                         nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.Flatten(),
                         nn.Linear(8 * 6 * 6, 3))


def test_depthwise_selector_picks_every_depthwise_conv_and_may_match_none():
    recipe = {"weights": {"method": "lsq", "bits": 2}, "activations": {"method": "lsq", "bits": 2},
              "layers": {"@depthwise": {"weights": {"granularity": "channel"}}}}
    plan, _ = plan_of(recipe, separable_net())
    assert [n for n, (w, _) in plan.items() if w.get("granularity") == "channel"] == ["1"]
    q = lowbit.quantize(separable_net(), recipe, calib_data=[torch.randn(4, 1, 6, 6)])
    assert q.get_submodule("1").weight_quantizer.scale.numel() == 4  # one learned step per channel
    assert q.get_submodule("3").weight_quantizer.scale.numel() == 1
    assert all(w.get("granularity") is None for w, _ in plan_of(recipe)[0].values())  # no depthwise conv: no error


def test_unknown_selector_names_the_known_ones():
    with pytest.raises(RecipeError, match="@first, @last, @depthwise"):
        plan_of({"layers": {"@dephtwise": {"weights": {"bits": 4}}}})


def test_weights_null_keeps_weights_float():
    recipe = {"weights": None, "activations": {"method": "minmax", "bits": 4}}
    plan, _ = plan_of(recipe)
    assert all(w is None and a == {"method": "minmax", "bits": 4} for w, a in plan.values())
    model = net()
    q = lowbit.quantize(model, recipe, calib_data=calib())
    for name in NAMES:
        layer = q.get_submodule(name)
        assert isinstance(layer, QuantMixin) and layer.weight_quantizer is None and layer.input_quantizer is not None
        assert torch.equal(layer.quantized_weight(), model.get_submodule(name).weight)
    assert "float" in str(lowbit.summary(q))


def test_per_layer_null_and_both_sides_null():
    plan, left = plan_of({"layers": {"fc": {"weights": None}, "conv2": {"weights": None, "activations": None}}})
    assert plan["fc"][0] is None and plan["fc"][1] is not None
    assert "conv2" not in plan and "conv2" in left
    plan, left = plan_of({"weights": None, "activations": None})
    assert plan == {} and set(left) == set(NAMES)


def test_yaml_null_weights(tmp_path):
    path = write(tmp_path, "weights: null\nactivations: {method: minmax, bits: 4}\n")
    assert load_recipe(path).weights is None
    assert load_recipe(path).activations == {"method": "minmax", "bits": 4}


def test_recipe_object_passes_through_and_default_recipe():
    r = Recipe()
    assert load_recipe(r) is r
    plan, left = plan_of(r)
    assert left == {} and set(plan) == set(NAMES)
    assert plan["conv1"] == ({"method": "minmax", "bits": 8, "granularity": "channel"}, {"method": "minmax", "bits": 8})


# ----- errors ---------------------------------------------------------------------------------

def check_error(recipe, *words, model=None):
    with pytest.raises(RecipeError) as info:
        plan_of(recipe, model)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    return message


def test_unknown_top_level_key():
    check_error({**ISSUE_DICT, "wieghts": {"method": "sawb", "bits": 4}}, "wieghts", "unknown")


def test_unknown_method():
    check_error({"weights": {"method": "sawbb", "bits": 4}}, "sawbb", "unknown method", "weights")
    check_error({"layers": {"fc": {"activations": {"method": "lqs"}}}}, "lqs", "fc")


@pytest.mark.parametrize("bits", [0, 17, 4.5, "4", True, -1, None])
def test_bad_bits(bits):
    check_error({"weights": {"method": "minmax", "bits": bits}}, "bits", repr(bits), "weights")
    check_error({"layers": {"conv1": {"activations": {"bits": bits}}}}, "bits", repr(bits), "conv1")


def test_pattern_matching_no_layer_lists_layers():
    message = check_error({"layers": {"conv3": {"weights": {"bits": 4}}}}, "conv3", "matches no")
    assert all(name in message for name in NAMES)
    message = check_error({"skip": ["tail.*"]}, "tail.*", "matches no")
    assert all(name in message for name in NAMES)


def test_unknown_option_for_method():
    check_error({"activations": {"method": "lsq", "bits": 4, "percentile": 99}}, "lsq", "percentile")
    # in an override, found when the merged spec of the layer is built
    check_error({"layers": {"fc": {"activations": {"method": "lsq", "percentile": 99}}}}, "lsq", "percentile", "fc")
    check_error({"weights": {"method": "sawb", "bits": 4, "convnetion": "odd"}}, "convnetion")


@pytest.mark.parametrize("granularity", ["row", "group:x", 3, "group"])
def test_bad_granularity(granularity):
    check_error({"weights": {"method": "minmax", "bits": 4, "granularity": granularity}}, "granularity")


def test_group_granularity_only_for_weights():
    check_error({"activations": {"method": "minmax", "bits": 4, "granularity": "group:8"}}, "group", "weights only")
    plan, _ = plan_of({"weights": {"method": "minmax", "bits": 4, "granularity": "group:8"}})
    assert plan["fc"][0]["granularity"] == "group:8"


def test_malformed_yaml_file(tmp_path):
    path = write(tmp_path, "weights: {method: minmax, bits: 4\nactivations: [\n")
    check_error(path, "YAML", str(path))
    check_error(write(tmp_path, "- weights\n- activations\n", "list.yaml"), "mapping")
    check_error(write(tmp_path, "", "empty.yaml"), "mapping")
    check_error(write(tmp_path, "weights: {method: minmax, bits: 4}\nfoo: 1\n", "unknown.yaml"), "foo", "unknown.yaml")


def test_missing_method_or_bits():
    check_error({"weights": {"method": "minmax"}}, "bits", "method", "weights")
    check_error({"activations": {"bits": 4}}, "method", "activations")
    # an override is merged over the defaults, so it may leave both out, but not when the default is float
    check_error({"weights": None, "layers": {"fc": {"weights": {"bits": 8}}}}, "method", "fc")


def test_other_malformed_recipes(tmp_path):
    check_error({"weights": "minmax"}, "mapping")
    check_error({"layers": {"fc": {"bias": {"bits": 4}}}}, "fc", "bias")
    check_error({"layers": ["fc"]}, "layers")
    check_error({"skip": "head.*"}, "skip", "list")
    check_error({"skip": [1]}, "skip")
    check_error({"weights": {"method": "minmax", "bits": 4, "signed": "maybe"}}, "signed")
    check_error("no-such-recipe", "no-such-recipe", "ptq-w8a8")
    check_error(42, "int")
    with pytest.raises(RecipeError, match="activations"):  # SAWB clips weights only
        lowbit.quantize(net(), {"activations": {"method": "sawb", "bits": 4}})


# ----- shipped recipes and round trip ---------------------------------------------------------

def test_shipped_recipes_load():
    names = lowbit.list_recipes()
    assert "ptq-w8a8" in names and "ptq-w4a4-minmax" in names
    r = load_recipe("ptq-w8a8")
    assert r.weights == {"method": "minmax", "bits": 8, "granularity": "channel"}
    assert r.activations == {"method": "minmax", "bits": 8}
    assert r.sections["name"] == "ptq-w8a8"
    plan, _ = plan_of("ptq-w4a4-minmax")
    assert plan["conv1"][0]["bits"] == 8 and plan["head.2"][1]["bits"] == 8 and plan["fc"][0]["bits"] == 4
    for name in names:
        if load_recipe(name).kv_cache is not None:  # a language-model recipe
            from tiny_lm import tiny_lm, token_batch
            q = lowbit.quantize(tiny_lm(), name, calib_data=[token_batch()])
            assert q.lowbit_report.points["kv_cache"]
        elif name.endswith("-bert"):  # names BERT's layers: a CNN is refused by name (BERT in test_encoder_ptq)
            with pytest.raises(RecipeError, match="'\\*position_embeddings' matches no quantizable layer"):
                lowbit.quantize(net(), name, calib_data=calib())
            continue
        else:
            q = lowbit.quantize(net(), name, calib_data=calib())
        assert q.lowbit_report.quantized


def test_save_load_round_trip(tmp_path):
    recipe = Recipe.from_dict({**ISSUE_DICT, "name": "mine", "calibration": {"batches": 4},
                               "layers": {**ISSUE_DICT["layers"], "@last": {"activations": None}}})
    path = tmp_path / "out.yaml"
    recipe.save(path)
    loaded = load_recipe(path)
    assert loaded == recipe
    assert loaded.to_dict() == recipe.to_dict()
    assert loaded.sections == {"name": "mine", "calibration": {"batches": 4}}
    assert plan_of(loaded) == plan_of(recipe)
    assert plan_of(loaded)[0]["fc"][0]["bits"] == 8
    # a float side survives the round trip as null
    recipe = Recipe.from_dict({"weights": None, "activations": {"method": "lsq", "bits": 3}})
    recipe.save(path)
    assert load_recipe(path).weights is None and load_recipe(path) == recipe
