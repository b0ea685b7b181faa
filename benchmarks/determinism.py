"""Same seed, same numbers? The CLI against the benchmark path, and one thread against two.

    python benchmarks/determinism.py [--steps 200] [--recipe pact-sawb-w2a2] [--full]

A user's `lowbit qat --model resnet20 --recipe pact-sawb-w2a2` with 2 threads gave a different test
accuracy from the QAT section's row of the same recipe and seed (1 thread). Two candidate causes:

1. *paths*: the CLI and ``benchmarks/qat.py`` differ somewhere (seeding, data order, settings). Both are
   run for ``--steps`` steps with the same thread count and their saved models compared tensor by
   tensor: identical means the paths are the same computation;
2. *threads*: float sums in a different order (torch splits reductions across threads) change the
   last bits of the first step's gradients, and training amplifies the difference. The benchmark path
   is run with 1 and with 2 threads; the largest weight difference is recorded after steps 1, 10, 100
   and the last, and (``--full``) both run the recipe's whole schedule to a test accuracy.

Writes the 'determinism' section of docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_page import write_section  # noqa: E402

from lowbit.checkpoint import load_state_dict  # noqa: E402
from lowbit.cli import main as cli_main  # noqa: E402
from lowbit.qat.pipeline import run_qat  # noqa: E402
from lowbit.zoo import pretrained  # noqa: E402

SEED = 0
MODEL = "resnet20"
PROBES = (1, 10, 100)


def benchmark_path(recipe: str, steps: int | None, folder: str, threads: int, probe=None) -> dict:
    """``benchmarks/qat.py``'s call, with ``threads`` torch threads; ``probe(step, model)`` after each step."""
    torch.set_num_threads(threads)
    torch.manual_seed(SEED)
    return run_qat(pretrained(MODEL), model_name=MODEL, dataset="fashion-mnist", recipe=recipe, checkpoint_dir=folder,
                   max_steps=steps, seed=SEED, progress=False, log=lambda s: None, on_step=probe)


def cli_path(recipe: str, steps: int, folder: str, threads: int) -> None:
    torch.set_num_threads(threads)
    assert cli_main(["qat", "--model", MODEL, "--recipe", recipe, "--max-steps", str(steps),
                     "--checkpoint-dir", folder]) == 0


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200, help="fine-tuning steps of the short comparisons")
    ap.add_argument("--recipe", default="pact-sawb-w2a2", help="QAT recipe (default: pact-sawb-w2a2)")
    ap.add_argument("--full", action="store_true", help="also run the whole schedule with 1 and 2 threads")
    args = ap.parse_args()
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        cli_path(args.recipe, args.steps, f"{tmp}/cli", threads=1)
        benchmark_path(args.recipe, args.steps, f"{tmp}/bench", threads=1)
        paths = max_difference(load_state_dict(f"{tmp}/cli/model.safetensors"),
                               load_state_dict(f"{tmp}/bench/model.safetensors"))
        lines.append(f"- *paths*: after {args.steps} steps with 1 thread, the CLI's and the benchmark's fine-tuned "
                     f"ResNet-20 differ by at most {paths:.3g} in any tensor "
                     + ("(bit-identical: the two paths are the same computation)." if paths == 0 else
                        "(the paths differ: see the code)."))
        snapshots: dict[int, dict] = {}
        last = {}
        for threads in (1, 2):
            probes = {}

            def probe(info, probes=probes):
                if info["step"] in PROBES or info["step"] == args.steps:
                    probes[info["step"]] = weights(info["model"])

            benchmark_path(args.recipe, args.steps, f"{tmp}/t{threads}", threads, probe)
            snapshots[threads] = probes
        rows = ["| after step | largest weight difference, 1 vs 2 threads |", "|---:|---:|"]
        gaps = {step: max_difference(snapshots[1][step], snapshots[2][step]) for step in sorted(snapshots[1])}
        rows += [f"| {step} | {gap:.3g} |" for step, gap in gaps.items()]
        lines.append(f"- *threads*: the benchmark path with 1 and with 2 threads, {args.recipe}, same seed:\n\n"
                     + "\n".join(rows))
        first = gaps[min(gaps)]
        verdict = ("the thread count, not the path, changes the numbers: float sums in another order differ in "
                   "the last bits from the first step, and training amplifies the difference"
                   if paths == 0 and first > 0 else "see the rows above")
        lines.append(f"\nVerdict: {verdict}.")
        if args.full:
            for threads in (1, 2):
                last[threads] = benchmark_path(args.recipe, None, f"{tmp}/full{threads}", threads)["test_top1"]
            lines.append(f"- whole schedule ({args.recipe}, test top-1): 1 thread {last[1]:.2f} %, 2 threads "
                         f"{last[2]:.2f} % ({last[2] - last[1]:+.2f}).")
    body = "Why the same command and seed can give different numbers on another thread count.\n\n" + "\n".join(lines)
    write_section("determinism", "Determinism: paths and thread counts", body, SEED)


if __name__ == "__main__":
    main()
