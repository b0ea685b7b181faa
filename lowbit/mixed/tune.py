"""Short fine-tunes of an assignment with the fine-tuning pipeline (:func:`lowbit.qat.finetune`).

ALPS and the frontier both turn an assignment into a recipe, quantize the float model with
it (calibrating activations on ``calib_data``), fine-tune for a fixed number of steps with the
recipe's ``qat:`` settings (cosine schedule over exactly those steps; distillation from a
frozen copy of the float model when the settings ask for it), and measure top-1 accuracy.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterable

import torch
from torch import nn

from lowbit.evaluate import evaluate
from lowbit.prepare import quantize
from lowbit.qat import FinetuneConfig, finetune


def _quiet(_msg: str) -> None:
    pass


def step_config(recipe, steps: int, train_data, *, config: FinetuneConfig | dict | None = None,
                seed: int = 0) -> FinetuneConfig:
    """The recipe's ``qat:`` settings (or ``config``) cut to exactly ``steps`` optimizer steps."""
    if config is None:
        cfg = FinetuneConfig.from_recipe(recipe)
    elif isinstance(config, dict):
        cfg = FinetuneConfig.from_dict(config)
    else:
        cfg = config
    epochs = max(1, math.ceil(steps / max(1, len(train_data))))
    return cfg.replace(epochs=epochs, max_steps=steps, seed=seed, progress=False, log_every=0, checkpoint_every=0,
                       tensorboard=False)


def frozen_teacher(model: nn.Module) -> nn.Module:
    """A frozen copy of the float model for distillation: finetune puts its teacher in eval mode,
    and the caller's model must keep its own mode and gradients, since later quantized copies
    are made from it."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def short_finetune(qmodel: nn.Module, train_data, steps: int, *, recipe=None, teacher: nn.Module | None = None,
                   config: FinetuneConfig | dict | None = None, seed: int = 0, log=_quiet) -> dict:
    """Fine-tune ``qmodel`` in place for ``steps`` steps; returns finetune's result (``steps``, ``seconds``)."""
    if steps <= 0:
        return {"steps": 0, "seconds": 0.0}
    if recipe is None:
        report = getattr(qmodel, "lowbit_report", None)
        recipe = report.recipe if report is not None else {}
    cfg = step_config(recipe, steps, train_data, config=config, seed=seed)
    torch.manual_seed(seed)
    return finetune(qmodel, train_data, teacher=teacher if cfg.distill_weight > 0 else None, config=cfg, log=log)


def train_and_evaluate(model: nn.Module, recipe, train_data, eval_data: Iterable, *, steps: int,
                       calib_data: Iterable | None = None, teacher: nn.Module | None = None,
                       config: FinetuneConfig | dict | None = None, seed: int = 0,
                       eval_batches: int | None = None, log=_quiet) -> dict:
    """Quantize ``model`` with ``recipe``, fine-tune ``steps`` steps, evaluate top-1.

    Returns ``{"accuracy", "steps", "seconds", "qmodel"}`` (seconds: quantize + fine-tune).
    """
    start = time.perf_counter()
    torch.manual_seed(seed)
    qmodel = quantize(model, recipe, calib_data=calib_data)
    result = short_finetune(qmodel, train_data, steps, recipe=recipe, teacher=teacher, config=config, seed=seed,
                            log=log)
    seconds = time.perf_counter() - start
    acc = evaluate(qmodel, eval_data, max_batches=eval_batches)["top1"]
    return {"accuracy": acc, "steps": int(result.get("steps", 0)), "seconds": seconds, "qmodel": qmodel}
