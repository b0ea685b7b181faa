"""How long EAGL takes to choose per-layer precision: the four reference models and a
ResNet-50-sized model (ImageNet shapes, random weights).

    python benchmarks/eagl_speed.py [--recipe lsq-w4a4] [--precisions 4,2 4,3,2]

For each model: trace the cost model once (reported apart), then time the selection itself
(entropy of every candidate layer's quantized weights at the recipe's own step, plus the exact
knapsack at the middle of the feasible bit-operation range), median of 5 runs on one thread, for each
set of candidate precisions.
Target (issue 6): under 1 s for the reference models. Writes the 'eagl-speed' section of
docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mixed_frontier import ResNet50, time_eagl  # noqa: E402
from results_page import write_section  # noqa: E402

from lowbit.mixed import build_space  # noqa: E402
from lowbit.zoo import list_models, pretrained  # noqa: E402

SEED = 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="lsq-w4a4")
    ap.add_argument("--precisions", nargs="+", default=["4,2", "4,3,2"], help="candidate sets, each comma-separated")
    args = ap.parse_args()
    sets = [p.split(",") for p in args.precisions]
    torch.manual_seed(SEED)
    models = {name: (pretrained(name), (1, 1, 28, 28)) for name in list_models()}
    models["ResNet-50-sized (random)"] = (ResNet50().eval(), (1, 3, 224, 224))
    rows = ["| model | parameters | candidate layers | cost-model trace (s) | "
            + " | ".join(f"EAGL selection, {'/'.join(f'W{b}' for b in p)} (s)" for p in sets) + " |",
            "|---|---:|---:|---:|" + "---:|" * len(sets)]
    for name, (model, shape) in models.items():
        start = time.perf_counter()
        space = build_space(model, args.recipe, example_input=torch.zeros(shape), precisions=sets[0])
        trace = time.perf_counter() - start
        seconds = [time_eagl(model, space if p == sets[0] else
                             build_space(model, args.recipe, example_input=torch.zeros(shape), precisions=p))
                   for p in sets]
        rows.append(f"| {name} | {sum(p.numel() for p in model.parameters()):,} | {len(space.candidates)} | "
                    f"{trace:.3f} | " + " | ".join(f"{t:.3f}" for t in seconds) + " |")
        print(rows[-1], flush=True)
    body = (f"EAGL (entropy of each candidate layer's weights quantized at the `{args.recipe}` recipe's own "
            "W4 step, LSQ init `mse`; each column's candidate precisions, first and last layers fixed at 8 bits) "
            "plus the exact knapsack at the middle of the feasible bit-operation range; median of 5 selections on one "
            "thread, after tracing the cost model once. No data is used. Target: under 1 s for the reference "
            "models.\n\n" + "\n".join(rows))
    write_section("eagl-speed", "Mixed precision: EAGL selection time", body, SEED)


if __name__ == "__main__":
    main()
