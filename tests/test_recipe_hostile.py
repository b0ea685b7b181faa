"""Recipe YAML from anywhere: damaged or odd text gives lowbit's RecipeError naming the file and field, or a recipe
that quantizes (or fails with lowbit's own error), never a raw exception; a fuzz test mutates the shipped recipes."""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import lowbit
from lowbit.data import make_loader
from lowbit.errors import LowbitError, RecipeError
from lowbit.qat import FinetuneConfig
from lowbit.recipe import RECIPE_DIR, list_recipes, load_recipe

SHIPPED = {name: (RECIPE_DIR / f"{name}.yaml").read_text() for name in list_recipes()}


def small_cnn() -> nn.Module:
    """conv, batch norm (recipes may fold it), ReLU, linear: every kind of layer a recipe addresses here."""
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10))


@pytest.fixture(scope="module")
def calib():
    return list(make_loader("digits", "calib", 32, limit=64))


def _write(tmp: str, text: str | bytes) -> Path:
    path = Path(tmp) / "recipe.yaml"
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


@pytest.mark.parametrize("text,match", [
    ("weights: {method: lsq, bits: 4", r"recipe\.yaml: not valid YAML"),
    (b"weights: {method: \xff}", r"recipe\.yaml: not valid YAML"),
    ("weights: {method: [lsq], bits: 4}", r"recipe\.yaml: weights: unknown method \['lsq'\]"),
    ("weights: {method: lsq, bits: 4.5}", r"recipe\.yaml: weights: bits must be an integer"),
    ("description: 2024-01-01", r"recipe\.yaml: recipe\.description: a date .* is not plain data"),
    ("weights: {method: minmax, bits: 8, percentile: .nan}", r"recipe\.yaml: recipe\.weights\.percentile: nan"),
    ("layers: {1: {weights: {bits: 8}}}", r"recipe\.yaml: recipe\.layers: the key 1 is not a string"),
    ("ptq: fold", r"recipe\.yaml: ptq: a mapping of settings, got 'fold'"),
    ("name: [a]", r"recipe\.yaml: name: a text"),
    ("!!python/object:os.system {}", r"recipe\.yaml: not valid YAML"),
])
def test_bad_recipe_text_names_file_and_field(text, match):
    with tempfile.TemporaryDirectory() as tmp:
        with pytest.raises(RecipeError, match=match):
            load_recipe(_write(tmp, text))


def test_every_shipped_recipe_round_trips_through_its_yaml():
    for name, text in SHIPPED.items():
        recipe = load_recipe(name)
        assert load_recipe(yaml.safe_load(recipe.to_yaml())).to_dict() == recipe.to_dict(), name


# ----- fuzz ------------------------------------------------------------------------------------------------------
YAML_CHARS = st.sampled_from(list(":{}[],-#&*!|>'\"\n ") + list("0123456789") + list("abcdefghijklmnopqrstuvwxyz.~"))
VALUES = st.none() | st.booleans() | st.integers(-5, 40) | st.floats(-10, 10) | st.text(max_size=6) | \
    st.sampled_from(["lsq", "pact", "sawb", "channel", "tensor", "group:3", "group:0", "auto", "laplace", "paper",
                     "@first", "@last", "*", "conv", "fc"]) | st.lists(st.integers(-2, 9), max_size=3)


def _mutate_text(text: str, data) -> str:
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(text)))
        kind = data.draw(st.sampled_from(["insert", "delete", "replace"]))
        c = data.draw(YAML_CHARS)
        text = text[:i] + c + text[i:] if kind == "insert" else \
            text[:i] + text[i + 1:] if kind == "delete" else text[:i] + c + text[i + 1:]
    return text


def _mutate_tree(text: str, data) -> str:
    tree = copy.deepcopy(yaml.safe_load(text))
    paths, stack = [], [((), tree)]
    while stack:
        path, node = stack.pop()
        if path:
            paths.append(path)
        if isinstance(node, dict):
            stack += [(path + (k,), v) for k, v in node.items()]
    path = data.draw(st.sampled_from(sorted(paths, key=str)))
    parent = tree
    for k in path[:-1]:
        parent = parent[k]
    action = data.draw(st.sampled_from(["replace", "delete", "add"]))
    if action == "delete":
        del parent[path[-1]]
    elif action == "add" and isinstance(parent[path[-1]], dict):
        parent[path[-1]][data.draw(st.sampled_from(["bits", "method", "granularity", "signed", "bit_allocation",
                                                    "bias_correction", "percentile", "fold_bn", "lr", "epochs",
                                                    "weights", "activations"]))] = data.draw(VALUES)
    else:
        parent[path[-1]] = data.draw(VALUES)
    return yaml.safe_dump(tree)


@settings(max_examples=int(os.environ.get("LOWBIT_FUZZ_EXAMPLES", 40)), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data(), name=st.sampled_from(sorted(SHIPPED)), structural=st.booleans())
def test_fuzz_recipe_yaml_quantizes_or_raises_lowbit_error(calib, data, name, structural):
    text = (_mutate_tree if structural else _mutate_text)(SHIPPED[name], data)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            recipe = load_recipe(_write(tmp, text))
        except RecipeError as exc:
            assert "recipe.yaml" in str(exc)
            return
    try:
        FinetuneConfig.from_recipe(recipe)
    except RecipeError:
        pass
    torch.manual_seed(0)
    try:
        qmodel = lowbit.quantize(small_cnn().eval(), recipe, calib_data=calib)
        with torch.no_grad():
            qmodel(calib[0][0])
    except LowbitError:
        pass
