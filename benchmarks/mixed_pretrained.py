"""EAGL and ALPS mixed precision on models with published weights: all-MiniLM-L6-v2 (BERT) and MobileNetV2, against
random assignments of the same bit-operations.

    python benchmarks/mixed_pretrained.py [--model minilm|mobilenetv2|mobilenetv2-fmnist] [--budgets 0.5,0.75]
                                          [--steps 60] [--random-draws 2] [--methods eagl,alps]
                                          [--alps-steps 50] [--alps-eval-images 2048]

Search spaces (lowbit.mixed): every quantized layer but the first and last (kept at 8 bits) is a candidate.

- MiniLM: base recipe ``lsq-w4a8-transformer`` (token tables 4-bit); candidates W4A8 / W2A8 ("4/2") and
  W4A8 / W3A8 / W2A8 ("4/3/2"): weights mixed, activations 8-bit (a transformer's activations at 2-4 bits are
  beyond any post-training or short fine-tuning here). Each assignment is quantized (calibrated on 128 calib
  sentences), fine-tuned for ``--steps`` steps of distillation from the float model on train sentences
  (lowbit.llm.encoder) and measured by sentence-embedding cosine to the float model on 472 test sentences.
- MobileNetV2: base ``lsq-w4a4``; candidates W4A4 / W2A2 and W4A4 / W3A3 / W2A2; measured by top-1 agreement
  with the float model on the offline photos' held-out views, after calibration only (there is no ImageNet
  data to fine-tune on here), so its rows show what the selection keeps before any fine-tuning.

Budgets are fractions of the all-highest-precision bit-operations; EAGL's (and ALPS's) assignment,
``--random-draws`` random assignments at the cost EAGL used, and the uniform models. EAGL's time (entropy of each
layer's 4-bit codes + the knapsack) is reported. ALPS (``--methods eagl,alps``; not on the photos, which give no
fine-tuning data) lowers one candidate layer at a time from the uniform highest-precision model, fine-tunes each
copy ``--alps-steps`` distilled steps and measures the drop on validation data, never the test set: top-1 on the
first ``--alps-eval-images`` validation images (mobilenetv2-fmnist), or 100 x the embedding cosine on the 128 calib
sentences (MiniLM); its runs are cached in runs/alps-cache/, and its time is the whole of that. Rows go to
docs/results/mixed_pretrained.json as they finish; the section "mixed-pretrained" of docs/RESULTS.md is rewritten
from all rows.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from imagenet_agreement import CALIB_PHOTOS  # noqa: E402
from transfer import FP_LR, FP_STEPS, SIZE, loaders, measure, transferred  # noqa: E402
from results_page import ROOT, load_rows, store_row, write_section  # noqa: E402

import lowbit  # noqa: E402
from lowbit.mixed import build_space, random_assignment, select  # noqa: E402
from lowbit.mixed.alps import ALPS  # noqa: E402
from lowbit.mixed.cost import precision_label  # noqa: E402

SEED = 0
ROWS = ROOT / "docs" / "results" / "mixed_pretrained.json"
SPACES = {"minilm": {"4/2": ["w4a8", "w2a8"], "4/3/2": ["w4a8", "w3a8", "w2a8"]},
          "mobilenetv2": {"4/2": ["w4a4", "w2a2"], "4/3/2": ["w4a4", "w3a3", "w2a2"]}}
SPACES["mobilenetv2-fmnist"] = SPACES["mobilenetv2"]
BASE = {"minilm": "lsq-w4a8-transformer", "mobilenetv2": "lsq-w4a4", "mobilenetv2-fmnist": "lsq-w4a4"}


class MiniLM:
    metric = "embedding cosine"

    def __init__(self, steps: int):
        from lowbit.data.sentences import encode, sentences
        from lowbit.llm.encoder import embedding_agreement, sentence_embeddings
        from lowbit.zoo.encoders import load_encoder

        self.model, tokenizer = load_encoder()
        self.calib = encode(tokenizer, sentences("calib", 128, seed=SEED))
        self.test = encode(tokenizer, sentences("test", 472, seed=SEED))
        self.train = encode(tokenizer, sentences("train", 32 * max(steps, 1), seed=SEED))
        self.reference = sentence_embeddings(self.model, self.test)
        self.example = self.calib[0]
        self.steps = steps
        self._agreement, self._embed = embedding_agreement, sentence_embeddings

    def score(self, recipe) -> dict:
        qmodel = lowbit.quantize(self.model, recipe, calib_data=self.calib)
        if self.steps:
            config = {**lowbit.load_recipe(BASE["minilm"]).sections["qat"], "max_steps": self.steps, "epochs": 1,
                      "progress": False}
            lowbit.finetune(qmodel, self.train, teacher=self.model, config=config, log=lambda _m: None)
        got = self._agreement(self.reference, self._embed(qmodel, self.test))
        return {"score": got["cosine_mean"], "same_neighbour": got["same_neighbour"]}

    def val_cosine(self, qmodel, calib) -> float:
        """ALPS's score: 100 x the mean embedding cosine to the float model on the calib sentences (validation)."""
        return 100.0 * self._agreement(self.calib_reference, self._embed(qmodel, calib))["cosine_mean"]

    def alps(self, space, steps: int, _images: int) -> ALPS:
        self.calib_reference = self._embed(self.model, self.calib)
        return ALPS(self.model, space, self.train, self.calib, steps=steps, calib_data=self.calib, seed=SEED,
                    cache_dir=ROOT / "runs" / "alps-cache", config=lowbit.load_recipe(BASE["minilm"]).sections["qat"],
                    score=self.val_cosine)


class MobileNetV2:
    metric = "top-1 agreement (%)"

    def __init__(self, steps: int):
        from lowbit.data.photos import PHOTOS, load_photo, photo_views
        from lowbit.zoo import pretrained
        from lowbit.zoo.imagenet import PREPROCESSING

        self.model = pretrained("mobilenetv2")
        prep = PREPROCESSING["mobilenetv2"]
        calib_names = CALIB_PHOTOS.split(",")
        self.calib = list(photo_views([load_photo(p) for p in calib_names], prep).split(10))
        self.views = photo_views([load_photo(p) for p in PHOTOS if p not in calib_names], prep)
        with torch.no_grad():
            self.reference = torch.cat([self.model(v) for v in self.views.split(10)]).argmax(1)
        self.example = self.calib[0][:1]

    @torch.no_grad()
    def score(self, recipe) -> dict:
        qmodel = lowbit.quantize(self.model, recipe, calib_data=self.calib).eval()
        top1 = torch.cat([qmodel(v) for v in self.views.split(10)]).argmax(1)
        return {"score": 100.0 * float((top1 == self.reference).float().mean())}


class TransferredMobileNetV2:
    """MobileNetV2 transferred to Fashion-MNIST at 64x64 by benchmarks/transfer.py (its FP model, trained there
    or read back from runs/transfer/): labelled accuracy, and fine-tuning that 2-bit layers need."""

    metric = "test top-1 (%)"

    def __init__(self, steps: int):
        defaults = argparse.Namespace(size=SIZE, fp_steps=FP_STEPS, fp_lr=FP_LR, seed=SEED)
        self.data = loaders("mobilenetv2", SIZE, SEED)
        self.model, _ = transferred("mobilenetv2", self.data, defaults, print)
        self.calib = [x for x, _ in self.data["calib"]]
        self.example = self.calib[0][:1]
        self.steps = steps

    def score(self, recipe) -> dict:
        qmodel = lowbit.quantize(self.model, recipe, calib_data=self.calib)
        if self.steps:
            config = lowbit.FinetuneConfig.from_recipe(BASE["mobilenetv2-fmnist"], max_steps=self.steps,
                                                       batch_size=64, seed=SEED, progress=False, tensorboard=False)
            lowbit.finetune(qmodel, self.data["train"], teacher=self.model, config=config, log=lambda _m: None)
        top1 = measure(qmodel, self.data)
        return {"score": top1["test_top1"], "val_top1": top1["val_top1"]}

    def alps(self, space, steps: int, images: int) -> ALPS:
        config = lowbit.FinetuneConfig.from_recipe(BASE["mobilenetv2-fmnist"], batch_size=64)
        return ALPS(self.model, space, self.data["train"], self.data["val"], steps=steps, calib_data=self.calib,
                    seed=SEED, cache_dir=ROOT / "runs" / "alps-cache", config=config,
                    eval_batches=-(-images // 64))


def alps_noise(result, images: int | None) -> dict:
    """ALPS's single-layer drops, and for top-1 on ``images`` images their noise: the standard deviation of a
    difference of two accuracies ``p`` measured on ``n`` images, at most ``sqrt(2 p (1 - p) / n)`` (independent
    binomial errors; the runs share the images, so the true spread is smaller)."""
    drops = result.drops()
    row = {"alps_drops": drops, "alps_base_accuracy": result.base_accuracy}
    if images:
        p = result.base_accuracy / 100
        sigma = 100 * math.sqrt(2 * p * (1 - p) / images)
        row.update(alps_sigma=sigma, alps_above_2sigma=sum(d > 2 * sigma for d in drops.values()))
    return row


def write(rows: list[dict]) -> None:
    lines = ["EAGL (entropy of each layer's 4-bit weight codes, then the exact knapsack on bit-operations) and ALPS "
             "(each layer's accuracy drop when lowered alone after a short fine-tune, then the same knapsack) against "
             "random assignments of the same cost, on models with published weights. MiniLM: mean sentence-embedding "
             "cosine to the float model on 472 held-out sentences after a short distillation fine-tune (steps in the "
             "table); MobileNetV2: top-1 agreement with the float model on the offline photos' held-out views, "
             "calibrated only (no ImageNet data to fine-tune on); mobilenetv2-fmnist: MobileNetV2 transferred to "
             "Fashion-MNIST at 64x64 (benchmarks/transfer.py), test top-1 after the fine-tuning steps shown "
             "(the recipe's settings, batch 64, distilled from the FP transfer model; validation top-1 beside it). "
             "Cost: fraction of the all-highest-precision bit-operations (first and last layers at 8 bits in every "
             "row).", "",
             "| model | candidates | budget | assignment | cost | mean weight bits | score | fine-tune steps | "
             "selection time |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["model"], r["space"], r.get("budget") or 9, r["kind"])):
        score = f"{r['score']:.4f}" if r["model"] == "minilm" else f"{r['score']:.2f} %"
        if "val_top1" in r:
            score += f" (validation {r['val_top1']:.2f} %)"
        if r.get("score_std") is not None:
            score += f" ± {r['score_std']:.4f}" if r["model"] == "minilm" else f" ± {r['score_std']:.1f}"
        lines.append(f"| {r['model']} | {r['space']} | {r.get('budget') or '-'} | {r['label']} | {r['fraction']:.3f} | "
                     f"{r['mean_w_bits']:.2f} | {score} | {r['steps']} | "
                     f"{'%.2f s' % r['select_seconds'] if r.get('select_seconds') is not None else '-'} |")
    for r in sorted((r for r in rows if "alps_drops" in r), key=lambda r: r["key"]):
        drops = sorted(r["alps_drops"].values(), reverse=True)
        noise = (f"noise sigma <= {r['alps_sigma']:.2f} points; {r['alps_above_2sigma']} drops above 2 sigma; "
                 if "alps_sigma" in r else "")
        lines += ["", f"ALPS ({r['key']}): {len(drops)} single-layer drops measured against the base "
                  f"({r['alps_base_accuracy']:.2f} on the validation data); {noise}largest "
                  + ", ".join(f"{d:.2f}" for d in drops[:5]) + "; median " + f"{drops[len(drops) // 2]:.2f}."]
    write_section("mixed-pretrained", "Mixed precision (EAGL, ALPS) on MiniLM and MobileNetV2", "\n".join(lines), SEED)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm", choices=sorted(SPACES))
    ap.add_argument("--spaces", default="4/2,4/3/2")
    ap.add_argument("--budgets", default="0.5,0.75")
    ap.add_argument("--steps", type=int, default=60,
                    help="distillation steps per assignment (MiniLM and mobilenetv2-fmnist)")
    ap.add_argument("--random-draws", type=int, default=2)
    ap.add_argument("--methods", default="eagl", help="eagl and/or alps (alps: mobilenetv2-fmnist only)")
    ap.add_argument("--alps-steps", type=int, default=50, help="distilled fine-tuning steps of each ALPS run")
    ap.add_argument("--alps-eval-images", type=int, default=2048, help="validation images ALPS measures drops on")
    args = ap.parse_args()
    methods = args.methods.split(",")
    if set(methods) - {"eagl", "alps"} or ("alps" in methods and args.model == "mobilenetv2"):
        raise SystemExit(f"--methods takes eagl and/or alps (alps needs fine-tuning data: not --model mobilenetv2), "
                         f"got {methods}")
    torch.manual_seed(SEED)
    steps = 0 if args.model == "mobilenetv2" else args.steps
    benches = {"minilm": MiniLM, "mobilenetv2": MobileNetV2, "mobilenetv2-fmnist": TransferredMobileNetV2}
    bench = benches[args.model](steps)
    done = {r["key"] for r in load_rows(ROWS)}

    def run(key: str, recipe, extra: dict) -> None:
        if key in done:
            return
        start = time.perf_counter()
        row = {"key": key, "model": args.model, "steps": steps, **extra, **bench.score(recipe),
               "seconds": time.perf_counter() - start}
        store_row(ROWS, row)
        print(row["label"], row["space"], row.get("budget"), f"{row['score']:.4f}", flush=True)
        write(load_rows(ROWS))

    for space_name in args.spaces.split(","):
        space = build_space(bench.model, BASE[args.model], example_input=bench.example,
                            precisions=SPACES[args.model][space_name])
        info = {"space": space_name}
        for p in space.precisions:
            a = space.uniform(p)
            run(f"{args.model}/{space_name}/uniform-{precision_label(p)}", space.recipe_for(a),
                {**info, "kind": "uniform", "label": f"uniform {precision_label(p)}", "fraction": space.fraction(a),
                 "mean_w_bits": space.totals(a)["mean_w_bits"]})
        alps = bench.alps(space, args.alps_steps, args.alps_eval_images) if "alps" in methods else None
        for budget in (float(b) for b in args.budgets.split(",")):
            costs = {}
            for method in methods:
                sel = select(space, budget, method, model=bench.model, alps=alps)
                costs[method] = sel.cost
                extra = {"select_seconds": sel.seconds}
                if method == "alps":
                    extra = {"select_seconds": sel.info["alps_seconds_total"],
                             **alps_noise(alps.run(), args.alps_eval_images if args.model != "minilm" else None)}
                tag = "eagl" if method == "eagl" else f"alps-{args.alps_steps}" + (
                    "" if args.model == "minilm" else f"x{args.alps_eval_images}")
                run(f"{args.model}/{space_name}/{budget}/{tag}", space.recipe_for(sel.assignment),
                    {**info, "budget": budget, "kind": method, "label": method.upper(), "fraction": sel.fraction,
                     "mean_w_bits": space.totals(sel.assignment)["mean_w_bits"], **extra})
            for d in range(args.random_draws):
                a = random_assignment(space, costs[methods[0]], seed=SEED + 1000 * d + 1, absolute=True)
                run(f"{args.model}/{space_name}/{budget}/random{d}", space.recipe_for(a),
                    {**info, "budget": budget, "kind": f"random{d}", "label": f"random draw {d}",
                     "fraction": space.fraction(a), "mean_w_bits": space.totals(a)["mean_w_bits"]})


if __name__ == "__main__":
    main()
