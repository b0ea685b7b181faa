"""Mixed precision (EAGL and ALPS, Bablani et al., arXiv:2301.13330): the accuracy-cost frontier.

    python benchmarks/mixed_frontier.py [--model resnet20] [--budgets 0.5] [--steps 300]
                                        [--alps-steps 50] [--random-draws 3] [--additivity 4]
                                        [--methods eagl,alps]

Protocol: start from the shipped FP checkpoint; base recipe ``lsq-w4a4`` (LSQ, first and last
layers 8-bit); candidates are every other conv/linear layer, at W4A4 or W2A2; cost is
bit-operations (MACs x w_bits x a_bits), budgets are fractions of the uniform W4A4 model's.
Every point (uniform W4A4/W3A3/W2A2, each method's assignment per budget, and ``--random-draws``
random selections at the cost of the more expensive method assignment, so random never has
less budget) is quantized (activations calibrated on 512 held-out images), fine-tuned for the
same ``--steps`` steps with the recipe's ``qat:`` settings (cosine over those steps,
distillation from the FP model unless ``--no-distill``), and evaluated on the test split.
As in the paper, the base is the trained uniform 4-bit network: EAGL reads the learned LSQ steps
of the fine-tuned uniform W4A4 point, and ALPS lowers one layer of a copy of it at a time
(``--no-from-w4a4``: both start from the FP model with initial steps). ALPS measures its
per-layer drops on ``--alps-eval-images`` held-out (calib) images after ``--alps-steps`` steps
each, cached under ``--cache-dir`` (a rerun is instant; ``--alps-shard i/n`` runs one part and
stops, for several processes). EAGL's selection time is measured on
the model and on a randomly initialised ResNet-50-sized model (ImageNet shapes, 224x224).

Targets (issue 6): at half the uniform 4-bit bit-operations, EAGL and ALPS lose at most 1 point
against uniform W4A4 after the same fine-tuning and beat the random mean; EAGL selects in < 1 s.
Writes the 'mixed-frontier' section of docs/RESULTS.md and docs/mixed_frontier.png
(``--no-write``: only ``--out``).

Cost: ``(len(uniform) + budgets x (methods + draws)) x steps + (1 + L + additivity) x alps-steps``
fine-tuning steps (L = 20 candidates for ResNet-20), plus one test evaluation per point.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_page import ROOT, write_section  # noqa: E402

from lowbit.data.datasets import dataset_info, make_loader  # noqa: E402
from lowbit.evaluate import evaluate  # noqa: E402
from lowbit.mixed import ALPS, additivity_check, build_space, select  # noqa: E402
from lowbit.mixed.cost import precision_label  # noqa: E402
from lowbit.mixed.frontier import frontier_table, write_frontier_plot  # noqa: E402
from lowbit.mixed.knapsack import random_assignment  # noqa: E402
from lowbit.mixed.tune import frozen_teacher, train_and_evaluate  # noqa: E402
from lowbit.qat import FinetuneConfig  # noqa: E402
from lowbit.zoo import pretrained  # noqa: E402

SEED = 0


# ----- a ResNet-50-sized model, only for timing EAGL ------------------------------------------
class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = 4 * width
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + self.down(x))


class ResNet50(nn.Module):
    """He et al. (2016) ResNet-50 shapes: 7x7 stem, bottleneck stages (3, 4, 6, 3), 1000 classes."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                                  nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], 64
        for stage, (width, n) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
            for b in range(n):
                blocks.append(Bottleneck(cin, width, 2 if stage > 0 and b == 0 else 1))
                cin = 4 * width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, 1000)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


def time_eagl(model, space, repeats: int = 5) -> float:
    """Median seconds of an EAGL selection (entropies of every candidate + the knapsack), at the
    middle of the feasible budget range, on one thread (elementwise work on the weights: one
    thread is as fast, and it is not thrown off by other jobs contending for the cores)."""
    budget = sum(space.bounds()) / 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times = []
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            select(space, budget, "eagl", model=model, absolute=True)
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--recipe", default="lsq-w4a4", help="base recipe (quantizers, qat: settings)")
    ap.add_argument("--methods", default="eagl,alps")
    ap.add_argument("--budgets", default="0.5", help="fractions of the uniform W4A4 bit-operations")
    ap.add_argument("--precisions", default="4,2")
    ap.add_argument("--steps", type=int, default=300, help="fine-tuning steps of every frontier point")
    ap.add_argument("--alps-steps", type=int, default=50, help="fine-tuning steps of each ALPS run")
    ap.add_argument("--random-draws", type=int, default=3)
    ap.add_argument("--uniform-bits", default="2,3,4")
    ap.add_argument("--additivity", type=int, default=4, help="held-out combinations for the additivity check")
    ap.add_argument("--train-images", type=int, help="fine-tune on the first N training images (default: all)")
    ap.add_argument("--test-images", type=int, help="evaluate on the first N test images (default: all 10,000)")
    ap.add_argument("--calib-images", type=int, default=512)
    ap.add_argument("--alps-eval-images", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, help="default: the recipe's")
    ap.add_argument("--distill", action=argparse.BooleanOptionalAction, default=True,
                    help="distil from the FP model with the recipe's weight (default on)")
    ap.add_argument("--resnet50", action=argparse.BooleanOptionalAction, default=True,
                    help="also time EAGL on a random ResNet-50-sized model")
    ap.add_argument("--weighting", default="none", help="EAGL weighting (none, params, log_params, macs)")
    ap.add_argument("--from-w4a4", action=argparse.BooleanOptionalAction, default=True,
                    help="EAGL reads the learned steps of the fine-tuned uniform W4A4 model and ALPS lowers layers "
                    "of copies of it (default); --no-from-w4a4: both start from the FP model's initial steps")
    ap.add_argument("--out", default="runs/mixed-frontier")
    ap.add_argument("--cache-dir", help="ALPS cache (default: OUT/alps-cache)")
    ap.add_argument("--alps-shard", help="run only part i/n of ALPS into the cache, then stop")
    ap.add_argument("--write", action=argparse.BooleanOptionalAction, default=True,
                    help="write the docs/RESULTS.md section and docs/mixed_frontier.png")
    args = ap.parse_args()

    torch.manual_seed(SEED)
    methods = [m for m in args.methods.split(",") if m]
    if set(methods) - {"eagl", "alps"}:
        raise SystemExit(f"--methods takes eagl and/or alps, got {methods}")
    budgets = [float(b) for b in args.budgets.split(",") if b]
    out = Path(args.out)
    (out / "recipes").mkdir(parents=True, exist_ok=True)
    info = dataset_info(args.dataset)
    model = pretrained(args.model, args.dataset)
    start = time.perf_counter()
    space = build_space(model, args.recipe, example_input=torch.zeros(1, info.in_channels, info.image_size,
                                                                       info.image_size),
                        precisions=args.precisions.split(","))
    trace_seconds = time.perf_counter() - start
    for b in budgets:
        space.absolute_budget(b)
    cfg = FinetuneConfig.from_recipe(space.recipe)
    if not args.distill:
        cfg = cfg.replace(distill_weight=0.0)
    batch = args.batch_size or cfg.batch_size
    train = make_loader(args.dataset, "train", batch, shuffle=True, seed=SEED, limit=args.train_images)
    calib = make_loader(args.dataset, "calib", 128, limit=args.calib_images)
    held_out = make_loader(args.dataset, "calib", 500, limit=args.alps_eval_images)
    test = make_loader(args.dataset, "test", 500, limit=args.test_images)

    teacher = frozen_teacher(model)
    hi = space.bounds()[1]
    high = space.uniform(space.highest)
    points = []
    trained = {}

    def run_point(kind, label, assignment, budget, stem, extra=None):
        recipe = space.recipe_for(assignment, name=stem, meta={"method": kind, "budget": budget})
        recipe.save(out / "recipes" / f"{stem}.yaml")
        r = train_and_evaluate(model, recipe, train, test, steps=args.steps, calib_data=calib, teacher=teacher,
                               config=cfg, seed=SEED)
        trained[stem] = r["qmodel"]
        cost = space.cost(assignment)
        point = {"kind": kind, "label": label, "budget": budget, "cost": cost, "fraction": cost / hi,
                 "mean_w_bits": space.totals(assignment)["mean_w_bits"], "accuracy": r["accuracy"],
                 "steps": r["steps"], "seconds": round(r["seconds"], 1), "recipe": f"recipes/{stem}.yaml"}
        point.update(extra or {})
        print(f"{label}: {point['fraction']:.3f} of W4A4 bit-ops, top-1 {r['accuracy']:.2f}% "
              f"({r['steps']} steps, {r['seconds']:.0f} s)", flush=True)
        return point

    def fine_tuned_high():
        """The uniform high-precision model after the same fine-tune as every point (the paper's
        LSQ-trained base): EAGL reads its learned steps, ALPS lowers layers of copies of it."""
        stem = f"uniform-{precision_label(space.highest)}"
        if stem not in trained:
            recipe = space.recipe_for(high, name=stem)
            trained[stem] = train_and_evaluate(model, recipe, train, held_out, steps=args.steps, calib_data=calib,
                                               teacher=teacher, config=cfg, seed=SEED, eval_batches=1)["qmodel"]
        return trained[stem]

    def make_alps():
        base = fine_tuned_high() if args.from_w4a4 else None
        return ALPS(model, space, train, held_out, steps=args.alps_steps, calib_data=calib, seed=SEED,
                    base_model=base, cache_dir=args.cache_dir or out / "alps-cache", config=cfg)

    if "alps" in methods and args.alps_shard:
        res = make_alps().run(args.alps_shard)
        print(f"ALPS shard {args.alps_shard}: trained {res.trained_now} runs; "
              f"{res.runs - len(res.missing)}/{res.runs} in {res.cache_dir}")
        return

    # ----- selection cost -------------------------------------------------------------------
    eagl_seconds = time_eagl(model, space)
    r50 = None
    if args.resnet50:
        big = ResNet50().eval()
        t0 = time.perf_counter()
        big_space = build_space(big, args.recipe, example_input=torch.zeros(1, 3, 224, 224))
        r50_trace = time.perf_counter() - t0
        r50 = {"params": sum(p.numel() for p in big.parameters()), "candidates": len(big_space.candidates),
               "trace_seconds": r50_trace, "eagl_seconds": time_eagl(big, big_space, repeats=3)}
        print(f"ResNet-50-sized model: {r50}", flush=True)
        del big, big_space
    print(f"EAGL selection on {args.model}: {eagl_seconds * 1000:.1f} ms", flush=True)

    # ----- uniform points, then the methods' gains --------------------------------------------
    fp = evaluate(model, test)["top1"]
    for bits in args.uniform_bits.split(","):
        p = (int(bits), int(bits))
        points.append(run_point("uniform", f"uniform {precision_label(p)}", space.uniform(p), None,
                                f"uniform-{precision_label(p)}"))
    base_q = fine_tuned_high() if args.from_w4a4 else None
    alps, alps_info, gains = None, None, {}
    if "alps" in methods:
        alps = make_alps()
        res = alps.run()
        gains["alps"] = res.gains
        alps_info = {"runs": res.runs, "steps_per_run": res.steps_per_run, "steps_total": res.steps_total,
                     "seconds_total": res.seconds_total, "trained_now": res.trained_now,
                     "base_accuracy": res.base_accuracy, "drops": res.drops()}
        print(f"ALPS: {res.runs} runs x {res.steps_per_run} steps = {res.steps_total} steps, "
              f"{res.seconds_total:.0f} s", flush=True)
    entropies = None
    if "eagl" in methods:
        from lowbit.mixed.eagl import eagl_entropies, eagl_gains
        entropies = eagl_entropies(model, space, qmodel=base_q)
        gains["eagl"] = eagl_gains(model, space, weighting=args.weighting, entropies=entropies)
    for b in budgets:
        tag = f"{b:g}"
        chosen = []
        for m in methods:
            sel = select(space, b, m, gains=gains[m])
            chosen.append(run_point(m, f"{m.upper()} {tag}", sel.assignment, b, f"{m}-{tag}",
                                    {"select_seconds": sel.seconds}))
        points += chosen
        cost = max(p["cost"] for p in chosen)
        draws = [run_point("random-draw", f"random {tag} draw {d}",
                           random_assignment(space, cost, seed=SEED + 1000 * d + 1, absolute=True), b,
                           f"random-{tag}-draw{d}") for d in range(args.random_draws)]
        if draws:
            accs = [d["accuracy"] for d in draws]
            points.append({"kind": "random", "label": f"random {tag} (mean of {len(draws)})", "budget": b,
                           "cost": statistics.mean(d["cost"] for d in draws),
                           "fraction": statistics.mean(d["fraction"] for d in draws),
                           "mean_w_bits": statistics.mean(d["mean_w_bits"] for d in draws),
                           "accuracy": statistics.mean(accs), "accuracy_std": statistics.pstdev(accs),
                           "steps": sum(d["steps"] for d in draws), "seconds": sum(d["seconds"] for d in draws),
                           "draws": draws})

    additivity = None
    if alps is not None and args.additivity:
        res = alps.run()
        additivity = additivity_check(space, res.drops(), alps.measure_assignment, res.base_accuracy,
                                      combos=args.additivity, sizes=(2, 3, 4), seed=SEED)

    results = {"model": args.model, "method": "+".join(methods), "metric": space.metric, "steps": args.steps,
               "precisions": [precision_label(p) for p in space.precisions], "fp_accuracy": fp,
               "candidates": space.candidates, "fixed": {n: precision_label(p) for n, p in space.fixed.items()},
               "all_high_cost": hi, "points": points, "eagl_seconds": eagl_seconds, "trace_seconds": trace_seconds,
               "resnet50": r50, "alps": alps_info, "additivity": additivity, "gains": gains,
               "eagl_entropies": entropies,
               "args": vars(args)}
    (out / "frontier.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    table = frontier_table(results)
    (out / "frontier.md").write_text(table + "\n")
    plot = write_frontier_plot(results, out / "frontier.png")
    print(table)

    # ----- targets and the results page -----------------------------------------------------
    u4 = next((p["accuracy"] for p in points if p["label"] == f"uniform {precision_label(space.highest)}"), None)
    checks = []
    half = min(budgets, key=lambda b: abs(b - 0.5)) if budgets else None
    if half is not None and u4 is not None:
        rand = next((p for p in points if p["kind"] == "random" and p["budget"] == half), None)
        for m in methods:
            p = next(p for p in points if p["kind"] == m and p["budget"] == half)
            checks.append(f"{m.upper()} at {half:g}: {p['accuracy']:.2f}% vs uniform W4A4 {u4:.2f}% "
                          f"({p['accuracy'] - u4:+.2f}; target >= -1.00): "
                          f"{'PASS' if p['accuracy'] >= u4 - 1.0 else 'FAIL'}")
            if rand is not None:
                checks.append(f"{m.upper()} at {half:g} vs random mean {rand['accuracy']:.2f}% "
                              f"({p['accuracy'] - rand['accuracy']:+.2f}): "
                              f"{'PASS' if p['accuracy'] > rand['accuracy'] else 'FAIL'}")
    checks.append(f"EAGL selection on {args.model} (one thread): {eagl_seconds * 1000:.1f} ms (target < 1 s): "
                  f"{'PASS' if eagl_seconds < 1.0 else 'FAIL'}")
    if r50 is not None:
        checks.append(f"EAGL selection (one thread) on a random ResNet-50-sized model "
                      f"({r50['params'] / 1e6:.1f} M parameters, {r50['candidates']} candidates): "
                      f"{r50['eagl_seconds']:.2f} s (no target; timed during this run, which may share the "
                      f"machine: the eagl-speed section times it alone); its MAC trace at 224x224 (shared by "
                      f"every method): {r50['trace_seconds']:.2f} s")
    for c in checks:
        print(c)
    if not args.write:
        return
    lines = [(f"{args.model} on {args.dataset} (FP test top-1 {fp:.2f}%), base recipe `{args.recipe}` "
             f"(first and last layers W8A8; {len(space.candidates)} candidate layers at "
             f"{' or '.join(precision_label(p) for p in space.precisions)}); cost = bit-operations "
             f"(MACs x w_bits x a_bits), fractions of the uniform W4A4 model's {hi:,}. Every point is fine-tuned "
             f"for {args.steps} steps (batch {batch}, the recipe's qat: settings, cosine over those steps, "
             f"{'distillation from the FP model' if args.distill else 'no distillation'}) and evaluated on "
             f"{'all' if args.test_images is None else args.test_images} test images. EAGL ("
             f"weighting {args.weighting}) and ALPS start from "
             f"{'the fine-tuned uniform W4A4 model' if args.from_w4a4 else 'the FP model'}. Random: "
             f"{args.random_draws} draws filled in random order up to the cost of the more expensive method "
             "assignment."), "", table]
    if alps_info:
        lines += ["", (f"ALPS cost: {alps_info['runs']} fine-tunes x {alps_info['steps_per_run']} steps = "
                       f"{alps_info['steps_total']} steps, {alps_info['seconds_total'] / 60:.1f} min (accuracy on "
                       f"{args.alps_eval_images} held-out images; base {alps_info['base_accuracy']:.2f}%).")]
    if additivity:
        lines += ["", (f"Additivity on {len(additivity['rows'])} held-out combinations (predicted drop = sum of "
                       f"the single-layer ALPS drops): Pearson r {additivity['pearson_r']:.2f}, mean |error| "
                       f"{additivity['mean_abs_error']:.2f} points (mean predicted "
                       f"{additivity['mean_predicted']:.2f}, measured {additivity['mean_measured']:.2f}).")]
    lines += ["", "Targets:", ""] + [f"- {c}" for c in checks]
    if plot:
        (ROOT / "docs").mkdir(exist_ok=True)
        shutil.copy(plot, ROOT / "docs" / "mixed_frontier.png")
        lines += ["", "![accuracy-cost frontier](mixed_frontier.png)"]
    write_section("mixed-frontier", "Mixed precision: EAGL / ALPS accuracy-cost frontier", "\n".join(lines), SEED)


if __name__ == "__main__":
    main()
