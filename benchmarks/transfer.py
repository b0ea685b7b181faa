"""Transfer of ImageNet classifiers with published weights (MobileNetV2, EfficientNet-Lite0) to Fashion-MNIST, then
every shipped CNN recipe on the transferred model: labelled test accuracy, which the offline photos cannot give.

    python benchmarks/transfer.py [--models mobilenetv2,efficientnet-lite0] [--size 64] [--fp-steps 859]
                                  [--recipes ptq-w8a8,...,lsq-w2a2] [--qat-steps 430] [--no-distill]

Data: Fashion-MNIST's 28x28 grey images upsampled (bilinear) to ``--size`` pixels, the grey channel repeated
three times, normalised with the model's ImageNet statistics (``lowbit.zoo.imagenet.PREPROCESSING``); training
images get the zoo's 2-pixel translation and horizontal flip at 28x28 before upsampling. Splits as everywhere in
lowbit: 55,000 training images, the 5,000 held-out calibration images as the validation split (its first 512
also calibrate), the 10,000 test images reported for information.

1. *FP transfer*: the published network with a new 10-class head (seeded), every layer fine-tuned for
   ``--fp-steps`` steps of batch 64 (859: one epoch; SGD, Nesterov momentum 0.9, lr ``--fp-lr`` cosine with 50
   warm-up steps, weight decay 4e-5). Kept in ``runs/transfer/`` so a rerun of the quantized rows reuses it.
2. *PTQ recipes*: calibrated on the 512 images, no training.
3. *QAT recipes* (and the levers of benchmarks/qat.py, e.g. ``lsq-w2a2+clip``): the recipe's ``qat:`` settings (optimizer, lr, schedule, quantizer settings), cut to
   ``--qat-steps`` steps of batch 64, with distillation from the FP transfer model (the recipe's weight and
   temperature) unless ``--no-distill``.

Rows go to docs/results/transfer.json as they finish (a rerun skips rows already there); the section "transfer"
of docs/RESULTS.md is rewritten from all rows.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from imagenet_agreement import recipe_for  # noqa: E402
from qat import VARIANTS, recipe_spec  # noqa: E402
from results_page import ROOT, git_commit, load_rows, store_row, write_section  # noqa: E402

import lowbit  # noqa: E402
from lowbit.data.datasets import load_split  # noqa: E402
from lowbit.data.loaders import TensorLoader  # noqa: E402
from lowbit.evaluate import evaluate  # noqa: E402
from lowbit.zoo import pretrained  # noqa: E402
from lowbit.zoo.imagenet import PREPROCESSING  # noqa: E402

SEED = 0
ROWS = ROOT / "docs" / "results" / "transfer.json"
CACHE = ROOT / "runs" / "transfer"
PTQ = ["ptq-w8a8", "ptq-w4a4-minmax", "ptq-w4a4-aciq", "ptq-w4a4-aciq-dw8"]
QAT = ["lsq-w4a4", "lsq-w3a3", "lsq-w2a2"]
HEADS = {"mobilenetv2": "classifier.1", "efficientnet-lite0": "_fc"}
BATCH = 64
CALIB_IMAGES = 512
SIZE, FP_STEPS, FP_LR = 64, 859, 0.02  # the FP transfer's defaults (859 steps of batch 64: one epoch)


class Upsampled:
    """``(x, y)`` batches of a :class:`TensorLoader` over 28x28 grey images, as ``size`` x ``size`` RGB inputs
    normalised with ImageNet statistics ``mean``/``std`` (per channel)."""

    def __init__(self, loader: TensorLoader, size: int, mean, std):
        self.loader, self.size = loader, size
        self.mean, self.std = torch.tensor(mean).reshape(1, 3, 1, 1), torch.tensor(std).reshape(1, 3, 1, 1)

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __iter__(self):
        for x, y in self.loader:
            x = nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
            yield (x.expand(-1, 3, -1, -1) - self.mean) / self.std, y


def loaders(model_name: str, size: int, seed: int) -> dict[str, Upsampled]:
    prep = PREPROCESSING[model_name]
    wrap = lambda images, labels, **kw: Upsampled(TensorLoader(images, labels, BATCH, seed=seed, **kw), size,
                                                  prep.mean, prep.std)
    train, val, test = (load_split("fashion-mnist", s) for s in ("train", "calib", "test"))
    return {"train": wrap(*train, shuffle=True, augment=True, drop_last=True), "val": wrap(*val),
            "test": wrap(*test), "calib": wrap(val[0][:CALIB_IMAGES], val[1][:CALIB_IMAGES])}


def with_new_head(model_name: str, seed: int) -> nn.Module:
    """The published network with its ImageNet classifier replaced by a seeded 10-class Linear layer."""
    model = pretrained(model_name)
    parent_name, _, leaf = HEADS[model_name].rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, leaf)
    torch.manual_seed(seed)
    setattr(parent, leaf, nn.Linear(old.in_features, 10))
    return model


def transferred(model_name: str, data: dict, args, log) -> tuple[nn.Module, dict]:
    """The FP transfer model (trained here, or read back from ``runs/transfer/``) and its row."""
    key = f"{model_name}-{args.size}px-{args.fp_steps}steps-lr{args.fp_lr}-seed{args.seed}"
    path = CACHE / f"{key}.safetensors"
    model = with_new_head(model_name, args.seed)
    start = time.perf_counter()
    if path.is_file():
        model.load_state_dict(load_file(str(path)))
        log(f"FP transfer model read from {path}")
    else:
        config = lowbit.FinetuneConfig(epochs=1 + args.fp_steps // len(data["train"]), max_steps=args.fp_steps,
                                       batch_size=BATCH, optimizer="sgd", lr=args.fp_lr, nesterov=True,
                                       weight_decay=4e-5, warmup_steps=50, seed=args.seed, log_every=50,
                                       tensorboard=False)
        lowbit.finetune(model, data["train"], config=config, log=log)
        CACHE.mkdir(parents=True, exist_ok=True)
        save_file(model.state_dict(), str(path))
    model.eval()
    return model, {"train_seconds": time.perf_counter() - start, "fp_key": key}


def measure(model: nn.Module, data: dict) -> dict:
    return {"val_top1": evaluate(model, data["val"])["top1"], "test_top1": evaluate(model, data["test"])["top1"]}


def quantized_row(fp: nn.Module, recipe_name: str, data: dict, args, log) -> dict:
    start = time.perf_counter()
    recipe = recipe_spec(recipe_name) if recipe_name in VARIANTS else recipe_for(recipe_name, fp)
    qmodel = lowbit.quantize(fp, recipe, calib_data=[x for x, _ in data["calib"]])
    row = {"kind": "PTQ", "steps": 0, "distill": False}
    if recipe_name in QAT or recipe_name in VARIANTS:
        config = lowbit.FinetuneConfig.from_recipe(recipe, max_steps=args.qat_steps, batch_size=BATCH,
                                                   seed=args.seed, log_every=50, tensorboard=False,
                                                   compile_quantizers=args.compile_quantizers,
                                                   **({"distill_weight": 0.0} if args.no_distill else {}))
        lowbit.finetune(qmodel, data["train"], teacher=None if args.no_distill else fp, config=config, log=log)
        row = {"kind": "QAT", "steps": args.qat_steps, "distill": not args.no_distill, "lr": config.lr,
               "schedule": config.schedule}
    return {**row, **measure(qmodel, data), "seconds": time.perf_counter() - start}


def write(rows: list[dict]) -> None:
    lines = ["Each ImageNet network with its published weights, given a new 10-class head and fine-tuned on "
             "Fashion-MNIST (upsampled to RGB at the size shown, ImageNet normalisation), then quantized with each "
             "shipped recipe. *validation*: the 5,000 held-out training images (the first 512 calibrate); *test*: "
             "the 10,000 test images. QAT rows: the recipe's own settings, cut to the steps shown (batch 64), "
             "distilled from the FP transfer model where marked. First and last layers 8-bit in every 4/3/2-bit "
             "recipe; `ptq-w4a4-aciq-dw8` also keeps the depthwise convolutions at W8A8.", "",
             "| model | input | recipe | kind | steps | distillation | validation top-1 (%) | test top-1 (%) | "
             "test vs FP | minutes | commit |",
             "|---|---|---|---|---:|---|---:|---:|---:|---:|---|"]
    order = {r: i for i, r in enumerate(["fp32"] + PTQ + QAT)}
    fp_test = {(r["model"], r["fp_key"]): r["test_top1"] for r in rows if r["recipe"] == "fp32"}
    for r in sorted(rows, key=lambda r: (r["model"], r["fp_key"], order.get(r["recipe"], 99), r["steps"])):
        ref = fp_test.get((r["model"], r["fp_key"]))
        delta = "" if r["recipe"] == "fp32" or ref is None else f"{r['test_top1'] - ref:+.2f}"
        steps = f"{r['steps']:,}"
        lines.append(f"| {r['model']} | {r['size']}x{r['size']} | `{r['recipe']}` | {r['kind']} | {steps} | "
                     f"{'yes' if r['distill'] else 'no'} | {r['val_top1']:.2f} | {r['test_top1']:.2f} | {delta} | "
                     f"{r['seconds'] / 60:.1f} | {r['commit']} |")
    fps = sorted({(r["model"], r["fp_key"]) for r in rows})
    lines += [""] + [f"- FP transfer `{k}`: {m} fine-tuned from its ImageNet weights (every layer, SGD Nesterov, "
                     "cosine, batch 64)." for m, k in fps]
    write_section("transfer", "ImageNet models transferred to Fashion-MNIST: every recipe, labelled accuracy",
                  "\n".join(lines), SEED)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mobilenetv2,efficientnet-lite0")
    ap.add_argument("--size", type=int, default=SIZE)
    ap.add_argument("--fp-steps", type=int, default=FP_STEPS)
    ap.add_argument("--fp-lr", type=float, default=FP_LR)
    ap.add_argument("--recipes", default=",".join(PTQ + QAT))
    ap.add_argument("--qat-steps", type=int, default=430)
    ap.add_argument("--no-distill", action="store_true")
    ap.add_argument("--compile-quantizers", action="store_true")
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args()
    log = lambda msg: print(msg, flush=True)
    for model_name in args.models.split(","):
        data = loaders(model_name, args.size, args.seed)
        fp, fp_info = transferred(model_name, data, args, log)
        base = {"model": model_name, "size": args.size, "seed": args.seed, **fp_info}
        key = lambda r: (r["model"], r["fp_key"], r["recipe"], r["steps"], r["distill"])
        done = {key(r) for r in load_rows(ROWS)}
        if (model_name, fp_info["fp_key"], "fp32", 0, False) not in done:
            row = {**base, "recipe": "fp32", "kind": "FP", "steps": 0, "distill": False, **measure(fp, data),
                   "seconds": fp_info["train_seconds"], "commit": git_commit()}
            store_row(ROWS, row, key=key)
            log(f"{model_name} fp32: validation {row['val_top1']:.2f}, test {row['test_top1']:.2f}")
        for recipe in [r for r in args.recipes.split(",") if r]:
            qat = recipe in QAT or recipe in VARIANTS  # a shipped QAT recipe or a lever of benchmarks/qat.py
            steps = args.qat_steps if qat else 0
            if (model_name, fp_info["fp_key"], recipe, steps, qat and not args.no_distill) in done:
                continue
            row = {**base, "recipe": recipe, **quantized_row(fp, recipe, data, args, log), "commit": git_commit()}
            store_row(ROWS, row, key=key)
            log(f"{model_name} {recipe}: validation {row['val_top1']:.2f}, test {row['test_top1']:.2f} "
                f"({row['seconds'] / 60:.1f} min)")
            write(load_rows(ROWS))
        write(load_rows(ROWS))


if __name__ == "__main__":
    main()
