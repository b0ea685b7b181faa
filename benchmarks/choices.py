"""The options lowbit's shipped recipes chose, each measured against its alternative on the validation split.

    python benchmarks/choices.py [--only lsq-init,pact-sawb-schedule,mlp-augment,aciq-scale]
    python benchmarks/choices.py --only ''      # rebuild the section from docs/results/choices.json

A choice is made on the *validation* split: the 5,000 held-out training images (Fashion-MNIST's
``calib`` split, never trained on; the first 512 of them also calibrate the quantizers), never on
the test set. The test split is reported beside it for information only. Each comparison:

- ``lsq-init``: LSQ step initialisation ``init: mse`` (the shipped lsq recipes) against the paper's
  ``init: paper`` (``2 mean|v| / sqrt(Q_P)``), ResNet-20 at W4A4 and W2A2, 150 fine-tuning steps;
- ``pact-sawb-schedule``: ``pact-sawb-w2a2`` with cosine decay (shipped) against the paper's step
  decay (``schedule: step, milestones: [1, 2]``), ResNet-20, the recipe's 3 epochs;
- ``mlp-augment``: fine-tuning the MLP (trained without augmentation) with and without crop/flip
  augmentation, ``faq-w8a8``, one epoch (``lowbit qat`` follows the checkpoint's own training);
- ``aciq-scale``: ACIQ's Laplace scale of a rectified tensor, ``one_sided_scale: positive`` (shipped)
  against the reference code's ``mean|x - mean(x)|``, on 10^6 samples of ``max(0, Laplace(0, b))``.

Rows are kept in ``docs/results/choices.json`` as they finish; the 'choices' section of
docs/RESULTS.md is rebuilt from every stored row.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_page import COMMIT, ROOT, write_section  # noqa: E402

from lowbit.qat.pipeline import run_qat  # noqa: E402
from lowbit.quant.grid import Granularity  # noqa: E402
from lowbit.quant.running import RunningStats  # noqa: E402
from lowbit.recipe import load_recipe  # noqa: E402
from lowbit.zoo import pretrained  # noqa: E402

SEED = 0
STORE = ROOT / "docs" / "results" / "choices.json"
CHOICES = ("lsq-init", "pact-sawb-schedule", "mlp-augment", "aciq-scale")


def variant(recipe: str, **changes) -> dict:
    """A shipped recipe as a dict with ``changes`` applied: ``init`` (both sides) or ``qat`` keys."""
    spec = load_recipe(recipe).to_dict()
    if "init" in changes:
        for side in ("weights", "activations"):
            spec[side]["init"] = changes["init"]
    spec["qat"].update(changes.get("qat", {}))
    return spec


def qat_row(choice: str, option: str, model_name: str, recipe, **kw) -> dict:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(SEED)
        result = run_qat(pretrained(model_name), model_name=model_name, dataset="fashion-mnist", recipe=recipe,
                         checkpoint_dir=tmp, seed=SEED, progress=False, log=lambda s: None, **kw)
    return {"choice": choice, "option": option, "model": model_name, "steps": result["steps"],
            "val_top1": round(result["metrics"]["val_top1"], 2), "test_top1": round(result["test_top1"], 2),
            "minutes": round((time.perf_counter() - start) / 60, 1), "threads": torch.get_num_threads(),
            "commit": COMMIT}


def run_choice(choice: str):
    """Yield ``(key, row)`` for each option of ``choice``."""
    if choice == "lsq-init":
        for bits in (4, 2):
            for init in ("mse", "paper"):
                recipe = f"lsq-w{bits}a{bits}"
                yield f"{choice}/{bits}/{init}", qat_row(choice, f"{recipe}, init: {init}", "resnet20",
                                                         variant(recipe, init=init), max_steps=150)
    elif choice == "pact-sawb-schedule":
        for option, qat in (("cosine", {}), ("step [1, 2]", {"schedule": "step", "milestones": [1, 2]})):
            yield f"{choice}/{option}", qat_row(choice, f"pact-sawb-w2a2, {option}", "resnet20",
                                                variant("pact-sawb-w2a2", qat=qat))
    elif choice == "mlp-augment":
        for augment in (False, True):
            yield f"{choice}/{augment}", qat_row(choice, f"faq-w8a8, augmentation {'on' if augment else 'off'}",
                                                 "mlp", "faq-w8a8", augment=augment)
    elif choice == "aciq-scale":
        b = 1.0
        torch.manual_seed(SEED)
        x = torch.distributions.Laplace(0.0, b).sample((1_000_000,)).clamp_min(0)
        stats = RunningStats(Granularity())
        stats.update(x)
        for option, stat in (("positive", "pos_mean"), ("reference", "mad")):
            yield f"{choice}/{option}", {"choice": choice, "option": f"one_sided_scale: {option}",
                                         "estimate_over_b": round(float(stats.batch_mean(stat)) / b, 3),
                                         "commit": COMMIT}
    else:
        raise SystemExit(f"unknown choice {choice!r}; choose from {CHOICES}")


def qat_table(rows: list[dict]) -> str:
    lines = ["| choice | option | model | steps | validation top-1 (%) | test top-1 (%) | minutes | threads | commit |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['choice']} | {r['option']} | {r['model']} | {r['steps']} | {r['val_top1']:.2f} | "
                     f"{r['test_top1']:.2f} | {r['minutes']:.1f} | {r['threads']} | {r['commit']} |")
    return "\n".join(lines)


def verdicts(rows: dict[str, dict]) -> list[str]:
    """For each QAT comparison, the option the validation split prefers."""
    out = []
    groups: dict[tuple, list[dict]] = {}
    for key, r in rows.items():
        if "val_top1" in r:
            groups.setdefault((r["choice"], key.rsplit("/", 1)[0]), []).append(r)
    for (choice, _), rs in sorted(groups.items()):
        best = max(rs, key=lambda r: r["val_top1"])
        others = ", ".join(f"{r['option']} {r['val_top1']:.2f}" for r in rs if r is not best)
        if any(r is not best and r["val_top1"] == best["val_top1"] for r in rs):
            out.append(f"- {choice}: validation does not separate the options ({best['option']} {best['val_top1']:.2f}, "
                       f"{others}): the shipped default stays.")
        else:
            out.append(f"- {choice}: validation prefers **{best['option']}** ({best['val_top1']:.2f} vs {others}).")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=",".join(CHOICES),
                    help=f"comma-separated choices to run ({', '.join(CHOICES)}); '' only rebuilds the section")
    args = ap.parse_args()
    torch.manual_seed(SEED)
    rows = json.loads(STORE.read_text()) if STORE.is_file() else {}
    for choice in [c for c in args.only.split(",") if c]:
        for key, row in run_choice(choice):
            rows[key] = row
            STORE.parent.mkdir(parents=True, exist_ok=True)
            STORE.write_text(json.dumps(rows, indent=1, sort_keys=True) + "\n")
            print(key, row, flush=True)
    qat_rows = [r for r in rows.values() if "val_top1" in r]
    aciq = [r for r in rows.values() if r["choice"] == "aciq-scale"]
    body = ("Each shipped default against its alternative. **The validation split decides** (Fashion-MNIST's 5,000 "
            "held-out training images, never trained on; the first 512 also calibrate); the test split (10,000 "
            "images) is shown for information only. Fine-tuning from the shipped FP checkpoints, no distillation, "
            "seed 0, one run per option: differences of a few tenths are within run-to-run noise.\n\n"
            + (qat_table(qat_rows) + "\n\n" + "\n".join(verdicts(rows)) if qat_rows else "")
            + ("\n\nACIQ's Laplace scale `b` of a rectified tensor `max(0, x)`, `x ~ Laplace(0, b)` (10^6 samples): "
               "the estimate divided by the true `b`.\n\n| option | estimate / b | commit |\n|---|---:|---|\n"
               + "\n".join(f"| {r['option']} | {r['estimate_over_b']:.3f} | {r['commit']} |" for r in aciq)
               if aciq else ""))
    write_section("choices", "Defaults chosen on the validation split", body, SEED)


if __name__ == "__main__":
    main()
