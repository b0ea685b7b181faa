"""What ``lowbit mixed`` does, as a function of plain arguments (the CLI only parses them).

    lowbit mixed --model resnet20 --method eagl --budgets 0.5,0.75 --steps 300 --out runs/mixed
    lowbit mixed --model resnet20 --method alps --alps-steps 100 --shard 0/4 --cache-dir runs/alps   # x4 processes
    lowbit mixed --model resnet20 --method alps --alps-steps 100 --cache-dir runs/alps --budgets 0.5

Data: fine-tuning on the ``train`` split, activation calibration and ALPS's accuracy on the
held-out ``calib`` split, frontier accuracy on the ``test`` split.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lowbit.data.datasets import dataset_info, make_loader
from lowbit.errors import RecipeError
from lowbit.mixed.alps import ALPS
from lowbit.mixed.frontier import METHODS, run_frontier
from lowbit.mixed.space import build_space
from lowbit.qat import FinetuneConfig


def parse_list(text: str | None, kind=float, what: str = "values") -> list:
    if text is None or text == "":
        return []
    try:
        return [kind(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise RecipeError(f"{what} are a comma-separated list, got {text!r}") from None


def run_mixed(model: nn.Module, *, dataset: str = "fashion-mnist", model_name: str = "model", method: str = "eagl",
              budgets: str | list = "0.5", recipe="lsq-w4a4", precisions: str | list = "4,2", metric: str = "bitops",
              fixed_bits: int | None = 8, weighting: str = "none", steps: int = 300, alps_steps: int = 100,
              random_draws: int = 3, uniform_bits: str | list = "2,3,4", train_images: int | None = None,
              calib_images: int = 512, alps_eval_images: int = 1000, test_images: int | None = None,
              batch_size: int | None = None, augment: bool = False, seed: int = 0, out: str = "lowbit-mixed",
              cache_dir: str | None = None, shard: str | None = None, select_only: bool = False,
              additivity: int = 0, data_dir=None, log=print) -> dict | None:
    """Select, fine-tune and plot (see :func:`lowbit.mixed.frontier.run_frontier`); with ``shard``
    (ALPS only) run that part of ALPS's fine-tunes into the cache and return None."""
    if method not in METHODS:
        raise RecipeError(f"--method must be one of {list(METHODS)}, got {method!r}")
    budget_list = parse_list(budgets, float, "budgets") if isinstance(budgets, str) else list(budgets)
    if not budget_list and method != "uniform":
        raise RecipeError("give at least one budget, e.g. --budgets 0.5,0.75 (fractions of the all-high cost)")
    ps = parse_list(precisions, str, "precisions") if isinstance(precisions, str) else list(precisions)
    ubits = parse_list(uniform_bits, str, "uniform bits") if isinstance(uniform_bits, str) else list(uniform_bits)
    if shard is not None and method != "alps":
        raise RecipeError("--shard splits ALPS's fine-tunes across processes; use it with --method alps")
    info = dataset_info(dataset)
    example = torch.zeros(1, info.in_channels, info.image_size, info.image_size)
    space = build_space(model, recipe, example_input=example, precisions=ps, fixed_bits=fixed_bits, metric=metric)
    for b in budget_list:
        space.absolute_budget(b)
    cfg = FinetuneConfig.from_recipe(space.recipe)
    batch = batch_size or cfg.batch_size
    train = make_loader(dataset, "train", batch, shuffle=True, augment=augment, seed=seed, limit=train_images,
                        data_dir=data_dir)
    calib = make_loader(dataset, "calib", 128, limit=calib_images, data_dir=data_dir)
    out_dir = Path(out)
    alps = None
    if method == "alps":
        held_out = make_loader(dataset, "calib", 500, limit=alps_eval_images, data_dir=data_dir)
        alps = ALPS(model, space, train, held_out, steps=alps_steps, calib_data=calib, seed=seed,
                    cache_dir=cache_dir or out_dir / "alps-cache", config=cfg.replace(batch_size=batch), log=log)
        if shard is not None:
            result = alps.run(shard)
            done = result.runs - len(result.missing)
            log(f"alps shard {shard}: trained {result.trained_now} run(s); {done}/{result.runs} runs are in "
                f"{result.cache_dir}" + ("" if result.complete else "; run the other shards, then run without --shard"))
            return None
    test = make_loader(dataset, "test", 500, limit=test_images, data_dir=data_dir)
    results = run_frontier(model, space, method=method, budgets=budget_list, train_data=train, test_data=test,
                           calib_data=calib, steps=steps, out_dir=out_dir, random_draws=random_draws,
                           uniform_bits=ubits, seed=seed, config=cfg.replace(batch_size=batch), weighting=weighting,
                           alps=alps, additivity=additivity, select_only=select_only,
                           model_name=model_name, log=log)
    return results
