"""Cost of one fine-tuning step with fake quantization, against the FP step of the same model.

    python benchmarks/step_cost.py [--model resnet20] [--batch-size 128] [--steps 20] [--compile-quantizers]

Times forward + backward + SGD step (median over ``--steps`` after 3 warm-up steps) for the
float model and for each recipe's quantized model, interleaving the measurements so that
load from other processes hits all of them alike; prints and records the ratios. With
``--compile-quantizers`` each recipe is also timed with its fake-quant compiled (``qat.compile_quantizers``;
its compilation happens in the warm-up steps).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_page import write_section  # noqa: E402

import lowbit  # noqa: E402
from lowbit.quant.base import Quantizer  # noqa: E402
from lowbit.zoo import pretrained  # noqa: E402

SEED = 0
RECIPES = ["faq-w4a4", "lsq-w4a4", "lsq-w2a2", "pact-sawb-w2a2"]


def step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    model.train()

    def step() -> float:
        start = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - start
    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--compile-quantizers", action="store_true", help="also time each recipe with compiled fake-quant")
    args = ap.parse_args()
    torch.manual_seed(SEED)
    x = torch.randn(args.batch_size, 1, 28, 28)
    y = torch.randint(0, 10, (args.batch_size,))
    fp_model = pretrained(args.model)
    models = {"fp32": fp_model}
    for r in RECIPES:
        models[r] = lowbit.quantize(fp_model, r, calib_data=[x])
        if args.compile_quantizers:
            models[f"{r} (compiled)"] = compiled = lowbit.quantize(fp_model, r, calib_data=[x])
            for q in compiled.modules():
                if isinstance(q, Quantizer):
                    q.fused = True  # as finetune(compile_quantizers=True) sets it
    steps = {name: step_fn(m, x, y) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    warmup = 5 if args.compile_quantizers else 3
    for i in range(args.steps + warmup):
        for name, step in steps.items():
            t = step()
            if i >= warmup:
                times[name].append(t)
    fp = statistics.median(times["fp32"])
    rows = ["| model | step (ms, median) | ratio to FP step |", "|---|---:|---:|"]
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append(f"| {args.model} {name} | {med * 1000:.1f} | {med / fp:.2f}x |")
        print(rows[-1], flush=True)
    body = (f"One SGD step (forward, backward, update) at batch {args.batch_size} on 1x28x28 inputs, median of "
            f"{args.steps} steps after {warmup} warm-up steps; the FP and quantized steps are interleaved in one run, "
            "so the ratios compare like with like. Quantized models use each recipe's quantizers in training "
            "mode (SAWB recomputes its clip every step; LSQ/PACT steps receive gradients); '(compiled)': the same with "
            "qat.compile_quantizers, the fake-quant forward and backward compiled by torch.compile.\n\n" + "\n".join(rows))
    write_section("step-cost", "Fine-tuning step cost with fake quantization", body, SEED)


if __name__ == "__main__":
    main()
