"""Cost of one fine-tuning step with fake quantization, against the FP step of the same model.

    python benchmarks/step_cost.py [--model resnet20] [--batch-size 128] [--steps 10] [--threads 1,2]
                                   [--compile-quantizers]

Times forward + backward + SGD step (median over ``--steps`` after the warm-up steps) for the float model and for
each QAT recipe's quantized model, interleaving the measurements so that load from other processes hits all of
them alike, at each thread count of ``--threads``. Two clocks: wall time, and the process's CPU time
(``time.process_time``), which at one thread is the step's own work whatever else the machine runs. With
``--compile-quantizers`` each recipe is also timed with its fake-quant compiled (``qat.compile_quantizers``; its
compilation happens in the warm-up steps).

Peak memory of a step: the tensors the model holds when the step starts (parameters, buffers, gradients, optimizer
state) plus the highest running sum of the bytes the step allocates and frees on top of them (activations kept for the
backward, temporaries), from the allocator's events in ``torch.profiler`` (``profile_memory``; in time order); the
same for every model.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_page import write_section  # noqa: E402

import lowbit  # noqa: E402
from lowbit.quant.base import Quantizer  # noqa: E402
from lowbit.zoo import pretrained  # noqa: E402

SEED = 0
RECIPES = ["faq-w8a8", "faq-w4a4", "lsq-w4a4", "lsq-w3a3", "lsq-w2a2", "pact-sawb-w2a2"]


class Step:
    """One SGD step (momentum 0.9) of ``model`` on a fixed batch, timed on both clocks."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        self.model, self.x, self.y = model.train(), x, y
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def __call__(self) -> None:
        loss = nn.functional.cross_entropy(self.model(self.x), self.y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def timed(self) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        self()
        return time.perf_counter() - wall, time.process_time() - cpu

    def resting_bytes(self) -> int:
        """Bytes of the parameters, buffers, gradients and optimizer state held between steps."""
        tensors = [*self.model.parameters(), *self.model.buffers(),
                   *(p.grad for p in self.model.parameters() if p.grad is not None),
                   *(t for s in self.opt.state.values() for t in s.values() if isinstance(t, torch.Tensor))]
        return sum(t.numel() * t.element_size() for t in tensors)

    def peak_bytes(self) -> int:
        """:meth:`resting_bytes` plus the most bytes one step allocates on top of them (allocator events)."""
        resting = self.resting_bytes()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            self()
        with tempfile.TemporaryDirectory() as tmp:
            trace = Path(tmp) / "trace.json"
            prof.export_chrome_trace(str(trace))
            events = json.loads(trace.read_text())["traceEvents"]
        memory = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
        allocated = itertools.accumulate(e["args"]["Bytes"] for e in memory)
        return resting + max([0, *allocated])


def quantized(fp_model: nn.Module, recipe: str, x: torch.Tensor, compiled: bool) -> nn.Module:
    model = lowbit.quantize(fp_model, recipe, calib_data=[x])
    for q in model.modules():
        if isinstance(q, Quantizer):
            q.fused = compiled  # as finetune(compile_quantizers=True) sets it
    return model


def measure(steps: dict[str, Step], n_steps: int, warmup: int) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) seconds per model, the models' steps interleaved."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in steps}
    for i in range(n_steps + warmup):
        for name, step in steps.items():
            t = step.timed()
            if i >= warmup:
                times[name].append(t)
    return {name: (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts))
            for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", default="1,2", help="comma-separated torch thread counts, each measured in turn")
    ap.add_argument("--compile-quantizers", action="store_true", help="also time each recipe with compiled fake-quant")
    args = ap.parse_args()
    torch.manual_seed(SEED)
    x = torch.randn(args.batch_size, 1, 28, 28)
    y = torch.randint(0, 10, (args.batch_size,))
    fp_model = pretrained(args.model)
    steps = {"fp32": Step(fp_model, x, y)}
    for r in RECIPES:
        steps[r] = Step(quantized(fp_model, r, x, compiled=False), x, y)
        if args.compile_quantizers:
            steps[f"{r} (compiled)"] = Step(quantized(fp_model, r, x, compiled=True), x, y)
    warmup = 5 if args.compile_quantizers else 3
    rows = ["| threads | model | wall (ms, median) | wall ratio | CPU (ms, median) | CPU ratio | peak memory (MB) | "
            "memory ratio |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    peak = {name: step.peak_bytes() for name, step in steps.items()}  # after one step: gradients and momentum exist
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        medians = measure(steps, args.steps, warmup)
        fp_wall, fp_cpu = medians["fp32"]
        for name, (wall, cpu) in medians.items():
            rows.append(f"| {threads} | {args.model} {name} | {wall * 1e3:.1f} | {wall / fp_wall:.2f}x | "
                        f"{cpu * 1e3:.1f} | {cpu / fp_cpu:.2f}x | {peak[name] / 2**20:.1f} | "
                        f"{peak[name] / peak['fp32']:.2f}x |")
            print(rows[-1], flush=True)
    body = (f"One SGD step (forward, backward, update; momentum 0.9) at batch {args.batch_size} on 1x28x28 inputs, "
            f"median of {args.steps} steps after {warmup} warm-up steps, at each thread count; the FP and quantized "
            "steps are interleaved in one run, so the ratios compare like with like. Wall: elapsed time; CPU: the "
            "process's CPU time (at one thread, the step's own work even when other jobs share the machine; at two, "
            "both threads' time). Quantized models use each recipe's quantizers in training mode (SAWB recomputes "
            "its clip every step; LSQ/PACT steps receive gradients); '(compiled)': the same with "
            "qat.compile_quantizers, the fake-quant forward and backward compiled by torch.compile. Peak memory: "
            "the parameters, buffers, gradients and momentum held between steps plus the most bytes one step "
            "allocates on top of them (torch.profiler's allocator events).\n\n" + "\n".join(rows))
    write_section("step-cost", "Fine-tuning step cost with fake quantization", body, SEED)


if __name__ == "__main__":
    main()
