"""Ablation of the post-training methods of Banner, Nahshan and Soudry (NeurIPS 2019), in the form
of the paper's table: W8A4, W4A8 and W4A4, each method alone and combined, against naive
per-channel min-max, on all four reference models; plus the per-layer SQNR of W4A4 min-max
vs all methods and the time to calibrate and quantize.

    python benchmarks/ptq_ablation.py [--models resnet20,vgg,mobilenet,mlp] [--calib-images 512]

Every configuration folds batch norm, quantizes weights per output channel and activations
per channel (the paper's headline setting), and keeps the first and last layers at 8 bits.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_page import write_section  # noqa: E402

import lowbit  # noqa: E402
from lowbit.data.datasets import make_loader  # noqa: E402
from lowbit.evaluate import sqnr_report  # noqa: E402
from lowbit.zoo import list_models, pretrained  # noqa: E402

SEED = 0
INT8 = {"weights": {"method": "minmax", "bits": 8, "granularity": "channel", "bit_allocation": False,
                    "bias_correction": False},
        "activations": {"method": "minmax", "bits": 8, "granularity": "tensor", "bit_allocation": False}}


def recipe(w_bits: int, a_bits: int, *, aciq=False, alloc=False, bias=False, scale="positive") -> dict:
    """A W/A configuration with the chosen methods (bit allocation only on sides of <= 4 bits);
    ``scale`` is ACIQ's ``one_sided_scale`` (lowbit's default, or the reference code's)."""
    weights = {"method": "minmax", "bits": w_bits, "granularity": "channel"}
    acts = {"method": "aciq" if aciq else "minmax", "bits": a_bits, "granularity": "channel"}
    if aciq:
        acts.update(prior="laplace", one_sided_scale=scale)
    if alloc and w_bits <= 4:
        weights["bit_allocation"] = True
    if alloc and a_bits <= 4:
        acts["bit_allocation"] = True
    if bias:
        weights["bias_correction"] = True
    return {"weights": weights, "activations": acts, "layers": {"@first": INT8, "@last": INT8},
            "ptq": {"fold_bn": True}}


TABLE = [  # (setting, method, recipe)
    ("W8A4", "Baseline (min-max)", recipe(8, 4)),
    ("W8A4", "ACIQ", recipe(8, 4, aciq=True)),
    ("W8A4", "Per-channel bit allocation", recipe(8, 4, alloc=True)),
    ("W8A4", "ACIQ + bit allocation", recipe(8, 4, aciq=True, alloc=True)),
    ("W4A8", "Baseline (min-max)", recipe(4, 8)),
    ("W4A8", "Bias correction", recipe(4, 8, bias=True)),
    ("W4A8", "Per-channel bit allocation", recipe(4, 8, alloc=True)),
    ("W4A8", "Bias correction + bit allocation", recipe(4, 8, bias=True, alloc=True)),
    ("W4A4", "Baseline (min-max)", recipe(4, 4)),
    ("W4A4", "ACIQ", recipe(4, 4, aciq=True)),
    ("W4A4", "Per-channel bit allocation", recipe(4, 4, alloc=True)),
    ("W4A4", "Bias correction", recipe(4, 4, bias=True)),
    ("W4A4", "All methods combined", recipe(4, 4, aciq=True, alloc=True, bias=True)),
    ("W4A4", "ACIQ, reference-code b", recipe(4, 4, aciq=True, scale="reference")),
    ("W4A4", "All methods, reference-code b", recipe(4, 4, aciq=True, alloc=True, bias=True, scale="reference")),
]


@torch.no_grad()
def predictions(model: torch.nn.Module, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 predictions and labels over ``loader``."""
    model.eval()
    preds, labels = zip(*[(model(x).argmax(1), y) for x, y in loader])
    return torch.cat(preds), torch.cat(labels)


def paired_sigma(a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor) -> float:
    """Standard deviation (points) of the accuracy difference of two models on the same images:
    ``100 sqrt(n01 + n10) / n`` from the images exactly one of them gets right (McNemar)."""
    ra, rb = a == labels, b == labels
    return 100.0 * math.sqrt(float((ra != rb).sum())) / len(labels)


def sqnr_drops(base_rows: list[dict], rows: list[dict], k: int = 3) -> str:
    """The ``k`` layers whose output SQNR fell most against the baseline, as text."""
    drops = sorted(((b["output_sqnr_db"] - r["output_sqnr_db"], r["layer"], b["output_sqnr_db"], r["output_sqnr_db"])
                    for b, r in zip(base_rows, rows)), reverse=True)[:k]
    return ", ".join(f"`{layer}` {b:.1f} -> {r:.1f} dB" for _, layer, b, r in drops)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet20,vgg,mobilenet,mlp")
    ap.add_argument("--calib-images", type=int, default=512)
    args = ap.parse_args()
    models = args.models.split(",")
    unknown = set(models) - set(list_models())
    if unknown:
        raise SystemExit(f"unknown models {sorted(unknown)}")
    torch.manual_seed(SEED)
    test = make_loader("fashion-mnist", "test", 500)
    calib = make_loader("fashion-mnist", "calib", 128, limit=args.calib_images)
    acc: dict[tuple[str, str, str], float] = {}
    sigma: dict[tuple[str, str, str], float] = {}
    fp: dict[str, float] = {}
    seconds: dict[str, float] = {}
    sqnr_rows, explained = [], []
    for name in models:
        model = pretrained(name)
        fp_pred, labels = predictions(model, test)
        fp[name] = 100.0 * float((fp_pred == labels).float().mean())
        base_pred, base_sqnr = {}, {}
        for setting, method, rec in TABLE:
            start = time.perf_counter()
            q = lowbit.quantize(model, rec, calib_data=calib)
            elapsed = time.perf_counter() - start
            pred, _ = predictions(q, test)
            key = (name, setting, method)
            acc[key] = 100.0 * float((pred == labels).float().mean())
            print(f"{name} {setting} {method}: {acc[key]:.2f} ({elapsed:.2f} s)", flush=True)
            if method.startswith("Baseline"):
                base_pred[setting], base_sqnr[setting] = pred, sqnr_report(model, q, calib)
            else:
                sigma[key] = paired_sigma(pred, base_pred[setting], labels)
                delta = acc[key] - acc[(name, setting, "Baseline (min-max)")]
                if delta < -2 * sigma[key]:  # a real loss against min-max: say where the error grew
                    explained.append(f"- {name} {setting} {method}: {delta:+.2f} points (paired sigma "
                                     f"{sigma[key]:.2f}); largest output-SQNR drops against min-max: "
                                     f"{sqnr_drops(base_sqnr[setting], sqnr_report(model, q, calib))}.")
            if setting == "W4A4" and method in ("Baseline (min-max)", "All methods combined",
                                                "All methods, reference-code b"):
                sqnr_rows.append((name, method, base_sqnr[setting] if method.startswith("Baseline")
                                  else sqnr_report(model, q, calib)))
                if method == "All methods combined":
                    seconds[name] = elapsed
    header = "| setting | method | " + " | ".join(models) + " |"
    lines = [header, "|---|---|" + "---:|" * len(models)]
    last = None
    for setting, method, _ in TABLE:
        cells = []
        for name in models:
            base = acc[(name, setting, "Baseline (min-max)")]
            value = acc[(name, setting, method)]
            if method.startswith("Baseline"):
                cells.append(f"{value:.2f}")
            else:
                noise = "" if abs(value - base) >= 2 * sigma[(name, setting, method)] else " ~"
                cells.append(f"{value:.2f} ({value - base:+.2f}{noise})")
        lines.append(f"| {setting if setting != last else ''} | {method} | " + " | ".join(cells) + " |")
        last = setting
    lines.append("| FP32 | reference | " + " | ".join(f"{fp[n]:.2f}" for n in models) + " |")
    sq = ["| model | W4A4 method | mean output SQNR (dB) | worst layer (dB) | mean weight SQNR (dB) |",
          "|---|---|---:|---:|---:|"]
    for name, method, rows in sqnr_rows:
        outs = [r["output_sqnr_db"] for r in rows]
        worst = min(rows, key=lambda r: r["output_sqnr_db"])
        sq.append(f"| {name} | {method} | {statistics.mean(outs):.1f} | {worst['output_sqnr_db']:.1f} "
                  f"({worst['layer']}) | {statistics.mean(r['weight_sqnr_db'] for r in rows):.1f} |")
    timing = "; ".join(f"{n}: {s:.2f} s" for n, s in seconds.items())
    losses = "\n".join(explained) or "- none: no method loses to min-max by more than twice the paired sigma."
    body = (f"Fashion-MNIST test top-1 (%, 10,000 images); in brackets the change against the setting's "
            "min-max baseline, marked `~` when it is within twice its paired standard deviation "
            "(`100 sqrt(n01 + n10) / n`, from the test images exactly one of the two models gets right; "
            "typically 0.05-0.15 points here), i.e. not distinguishable from noise on this test set. "
            f"Calibration: the first {args.calib_images} images of the held-out calibration "
            "split. All rows fold batch norm, quantize weights per output channel and activations per channel, "
            "and keep the first and last layers at 8 bits; bit allocation applies to the sides of at most 4 bits "
            "(average exactly the nominal width). ACIQ takes the Laplace scale of a post-ReLU tensor from its "
            "positive values (`one_sided_scale: positive`, lowbit's default); the *reference-code b* rows use "
            "the authors' `mean|x - mean(x)|`, which reads about 0.61 b on a rectified Laplace tensor and so "
            "clips about 40 % short of the half-range optimum.\n\n" + "\n".join(lines) +
            "\n\nWhere a method loses to min-max beyond the noise, and the layers where its error grew "
            "(output SQNR at the same setting, min-max -> method):\n\n" + losses +
            "\n\nPer-layer quantization error at W4A4 (output SQNR: each layer's output inside the quantized "
            "model against the float model on the calibration images, so errors accumulate with depth):\n\n"
            + "\n".join(sq) +
            f"\n\nCalibration plus quantization with all methods (fold, statistics, bit allocation, bias "
            f"correction) on {args.calib_images} images: {timing}.")
    write_section("ptq-ablation", "Post-training quantization ablation (ACIQ, bit allocation, bias correction)",
                  body, SEED)


if __name__ == "__main__":
    main()
