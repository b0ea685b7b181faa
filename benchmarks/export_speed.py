"""Inference speed of lowbit's ONNX export: int8 QDQ in onnxruntime against fp32 ONNX in onnxruntime and
torch eager fp32, for ResNet-20 and a ResNet-18-sized CNN, at batch 1 and 32, all measured in the same run.

    python benchmarks/export_speed.py [--rounds 7] [--threads N]

Models (input 1x28x28, Fashion-MNIST-shaped):

- ResNet-20: the zoo model (its shipped checkpoint when present; speed does not depend on the weights);
- ResNet-18-sized: the CIFAR-style ResNet-18 (3x3 stem, 4 stages of 2 basic blocks, 64-128-256-512
  channels, 1x1 projection shortcuts, 11.2 M parameters) on 1x28x28 inputs, random weights.

Each is quantized with ``ptq-w8a8`` (per-channel int8 weights, per-tensor uint8/int8 activations,
512 calibration images) and exported with ``lowbit.deploy.to_onnx`` twice: the default, faithful
QDQ graph (residual sums stay float, as in the fake-quant model, so onnxruntime cannot fuse the
convs that feed them) and ``quantize_residual=True`` (8-bit grids on the conv outputs that feed
residual additions, calibrated on the same images), which lets onnxruntime run every conv as
``QLinearConv``. "int8" in the ratios is the latter. fp32 ONNX is the float model through the same
writer (batch norm folded). Every variant runs with the same number of threads (default 1); the
variants are timed round-robin and each figure is the median over rounds of the mean time per batch.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_page import write_section  # noqa: E402

import lowbit  # noqa: E402
from lowbit.data.datasets import make_loader  # noqa: E402
from lowbit.deploy.onnx import to_onnx  # noqa: E402
from lowbit.zoo import checkpoint_path, create_model, pretrained  # noqa: E402
from lowbit.zoo.models import BasicBlock, conv_bn  # noqa: E402

SEED = 0


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18 (He et al. 2016, the 4-stage [2, 2, 2, 2] variant used for 32x32 inputs)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, widths=(64, 128, 256, 512)):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(in_channels, widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages, cin = [], widths[0]
        for i, w in enumerate(widths):
            stages.append(nn.Sequential(BasicBlock(cin, w, 1 if i == 0 else 2), BasicBlock(w, w, 1)))
            cin = w
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def session(model, threads: int, optimized: Path | None = None):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    # idle onnxruntime workers must not spin: the variants are timed one after another on the same cores
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def fused_ops(model, threads: int, tmp: Path) -> Counter:
    import onnx
    path = tmp / "optimized.onnx"
    session(model, threads, path)
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def time_variants(runners: dict, batch: int, rounds: int, budget_s: float = 1.5) -> dict[str, float]:
    """Median over ``rounds`` of the mean seconds per call, variants interleaved round by round."""
    for run in runners.values():  # warm-up
        run()
        run()
    reps = {}
    for name, run in runners.items():
        t = time.perf_counter()
        run()
        reps[name] = max(1, min(50, int(budget_s / rounds / max(time.perf_counter() - t, 1e-4))))
    samples: dict[str, list[float]] = {n: [] for n in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            t = time.perf_counter()
            for _ in range(reps[name]):
                run()
            samples[name].append((time.perf_counter() - t) / reps[name])
    return {n: statistics.median(v) for n, v in samples.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads for every variant (default 1: with other jobs on the cores, torch's "
                    "OpenMP threads stall and multi-thread timings stop meaning anything)")
    ap.add_argument("--calib-images", type=int, default=512)
    ap.add_argument("--no-write", action="store_true", help="print only, do not update docs/RESULTS.md")
    args = ap.parse_args()
    torch.manual_seed(SEED)
    torch.set_num_threads(args.threads)
    calib = list(make_loader("fashion-mnist", "calib", 128, limit=args.calib_images))
    tmp = Path(tempfile.mkdtemp(prefix="lowbit-export-speed-"))
    models = {
        "ResNet-20": pretrained("resnet20") if checkpoint_path("resnet20").is_file() else create_model("resnet20"),
        "ResNet-18-sized": ResNet18(),
    }
    rows, notes = [], []
    for label, model in models.items():
        model.eval()
        params = sum(p.numel() for p in model.parameters())
        qmodel = lowbit.quantize(model, "ptq-w8a8", calib_data=calib).eval()
        fp32 = to_onnx(model, input_shape=[1, 1, 28, 28])
        qdq = to_onnx(qmodel, input_shape=[1, 1, 28, 28])
        int8 = to_onnx(qmodel, input_shape=[1, 1, 28, 28], quantize_residual=True, calib_data=calib)
        ops8, opsq = fused_ops(int8, args.threads, tmp), fused_ops(qdq, args.threads, tmp)
        convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
        notes.append(f"{label} ({params / 1e6:.2f} M parameters, {convs} convs): onnxruntime fused "
                     f"{ops8['QLinearConv']} convs into QLinearConv in the int8 graph, {opsq['QLinearConv']} in the "
                     "faithful QDQ graph")
        sessions = {"fp32": session(fp32, args.threads), "qdq": session(qdq, args.threads),
                    "int8": session(int8, args.threads)}
        for batch in (1, 32):
            x = torch.randn(batch, 1, 28, 28)
            xn = x.numpy().astype(np.float32)
            runners = {"torch": lambda: model(x)}
            runners.update({k: (lambda s=s: s.run(None, {"input": xn})) for k, s in sessions.items()})
            with torch.no_grad():
                t = time_variants(runners, batch, args.rounds)
            rows.append((label, batch, t))
            print(label, batch, {k: f"{v * 1e3:.2f} ms" for k, v in t.items()}, flush=True)
    for p in tmp.iterdir():
        p.unlink()
    tmp.rmdir()
    head = ("| model | batch | torch eager fp32 | ORT fp32 | ORT QDQ (faithful) | ORT int8 | int8 vs ORT fp32 "
            "| int8 vs torch fp32 |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for label, batch, t in rows:
        ms = {k: v * 1e3 for k, v in t.items()}
        lines.append(f"| {label} | {batch} | {ms['torch']:.2f} ms | {ms['fp32']:.2f} ms | {ms['qdq']:.2f} ms | "
                     f"{ms['int8']:.2f} ms | {t['fp32'] / t['int8']:.2f}x | {t['torch'] / t['int8']:.2f}x |")
    body = ("Time per batch (median over rounds; lower is better) of lowbit's ONNX export of `ptq-w8a8` models in "
            f"onnxruntime ({_ort_version()}, CPU, {args.threads} thread{'s' if args.threads > 1 else ''} per variant) "
            "against the float model, input 1x28x28. "
            "*ORT int8*: QDQ with residual additions quantized too (`to_onnx(..., quantize_residual=True)`, "
            "`lowbit export --format onnx --quantize-residual`), every conv fused; *ORT QDQ (faithful)*: the default "
            "export, numerically the fake-quant model (float residual sums, float biases added after each layer), "
            "which onnxruntime runs as dequantize + float conv: fidelity, not speed. Target: int8 at least 2.5x faster than fp32 onnxruntime at batch 32 on the "
            "ResNet-18-sized model.\n\n" + "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) +
            "\n- ResNet-18-sized: CIFAR-style ResNet-18 (4 stages x 2 basic blocks, 64-512 channels) on 1x28x28 "
            "inputs, random weights (speed does not depend on them).")
    load = os.getloadavg()[0]
    body += (f"\n- Load average when the run ended: {load:.1f} on {os.cpu_count()} cores; the variants were timed "
             "interleaved, round by round, so they share the same conditions.")
    print(body)
    if not args.no_write:
        write_section("export-speed", "Deployment speed: int8 ONNX in onnxruntime", body, SEED)


def _ort_version() -> str:
    import onnxruntime
    return f"onnxruntime {onnxruntime.__version__}"


if __name__ == "__main__":
    main()
