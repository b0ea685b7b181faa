"""ImageNet classifiers with published weights (MobileNetV2, EfficientNet-Lite0) under every shipped CNN recipe,
measured by agreement with their own float model on the offline natural photos (no ImageNet image exists here).

    python benchmarks/imagenet_agreement.py [--models mobilenetv2,efficientnet-lite0] [--recipes ...]
                                            [--calib-photos astronaut,motorcycle_right,hubble_deep_field]

Photos: scikit-learn's two and scikit-image's eight colour photos (lowbit.data.photos). Each photo gives 20 views
(short side 256 and 320; centre and four corner 224 crops; each mirrored). The calibration photos' views
calibrate; the other photos' views are evaluated, so no evaluated image was seen in calibration. Per recipe:
top-1 and top-5 agreement with the float model (the float top-1 among the quantized top-1 / top-5), mean
KL(float || quantized) of the softmax, SQNR of the logits, and the SQNR of the activation entering each quantized
layer (float model's against the quantized model's, before that layer's own quantizer: the error accumulated up
to there), of which the table shows the worst layer. The QAT recipes are measured as calibrated, before any
fine-tuning (no labelled ImageNet data here to fine-tune on): their starting point, not their result.
``ptq-w4a4-aciq-dw8`` is lowbit's variant for depthwise networks (see :func:`depthwise_at_8_bits`).

Rows go to docs/results/imagenet_agreement.json as they finish (a rerun skips rows already there; --fresh
starts over); the section "imagenet-agreement" of docs/RESULTS.md is rewritten from all rows.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_page import ROOT, load_rows, store_row, write_section  # noqa: E402

import lowbit  # noqa: E402
from lowbit.data.photos import PHOTOS, load_photo, photo_views  # noqa: E402
from lowbit.nn.modules import QuantMixin  # noqa: E402
from lowbit.zoo import pretrained  # noqa: E402
from lowbit.zoo.imagenet import PREPROCESSING  # noqa: E402

SEED = 0
ROWS = ROOT / "docs" / "results" / "imagenet_agreement.json"
PTQ = ["ptq-w8a8", "ptq-w4a4-minmax", "ptq-w4a4-aciq", "ptq-w4a4-aciq-dw8"]
QAT = ["faq-w8a8", "faq-w4a4", "lsq-w4a4", "lsq-w3a3", "lsq-w2a2", "pact-sawb-w2a2"]
CALIB_PHOTOS = "astronaut,motorcycle_right,hubble_deep_field"


def depthwise_at_8_bits(model) -> dict:
    """lowbit's variant for depthwise networks: ``ptq-w4a4-aciq`` with every depthwise convolution (a few percent of
    the bit-operations: cheap to keep) at W8A8, like the first and last layers."""
    recipe = lowbit.load_recipe("ptq-w4a4-aciq").to_dict()
    int8 = recipe["layers"]["@first"]
    depthwise = [n for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels]
    recipe["layers"] = {**recipe["layers"], **{n: int8 for n in depthwise}}
    recipe["name"] = "ptq-w4a4-aciq-dw8"
    return recipe


def recipe_for(name: str, model):
    return depthwise_at_8_bits(model) if name == "ptq-w4a4-aciq-dw8" else name


def sqnr_db(signal: float, noise: float) -> float:
    return 10 * math.log10(signal / noise) if noise > 0 else float("inf")


class LayerInputs:
    """Forward pre-hooks keeping the input of every named layer of one model (for one batch)."""

    def __init__(self, model, names):
        self.values = {}
        modules = dict(model.named_modules())
        self.hooks = [modules[n].register_forward_pre_hook(lambda m, a, n=n: self.values.__setitem__(n, a[0]))
                      for n in names]

    def remove(self):
        for h in self.hooks:
            h.remove()


@torch.no_grad()
def measure(float_model, qmodel, views: torch.Tensor, batch: int) -> dict:
    names = [n for n, m in qmodel.named_modules() if isinstance(m, QuantMixin)]
    signal, noise = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
    top1 = top5 = 0
    kl = logit_signal = logit_noise = 0.0
    for start in range(0, len(views), batch):
        x = views[start:start + batch]
        f_hooks, q_hooks = LayerInputs(float_model, names), LayerInputs(qmodel, names)
        ref, out = float_model(x), qmodel(x)
        f_hooks.remove()
        q_hooks.remove()
        for n in names:
            a, b = f_hooks.values[n].double(), q_hooks.values[n].double()
            signal[n] += float(a.pow(2).sum())
            noise[n] += float((a - b).pow(2).sum())
        label = ref.argmax(1)
        top1 += int((out.argmax(1) == label).sum())
        top5 += int((out.topk(5, 1).indices == label[:, None]).any(1).sum())
        kl += float(torch.nn.functional.kl_div(out.log_softmax(1), ref.log_softmax(1), log_target=True,
                                               reduction="sum"))
        logit_signal += float(ref.double().pow(2).sum())
        logit_noise += float((ref.double() - out.double()).pow(2).sum())
    layer_sqnr = {n: sqnr_db(signal[n], noise[n]) for n in names}
    worst = min(layer_sqnr, key=layer_sqnr.get)
    n = len(views)
    return {"top1_agreement": top1 / n, "top5_agreement": top5 / n, "kl": kl / n,
            "logit_sqnr_db": sqnr_db(logit_signal, logit_noise), "worst_layer": worst,
            "worst_layer_sqnr_db": layer_sqnr[worst], "layer_sqnr_db": layer_sqnr}


def write(rows: list[dict], meta: dict) -> None:
    lines = [f"Agreement of each quantized ImageNet classifier with its own float model on {meta['eval_views']} views "
             f"of {meta['eval_photos']} offline photos ({', '.join(meta['eval_names'])}: 20 views each, two scales x "
             f"five crops x mirror), calibrated on the {meta['calib_views']} views of {', '.join(meta['calib_names'])}. "
             "No ImageNet image exists here, so this is agreement, not accuracy. QAT recipes are shown as calibrated "
             "**before fine-tuning** (their starting point: there is no labelled ImageNet data to fine-tune on; see "
             "the transfer section for fine-tuned numbers).", "",
             "| model | recipe | kind | top-1 agreement | top-5 agreement | KL(float ‖ quantized) | logit SQNR (dB) | "
             "worst layer input SQNR (dB) | seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    order = {r: i for i, r in enumerate(PTQ + QAT)}
    for r in sorted(rows, key=lambda r: (r["model"], order.get(r["recipe"], 99))):
        kind = ("PTQ, lowbit's variant" if r["recipe"] == "ptq-w4a4-aciq-dw8" else "PTQ" if r["recipe"] in PTQ
                else "QAT recipe, not fine-tuned")
        lines.append(f"| {r['model']} | `{r['recipe']}` | {kind} | {100 * r['top1_agreement']:.1f} % | "
                     f"{100 * r['top5_agreement']:.1f} % | {r['kl']:.3f} | {r['logit_sqnr_db']:.1f} | "
                     f"{r['worst_layer_sqnr_db']:.1f} (`{r['worst_layer']}`) | {r['seconds']:.0f} |")
    lines += ["", "`ptq-w4a4-aciq-dw8` is `ptq-w4a4-aciq` with every depthwise convolution at W8A8 (lowbit's variant: "
              "depthwise layers hold a few percent of the bit-operations). Per-layer SQNR of every row: "
              "`docs/results/imagenet_agreement.json`."]
    write_section("imagenet-agreement", "ImageNet models: agreement with the float model on offline photos",
                  "\n".join(lines), SEED)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mobilenetv2,efficientnet-lite0")
    ap.add_argument("--recipes", default=",".join(PTQ + QAT))
    ap.add_argument("--calib-photos", default=CALIB_PHOTOS)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--fresh", action="store_true", help="forget the rows already measured")
    args = ap.parse_args()
    torch.manual_seed(SEED)
    if args.fresh and ROWS.is_file():
        ROWS.unlink()
    calib_names = args.calib_photos.split(",")
    eval_names = [p for p in PHOTOS if p not in calib_names]
    images = {p: load_photo(p) for p in PHOTOS}
    meta = {"calib_names": calib_names, "eval_names": eval_names, "eval_photos": len(eval_names)}
    for model_name in args.models.split(","):
        prep = PREPROCESSING[model_name]
        calib = photo_views([images[p] for p in calib_names], prep)
        views = photo_views([images[p] for p in eval_names], prep)
        meta.update(calib_views=len(calib), eval_views=len(views))
        float_model = pretrained(model_name)
        calib_batches = list(calib.split(args.batch))
        for recipe in args.recipes.split(","):
            if any((r["model"], r["recipe"]) == (model_name, recipe) for r in load_rows(ROWS)):
                continue
            start = time.perf_counter()
            qmodel = lowbit.quantize(float_model, recipe_for(recipe, float_model), calib_data=calib_batches).eval()
            row = {"model": model_name, "recipe": recipe, **measure(float_model, qmodel, views, args.batch),
                   "seconds": time.perf_counter() - start, **meta}
            store_row(ROWS, row, key=lambda r: (r["model"], r["recipe"]))
            print(f"{model_name} {recipe}: top-1 agreement {100 * row['top1_agreement']:.1f} %, KL {row['kl']:.3f}, "
                  f"logit SQNR {row['logit_sqnr_db']:.1f} dB ({row['seconds']:.0f} s)", flush=True)
            write(load_rows(ROWS), meta)


if __name__ == "__main__":
    main()
