"""Progressive lowering: fine-tune at a higher bit width first, then at the recipe's own, each stage starting from
the weights the previous stage trained.

    start = lower_progressively(model, "lsq-w2a2", [4], train, calib=calib)   # a float model: W4A4-trained weights
    qmodel = lowbit.quantize(start, "lsq-w2a2", calib_data=calib)              # then fine-tune as usual

LSQ (Esser et al., ICLR 2020) initialises its low-precision networks from a trained higher-precision one, and FAQ
(McKinstry et al., 2019) fine-tunes from a full-precision solution; here each stage ``w`` of ``widths`` quantizes
the current float weights with the recipe at ``w`` bits (its default weight and activation widths set to ``w``;
layer overrides such as the 8-bit first and last layers kept), fine-tunes with the recipe's ``qat:`` settings (the
same epochs and schedule at every stage: our choice, not a paper's), and hands its trained float weights to the
next stage. The stages' grids are not carried over: the next stage calibrates its own from the trained weights.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from pathlib import Path

from torch import nn

from lowbit.errors import RecipeError
from lowbit.prepare import quantize
from lowbit.qat.config import FinetuneConfig
from lowbit.qat.trainer import finetune
from lowbit.recipe import Recipe, load_recipe

MAX_BITS = 8


def target_bits(recipe: Recipe) -> int:
    """The recipe's widest default width (weights or activations): every stage must lie above it."""
    widths = [spec["bits"] for spec in (recipe.weights, recipe.activations) if spec is not None]
    if not widths:
        raise RecipeError("progressive lowering needs a recipe that quantizes weights or activations")
    return max(widths)


def check_widths(widths, recipe: Recipe) -> tuple[int, ...]:
    """``widths`` as a tuple after checking them: integers, strictly decreasing, above the recipe's own widths and at
    most 8 bits. Raises :class:`RecipeError` naming the problem."""
    try:
        widths = tuple(int(w) for w in widths)
    except (TypeError, ValueError):
        raise RecipeError(f"progressive lowering: stage widths must be integers, got {widths!r}") from None
    final = target_bits(recipe)
    if not widths:
        raise RecipeError("progressive lowering: give at least one stage width above the recipe's own, e.g. [4]")
    if any(b <= a for a, b in zip(widths[1:], widths)):
        raise RecipeError(f"progressive lowering: stage widths must decrease strictly (8 -> 4 -> ...), got "
                          f"{list(widths)}")
    if widths[-1] <= final or widths[0] > MAX_BITS:
        raise RecipeError(f"progressive lowering: every stage width must lie above the recipe's own {final} bits and "
                          f"at most {MAX_BITS}, got {list(widths)}")
    return widths


def at_width(recipe: Recipe, bits: int) -> Recipe:
    """``recipe`` with its default weight and activation widths at ``bits`` (layer overrides kept)."""
    spec = recipe.to_dict()
    for side in ("weights", "activations"):
        if spec.get(side) is not None:
            spec[side] = {**spec[side], "bits": bits}
    spec["name"] = f"{spec.get('name') or 'recipe'}@w{bits}"
    return load_recipe(spec)


def float_weights(qmodel: nn.Module, model: nn.Module) -> nn.Module:
    """A copy of the float ``model`` holding ``qmodel``'s trained float tensors (same names: quantization swaps
    modules in place). Raises :class:`RecipeError` when a tensor of ``model`` is missing from ``qmodel`` (a recipe
    that folds batch norm into the convolutions cannot be lowered stage by stage)."""
    trained = qmodel.state_dict()
    out = copy.deepcopy(model)
    missing = [k for k in out.state_dict() if k not in trained]
    if missing:
        raise RecipeError(f"progressive lowering: the quantized model has no tensor {missing[0]!r} of the float "
                          "model (a recipe that folds batch norm, ptq: {fold_bn: true}, cannot be lowered in stages)")
    out.load_state_dict({k: trained[k] for k in out.state_dict()})
    return out


def lower_progressively(model: nn.Module, recipe, widths, train_data: Iterable, *, calib: Iterable,
                        eval_data: Iterable | None = None, teacher: nn.Module | None = None,
                        config: FinetuneConfig | None = None, checkpoint_dir=None,
                        log: Callable[[str], None] = print) -> nn.Module:
    """Run the stages of ``widths`` (e.g. ``[4]``, or ``[8, 4]``) on a copy of the float ``model`` and return the
    float model holding the last stage's trained weights (``model`` itself is not changed); quantize that with
    ``recipe`` and fine-tune it as usual. ``config``: the fine-tuning settings of every stage (default: the
    recipe's ``qat:`` section); ``checkpoint_dir``: each stage writes its training checkpoint to
    ``checkpoint_dir/stage-w<bits>``. Raises :class:`RecipeError` for stage widths that cannot work
    (:func:`check_widths`)."""
    recipe = load_recipe(recipe)
    widths = check_widths(widths, recipe)
    config = config if config is not None else FinetuneConfig.from_recipe(recipe)
    current = model
    for bits in widths:
        log(f"progressive lowering: stage W{bits}A{bits} ({', '.join(f'W{w}' for w in widths)} -> "
            f"{recipe.sections.get('name') or 'the recipe'})")
        qmodel = quantize(current, at_width(recipe, bits), calib_data=calib)
        stage_dir = Path(checkpoint_dir) / f"stage-w{bits}" if checkpoint_dir is not None else None
        finetune(qmodel, train_data, eval_data=eval_data, teacher=teacher, config=config, checkpoint_dir=stage_dir,
                 log=log)
        current = float_weights(qmodel, model)
    return current
