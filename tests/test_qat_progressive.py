"""Progressive lowering (lowbit.qat.progressive): stage widths checked, the recipe lowered stage by stage with its
layer overrides kept, the caller's model untouched, and the CLI's refusals."""

import pytest
import torch
from torch import nn

import lowbit
from lowbit.data import TensorLoader
from lowbit.errors import RecipeError
from lowbit.nn.modules import QuantMixin
from lowbit.qat.pipeline import run_qat
from lowbit.qat.progressive import at_width, check_widths, float_weights, lower_progressively


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                         nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def loader(n: int = 32, seed: int = 0) -> TensorLoader:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
    return TensorLoader(images, torch.randint(0, 3, (n,), generator=g), 8, shuffle=True, seed=seed)


@pytest.mark.parametrize("widths, problem", [([], "at least one"), ([2], "above the recipe's own 2 bits"),
                                             ([4, 8], "decrease strictly"), ([16, 4], "at most 8"),
                                             (["four"], "integers"), ([4, 4], "decrease strictly")])
def test_stage_widths_that_cannot_work_are_refused(widths, problem):
    with pytest.raises(RecipeError, match=problem):
        check_widths(widths, lowbit.load_recipe("lsq-w2a2"))


def test_a_stage_recipe_keeps_the_layer_overrides():
    recipe = lowbit.load_recipe("lsq-w2a2")
    stage = at_width(recipe, 4)
    assert stage.weights == {**recipe.weights, "bits": 4} and stage.activations == {**recipe.activations, "bits": 4}
    assert stage.layers == recipe.layers and stage.sections["qat"] == recipe.sections["qat"]
    assert check_widths([8, 4], recipe) == (8, 4)


def test_lowering_trains_a_float_copy_and_leaves_the_model_alone():
    model = tiny_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = lowbit.FinetuneConfig.from_recipe("lsq-w2a2", max_steps=3, progress=False, tensorboard=False)
    start = lower_progressively(model, "lsq-w2a2", [8, 4], loader(), calib=[x for x, _ in loader()], config=config,
                                log=lambda _m: None)
    assert not any(isinstance(m, QuantMixin) for m in start.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not torch.equal(start[0].weight, model[0].weight)  # the stages trained it
    qmodel = lowbit.quantize(start, "lsq-w2a2", calib_data=[x for x, _ in loader()])
    assert qmodel[3].weight_quantizer.bits == 2


def test_a_recipe_that_folds_batch_norm_cannot_be_lowered_in_stages():
    recipe = {**lowbit.load_recipe("lsq-w2a2").to_dict(), "ptq": {"fold_bn": True}}
    model = tiny_net()
    qmodel = lowbit.quantize(model, recipe, calib_data=[x for x, _ in loader()])
    with pytest.raises(RecipeError, match="folds batch norm"):
        float_weights(qmodel, model)


def test_progressive_runs_do_not_resume(tmp_path):
    with pytest.raises(RecipeError, match="drop resume or progressive"):
        run_qat(tiny_net(), model_name="tiny", dataset="fashion-mnist", recipe="lsq-w2a2", checkpoint_dir=tmp_path,
                resume=True, progressive=[4])
