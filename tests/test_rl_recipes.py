"""The shipped student recipes put every layer on the grid they name; ternary weights and binary
activations in particular (no game needed: random 0/1 frames)."""

import pytest
import torch

from lowbit.errors import RecipeError
from lowbit.rl.students import PRECISIONS, build_student, student_recipe

FRAMES = (torch.rand(64, 4, 10, 10, generator=torch.Generator().manual_seed(0)) < 0.2).to(torch.uint8)
LAYERS = ("conv", "fc", "head")


def codes_seen(student, x):
    """Integer codes of every layer's weight and of the input each layer receives on ``x``."""
    inputs = {}
    hooks = [getattr(student, n).register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0]))
             for n in LAYERS]
    with torch.no_grad():
        student(x)
    for h in hooks:
        h.remove()
    out = {}
    for n in LAYERS:
        layer = getattr(student, n)
        out[n] = (set(layer.weight_quantizer.quantize_int(layer.weight).unique().tolist()),
                  set(layer.input_quantizer.quantize_int(inputs[n]).unique().tolist()))
    return out


@pytest.mark.parametrize("precision, weight_codes, input_codes", [
    ("ternary", {-1, 0, 1}, {0, 1}),
    ("2", set(range(-2, 2)), set(range(0, 4))),
    ("4", set(range(-8, 8)), set(range(0, 16))),
])
def test_every_layer_is_on_the_named_grid(precision, weight_codes, input_codes):
    student = build_student("minatar", (4, 10, 10), 6, student_recipe(precision), FRAMES, seed=0)
    for name, (w, a) in codes_seen(student, FRAMES.float()).items():
        assert w <= weight_codes and len(w) >= min(3, len(weight_codes)), (name, w)
        assert a <= input_codes, (name, a)
    # the frames (0/1) enter the first layer exactly: at 1 bit the code is the pixel itself
    if precision == "ternary":
        q = student.conv.input_quantizer
        assert torch.equal(q.quantize_int(FRAMES.float()), FRAMES.to(torch.int32))


def test_ternary_weights_are_three_levels_per_channel():
    student = build_student("minatar", (4, 10, 10), 6, student_recipe("ternary"), FRAMES, seed=0)
    with torch.no_grad():
        w_hat = student.fc.weight_quantizer(student.fc.weight)
        step = student.fc.weight_quantizer.get_scale().reshape(-1, 1)
    assert torch.equal(torch.round(w_hat / step).abs().unique(), torch.tensor([0.0, 1.0]))


def test_unknown_precision_names_the_choices():
    with pytest.raises(RecipeError, match="ternary"):
        student_recipe("3")
    assert set(PRECISIONS) == {"8", "4", "2", "ternary"}
