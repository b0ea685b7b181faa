"""``lowbit demo``: the whole idea on real data in a few minutes on a CPU.

Loads the shipped ResNet-20 (Fashion-MNIST), evaluates it in full precision, quantizes it
with every method available, and writes ``results.json``, ``results.md`` and
``accuracy_vs_size.png`` to the output folder.

``results.json`` schema (stable)::

    {"model": str, "dataset": str, "fp_accuracy": float,
     "rows": [{"method": str, "w_bits": number, "a_bits": number, "accuracy": float,
               "size_bytes": int, "seconds": float}]}

accuracy in percent (top-1 on the test split, or its first ``test_images`` with ``--quick``);
``seconds`` is the time to produce the quantized model (calibration, fine-tuning), not to
evaluate it; mixed precision rows report average bits (weights: per parameter; activations:
per multiply-accumulate).

The fine-tuning rows are deliberately short (``finetune_steps`` SGD steps at batch 128, a
fraction of one epoch, no distillation; a tenth of that with ``--quick``) so that the demo fits its time limit; the full recipes
and their results are in ``benchmarks/qat.py`` and ``docs/RESULTS.md``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit.data.datasets import make_loader
from lowbit.evaluate import evaluate
from lowbit.files import write_json_atomic, write_text_atomic
from lowbit.mixed import build_space, select
from lowbit.plot import pyplot
from lowbit.prepare import quantize
from lowbit.progress import progress
from lowbit.qat import finetune
from lowbit.recipe import load_recipe
from lowbit.summary import stored_size_bytes
from lowbit.zoo import pretrained, trained_with_augment


@dataclass
class DemoMethod:
    """One row of the demo: a name, nominal bits, and how to build the quantized model.

    ``finetune_steps``: quantization-aware fine-tuning steps after calibration (0: post-training
    only). ``mixed_budget``: choose per-layer precision with EAGL at this fraction of the
    uniform ``recipe`` model's bit-operations first (candidates W4A4 / W2A2; raised to the
    all-W2A2 cost where that is higher, as for the MLP, whose 8-bit first and last layers
    hold most of its bit-operations).
    """

    method: str
    w_bits: float
    a_bits: float
    recipe: str
    finetune_steps: int = 0
    mixed_budget: float | None = None


METHODS = [
    DemoMethod("PTQ min-max", 8, 8, "ptq-w8a8"),
    DemoMethod("PTQ min-max", 4, 4, "ptq-w4a4-minmax"),
    DemoMethod("PTQ ACIQ + bit allocation + bias correction", 4, 4, "ptq-w4a4-aciq"),
    DemoMethod("QAT LSQ (short)", 4, 4, "lsq-w4a4", finetune_steps=150),
    DemoMethod("Mixed EAGL 2/4-bit + LSQ (short)", 4, 4, "lsq-w4a4", finetune_steps=150, mixed_budget=0.5),
]


def build(m: DemoMethod, model: torch.nn.Module, calib, train, *, quick: bool = False
          ) -> tuple[torch.nn.Module, float, float]:
    """The quantized model of one demo row, and its (average) weight and activation bits;
    ``quick`` fine-tunes for a tenth of the row's steps."""
    base = load_recipe(m.recipe)
    recipe, w_bits, a_bits = base, m.w_bits, m.a_bits
    if m.mixed_budget is not None:
        space = build_space(model, base, example_input=next(iter(calib))[0][:1])
        lo, hi = space.bounds()
        budget = max(m.mixed_budget, lo / hi)  # a model whose fixed first/last layers dominate: all low
        selection = select(space, budget, "eagl", model=model)
        recipe = selection.recipe()
        totals = selection.totals()
        w_bits, a_bits = round(totals["mean_w_bits"], 2), round(totals["mean_a_bits_by_macs"], 2)
    qmodel = quantize(model, recipe, calib_data=calib)
    if m.finetune_steps:
        steps = max(1, m.finetune_steps // 10) if quick else m.finetune_steps
        config = dict(base.sections.get("qat", {}), max_steps=steps, progress=False, log_every=0)
        finetune(qmodel, train, config=config, log=lambda s: None)
        qmodel.eval()
    return qmodel, w_bits, a_bits


def run_demo(out: str | Path = "lowbit-demo", *, model_name: str = "resnet20", dataset: str = "fashion-mnist",
             quick: bool = False, calib_images: int = 512, log=print) -> dict:
    """Run every demo method; write results.json, results.md and the plot into ``out``; return the results."""
    torch.manual_seed(0)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    test_limit = 2000 if quick else None
    test = make_loader(dataset, "test", 500, limit=test_limit)
    calib = make_loader(dataset, "calib", 128, limit=calib_images)
    model = pretrained(model_name, dataset)

    fp = evaluate(model, progress(test, f"{model_name} fp32"))["top1"]
    fp_size = 4 * sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())
    rows = [{"method": "full precision", "w_bits": 32, "a_bits": 32, "accuracy": round(fp, 2),
             "size_bytes": fp_size, "seconds": 0.0}]
    train = make_loader(dataset, "train", 128, shuffle=True, augment=trained_with_augment(model_name, dataset), seed=0)
    for m in METHODS:
        start = time.perf_counter()
        qmodel, w_bits, a_bits = build(m, model, calib, train, quick=quick)
        seconds = time.perf_counter() - start
        acc = evaluate(qmodel, progress(test, f"{m.method} W{w_bits:g}A{a_bits:g}"))["top1"]
        rows.append({"method": m.method, "w_bits": w_bits, "a_bits": a_bits, "accuracy": round(acc, 2),
                     "size_bytes": stored_size_bytes(qmodel), "seconds": round(seconds, 2)})
    results = {"model": model_name, "dataset": dataset, "fp_accuracy": round(fp, 2), "rows": rows}
    if quick:
        results["test_images"] = test_limit
    table = results_table(results)
    log(table)
    write_json_atomic(out / "results.json", results, indent=2)
    write_text_atomic(out / "results.md", f"# lowbit demo: {model_name} on {dataset}\n\n{table}\n")
    plot = write_plot(results, out / "accuracy_vs_size.png")
    log(f"wrote {out / 'results.json'}, {out / 'results.md'}" + (f", {plot}" if plot else ""))
    return results


def results_table(results: dict) -> str:
    """Markdown table: method, W/A bits, stored size, accuracy, delta vs FP, seconds."""
    fp = results["fp_accuracy"]
    lines = ["| method | W/A bits | size (KiB) | accuracy (%) | delta vs FP | seconds |",
             "|---|---|---:|---:|---:|---:|"]
    for r in results["rows"]:
        bits = "fp32" if r["w_bits"] == 32 else f"W{r['w_bits']:g}A{r['a_bits']:g}"
        lines.append(f"| {r['method']} | {bits} | {r['size_bytes'] / 1024:.1f} | {r['accuracy']:.2f} | "
                     f"{r['accuracy'] - fp:+.2f} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def write_plot(results: dict, path: Path) -> Path | None:
    """Accuracy against stored size (log scale), one labelled point per row; None without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for r in results["rows"]:
        x = r["size_bytes"] / 1024
        ax.scatter(x, r["accuracy"], s=30)
        label = "fp32" if r["w_bits"] == 32 else f"{r['method']} W{r['w_bits']:g}A{r['a_bits']:g}"
        ax.annotate(label, (x, r["accuracy"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axhline(results["fp_accuracy"], color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("stored size (KiB, log scale)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"{results['model']} on {results['dataset']}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
