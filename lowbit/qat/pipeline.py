"""``lowbit qat``: prepare with a recipe, fine-tune, evaluate, save (the CLI's work, as a function).

    lowbit qat --model resnet20 --dataset fashion-mnist --recipe lsq-w4a4 --checkpoint-dir runs/lsq4

1. quantize the float model with the recipe, calibrating on the held-out ``calib`` split;
2. fine-tune on the ``train`` split with the recipe's ``qat:`` settings (command-line overrides
   win), distilling from the float model only with ``distill=True``, validating on ``calib``;
3. evaluate the float and fine-tuned models on ``test``;
4. save the fine-tuned model (``model.safetensors``, ``recipe.yaml``, ``lowbit.json``: reload with
   :func:`lowbit.load`) into ``checkpoint_dir`` (default
   ``lowbit-qat/MODEL-RECIPE``), next to the training checkpoint and ``metrics.jsonl``.

Under ``torchrun`` every rank trains; rank 0 evaluates, prints and saves.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from lowbit.data.datasets import make_loader
from lowbit.evaluate import evaluate
from lowbit.prepare import quantize
from lowbit.errors import RecipeError
from lowbit.qat.config import FinetuneConfig
from lowbit.qat.progressive import lower_progressively
from lowbit.qat.trainer import finetune
from lowbit.recipe import load_recipe
from lowbit.serialize import save
from lowbit.summary import summary
from lowbit.zoo import trained_with_augment


def run_qat(model: nn.Module, *, model_name: str, dataset: str, recipe: str, checkpoint_dir=None, epochs=None, lr=None,
            batch_size=None, max_steps=None, seed=None, distill: bool = False, resume: bool = False,
            calib_images: int = 512, augment: bool | None = None, data_dir=None, progress=None, log=print,
            on_step=None, progressive=None) -> dict:
    """``augment=None`` fine-tunes with the augmentation the shipped checkpoint of ``model_name``
    was trained with (:func:`lowbit.zoo.trained_with_augment`; on for models the zoo does not know).
    ``on_step``: passed to :func:`lowbit.finetune` (called after every step). ``progressive``: stage widths
    (e.g. ``[4]``) fine-tuned first, each with the same settings (:mod:`lowbit.qat.progressive`); the
    distillation teacher stays the float ``model``; not with ``resume``."""
    recipe_obj = load_recipe(recipe)
    if progressive and resume:
        raise RecipeError("resume continues one fine-tuning run; a progressive run (stages) restarts from scratch: "
                          "drop resume or progressive")
    if augment is None:
        augment = trained_with_augment(model_name, dataset)
    name = recipe_obj.sections.get("name") or Path(str(recipe)).stem
    checkpoint_dir = checkpoint_dir if checkpoint_dir is not None else Path("lowbit-qat") / f"{model_name}-{name}"
    cfg = FinetuneConfig.from_recipe(recipe_obj, epochs=epochs, lr=lr, batch_size=batch_size, max_steps=max_steps,
                                     seed=seed, progress=progress)
    calib = make_loader(dataset, "calib", 128, limit=calib_images, data_dir=data_dir)
    train = make_loader(dataset, "train", cfg.batch_size, shuffle=True, augment=augment, seed=cfg.seed,
                        data_dir=data_dir)
    val = make_loader(dataset, "calib", 500, data_dir=data_dir)
    start = model
    if progressive:
        start = lower_progressively(model, recipe_obj, progressive, train, calib=calib, eval_data=val,
                                    teacher=model if distill else None, config=cfg, checkpoint_dir=checkpoint_dir,
                                    log=log)
    qmodel = quantize(start, recipe_obj, calib_data=calib)
    result = finetune(qmodel, train, eval_data=val, teacher=model if distill else None, config=cfg,
                      checkpoint_dir=checkpoint_dir, resume=resume, log=log, on_step=on_step)
    if result["rank"] != 0:
        return result
    test = make_loader(dataset, "test", 500, data_dir=data_dir)
    fp, q = evaluate(model, test)["top1"], evaluate(qmodel, test)["top1"]
    result.update(fp_top1=fp, test_top1=q)
    log(summary(qmodel))
    log(f"test top-1: fp32 {fp:.2f}%  fine-tuned {q:.2f}%  ({q - fp:+.2f}) after {result['steps']} steps "
        f"({result['seconds']:.0f} s)")
    folder = save(qmodel, checkpoint_dir, model_name=model_name, dataset=dataset,
                            extra={"recipe_name": name, "qat": cfg.to_dict(), "steps": result["steps"],
                                   "progressive": list(progressive or []),
                                   "fp_top1": fp, "test_top1": q})
    log(f"saved {folder} (model.safetensors, recipe.yaml, lowbit.json; reload with lowbit.load)")
    return result
