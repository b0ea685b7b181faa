"""Full-precision baselines of the reference models: re-evaluates each shipped checkpoint.

    python benchmarks/baselines.py

Writes the 'baselines' section of docs/RESULTS.md: test accuracy measured now (not copied
from the sidecar), parameters, and the command that trained each checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_page import write_section  # noqa: E402

from lowbit.data.datasets import make_loader  # noqa: E402
from lowbit.evaluate import evaluate  # noqa: E402
from lowbit.zoo import checkpoint_meta, list_models, pretrained  # noqa: E402

SEED = 0


def main() -> None:
    torch.manual_seed(SEED)
    test = make_loader("fashion-mnist", "test", 500)
    rows = ["| model | parameters | test top-1 (%) | test top-5 (%) | epochs | training time | trained with |",
            "|---|---:|---:|---:|---:|---:|---|"]
    for name in list_models():
        model = pretrained(name)
        m = evaluate(model, test)
        meta = checkpoint_meta(name)
        params = sum(p.numel() for p in model.parameters())
        rows.append(f"| {name} | {params:,} | {m['top1']:.2f} | {m['top5']:.2f} | {meta['config']['epochs']} | "
                    f"{meta['train_seconds'] / 60:.0f} min | `{meta['command']}` |")
        print(rows[-1], flush=True)
    body = ("Fashion-MNIST test set (10,000 images). Checkpoints ship in `lowbit/zoo/checkpoints/`; they were "
            "trained on the 55,000-image train split (5,000 training images are held out as the calibration "
            "split), seed 0, SGD + Nesterov, cosine schedule with one warm-up epoch, random 2-pixel "
            "translation and horizontal flip (none for the MLP). Training time is from each checkpoint's "
            "sidecar, on the machine named there.\n\n" + "\n".join(rows))
    write_section("baselines", "Full-precision baselines", body, SEED)


if __name__ == "__main__":
    main()
