"""The deployment path on ImageNet models with published weights (MobileNetV2, EfficientNet-Lite0): export, the
integer engine and ONNX against the fake-quant model, and onnxruntime int8 speed against fp32.

    python benchmarks/imagenet_deploy.py [--models mobilenetv2,efficientnet-lite0] [--recipes ptq-w8a8,ptq-w4a4-aciq]
                                         [--engine-views 140] [--rounds 5] [--threads 1]

Images: the offline photos' views as in benchmarks/imagenet_agreement.py (the calibration photos' views
calibrate; the others' are compared). Per model and recipe: top-1 of the integer engine read from the export
folder (depthwise convolutions, ReLU6 as a clamp on codes, TensorFlow padding, inverted-residual additions in
int64) and of the faithful ONNX QDQ model in onnxruntime, each against the fake-quant model, on the same views;
the export's size. Speed (``ptq-w8a8`` only): onnxruntime on the int8 graph (``quantize_residual=True``, so
onnxruntime fuses QLinearConv) against the fp32 model through the same writer, batch 1 and 32, ``--threads``
intra-op threads, variants interleaved, median of ``--rounds``. The machine is shared with other jobs: the
ratios mean more than the milliseconds.

Rows go to docs/results/imagenet_deploy.json as they finish; the section "imagenet-deploy" of docs/RESULTS.md is
rewritten from all rows.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_speed import session, time_variants  # noqa: E402
from imagenet_agreement import CALIB_PHOTOS  # noqa: E402
from results_page import ROOT, load_rows, store_row, write_section  # noqa: E402

import lowbit  # noqa: E402
from lowbit.data.photos import PHOTOS, load_photo, photo_views  # noqa: E402
from lowbit.deploy import IntegerEngine  # noqa: E402
from lowbit.deploy.onnx import to_onnx  # noqa: E402
from lowbit.zoo import pretrained  # noqa: E402
from lowbit.zoo.imagenet import PREPROCESSING  # noqa: E402

SEED = 0
ROWS = ROOT / "docs" / "results" / "imagenet_deploy.json"
SHAPE = [1, 3, 224, 224]


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


@torch.no_grad()
def fidelity(model_name: str, recipe: str, calib, views, engine_views: int) -> dict:
    model = pretrained(model_name)
    qmodel = lowbit.quantize(model, recipe, calib_data=list(calib.split(10))).eval()
    folder = Path(tempfile.mkdtemp(prefix="lowbit-imagenet-"))
    lowbit.export(qmodel, folder, input_shape=SHAPE)
    reference = torch.cat([qmodel(v) for v in views.split(10)]).argmax(1)
    engine = IntegerEngine.from_path(folder)
    start = time.perf_counter()
    engine_top1 = torch.cat([engine.predict(v) for v in views[:engine_views].split(10)])
    engine_seconds = (time.perf_counter() - start) / engine_views
    onnx_model = to_onnx(folder)
    sess = session(onnx_model, 1)
    onnx_top1 = torch.from_numpy(np.concatenate([sess.run(None, {"input": v.numpy()})[0]
                                                 for v in views.split(10)])).argmax(1)
    row = {"key": f"{model_name}/{recipe}", "model": model_name, "recipe": recipe, "views": len(views),
           "engine_views": engine_views,
           "engine_same": int((engine_top1 == reference[:engine_views]).sum()),
           "engine_saturated": engine.stats["saturated"], "engine_seconds_per_image": engine_seconds,
           "onnx_same": int((onnx_top1 == reference).sum()), "export_bytes": folder_bytes(folder),
           "fp32_bytes": 4 * sum(p.numel() for p in model.parameters())}
    for p in folder.iterdir():
        p.unlink()
    folder.rmdir()
    return row


def speed(model_name: str, calib, rounds: int, threads: int) -> dict:
    import onnx  # deferred: the onnx extra

    model = pretrained(model_name)
    batches = list(calib.split(10))
    qmodel = lowbit.quantize(model, "ptq-w8a8", calib_data=batches).eval()
    fp32 = to_onnx(model, input_shape=SHAPE)
    int8 = to_onnx(qmodel, input_shape=SHAPE, quantize_residual=True, calib_data=batches)
    tmp = Path(tempfile.mkdtemp(prefix="lowbit-imagenet-speed-"))
    session(int8, threads, tmp / "optimized.onnx")
    fused = Counter(n.op_type for n in onnx.load(str(tmp / "optimized.onnx")).graph.node)
    (tmp / "optimized.onnx").unlink()
    tmp.rmdir()
    sessions = {"fp32": session(fp32, threads), "int8": session(int8, threads)}
    out = {"key": f"{model_name}/speed", "model": model_name, "threads": threads,
           "qlinearconv": fused["QLinearConv"], "convs": sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())}
    for batch in (1, 32):
        x = torch.randn(batch, *SHAPE[1:]).numpy()
        runners = {k: (lambda s=s: s.run(None, {"input": x})) for k, s in sessions.items()}
        t = time_variants(runners, batch, rounds)
        out[f"batch{batch}"] = {k: v * 1e3 for k, v in t.items()}
        print(model_name, batch, {k: f"{v * 1e3:.1f} ms" for k, v in t.items()}, flush=True)
    return out


def write(rows: list[dict], meta: dict) -> None:
    lines = ["Fidelity of the deployment artefacts against the fake-quant model on the offline photos' held-out views "
             f"({meta['eval_photos']} photos x 20 views; calibration on {', '.join(meta['calib_names'])}).", "",
             "| model | recipe | integer engine = fake-quant (top-1) | engine saturations | engine s / image | "
             "ONNX QDQ = fake-quant (top-1) | export size | fp32 parameters |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted((r for r in rows if "recipe" in r), key=lambda r: r["key"]):
        lines.append(f"| {r['model']} | `{r['recipe']}` | {r['engine_same']} / {r['engine_views']} "
                     f"({100 * r['engine_same'] / r['engine_views']:.1f} %) | {r['engine_saturated']} | "
                     f"{r['engine_seconds_per_image']:.2f} | {r['onnx_same']} / {r['views']} "
                     f"({100 * r['onnx_same'] / r['views']:.1f} %) | {r['export_bytes'] / 1e6:.2f} MB | "
                     f"{r['fp32_bytes'] / 1e6:.2f} MB |")
    speeds = [r for r in rows if r["key"].endswith("/speed")]
    if speeds:
        lines += ["", "onnxruntime, `ptq-w8a8` exported with 8-bit residual grids (`quantize_residual=True`) against the "
                  "float model through the same writer, 224x224 inputs:", "",
                  "| model | threads | QLinearConv / convs | batch 1 fp32 | batch 1 int8 | int8 speed-up | batch 32 fp32 "
                  "| batch 32 int8 | int8 speed-up |", "|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(speeds, key=lambda r: r["model"]):
            b1, b32 = r["batch1"], r["batch32"]
            lines.append(f"| {r['model']} | {r['threads']} | {r['qlinearconv']} / {r['convs']} | {b1['fp32']:.1f} ms | "
                         f"{b1['int8']:.1f} ms | {b1['fp32'] / b1['int8']:.2f}x | {b32['fp32']:.0f} ms | "
                         f"{b32['int8']:.0f} ms | {b32['fp32'] / b32['int8']:.2f}x |")
    write_section("imagenet-deploy", "ImageNet models: integer engine, ONNX and onnxruntime speed", "\n".join(lines),
                  SEED)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mobilenetv2,efficientnet-lite0")
    ap.add_argument("--recipes", default="ptq-w8a8,ptq-w4a4-aciq")
    ap.add_argument("--engine-views", type=int, default=140)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.manual_seed(SEED)
    torch.set_num_threads(args.threads)
    calib_names = CALIB_PHOTOS.split(",")
    eval_names = [p for p in PHOTOS if p not in calib_names]
    meta = {"calib_names": calib_names, "eval_photos": len(eval_names)}
    done = {r["key"] for r in load_rows(ROWS)}
    for model_name in args.models.split(","):
        prep = PREPROCESSING[model_name]
        calib = photo_views([load_photo(p) for p in calib_names], prep)
        views = photo_views([load_photo(p) for p in eval_names], prep)
        for recipe in args.recipes.split(","):
            if f"{model_name}/{recipe}" in done:
                continue
            row = fidelity(model_name, recipe, calib, views, min(args.engine_views, len(views)))
            store_row(ROWS, row)
            print(row, flush=True)
            write(load_rows(ROWS), meta)
        if f"{model_name}/speed" not in done:
            store_row(ROWS, speed(model_name, calib, args.rounds, args.threads))
            write(load_rows(ROWS), meta)


if __name__ == "__main__":
    main()
