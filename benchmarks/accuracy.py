"""Accuracy of every quantization method available, on all four reference models.

    python benchmarks/accuracy.py [--models resnet20,vgg,mobilenet,mlp] [--calib-images 512]

Writes the 'accuracy' section of docs/RESULTS.md: Fashion-MNIST test top-1 of FP and of
each shipped recipe, stored size, and the time to quantize.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_page import write_section  # noqa: E402

import lowbit  # noqa: E402
from lowbit.data.datasets import make_loader  # noqa: E402
from lowbit.evaluate import evaluate  # noqa: E402
from lowbit.zoo import list_models, pretrained  # noqa: E402

SEED = 0
RECIPES = ["ptq-w8a8", "ptq-w4a4-minmax", "ptq-w4a4-aciq"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(list_models()))
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--calib-images", type=int, default=512)
    args = ap.parse_args()
    torch.manual_seed(SEED)
    test = make_loader("fashion-mnist", "test", 500)
    calib = make_loader("fashion-mnist", "calib", 128, limit=args.calib_images)
    recipes = args.recipes.split(",")
    rows = ["| model | method (recipe) | top-1 (%) | delta vs FP | stored size (KiB) | quantize time (s) |",
            "|---|---|---:|---:|---:|---:|"]
    for name in args.models.split(","):
        model = pretrained(name)
        fp = evaluate(model, test)["top1"]
        fp_kib = 4 * sum(p.numel() for p in model.state_dict().values() if p.is_floating_point()) / 1024
        rows.append(f"| {name} | fp32 | {fp:.2f} | | {fp_kib:.1f} | |")
        for recipe in recipes:
            start = time.perf_counter()
            q = lowbit.quantize(model, recipe, calib_data=calib)
            seconds = time.perf_counter() - start
            acc = evaluate(q, test)["top1"]
            rows.append(f"| {name} | {recipe} | {acc:.2f} | {acc - fp:+.2f} | "
                        f"{lowbit.stored_size_bytes(q) / 1024:.1f} | {seconds:.2f} |")
            print(rows[-1], flush=True)
    body = (f"Fashion-MNIST test set (10,000 images); calibration on the first {args.calib_images} images of the "
            "held-out calibration split. Recipes are the YAML files in `lowbit/recipes/` (first and last layers "
            "8-bit in the 4-bit recipes).\n\n" + "\n".join(rows))
    write_section("accuracy", "Post-training quantization accuracy", body, SEED)


if __name__ == "__main__":
    main()
