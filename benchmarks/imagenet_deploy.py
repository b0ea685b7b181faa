"""The deployment path on ImageNet models with published weights (MobileNetV2, EfficientNet-Lite0): export, the
integer engine and ONNX against the fake-quant model, and onnxruntime int8 speed against fp32.

    python benchmarks/imagenet_deploy.py [--models mobilenetv2,efficientnet-lite0] [--recipes ptq-w8a8,ptq-w4a4-aciq]
                                         [--data photos,fmnist] [--engine-images 10000] [--no-speed]
                                         [--rounds 5] [--threads 1] [--remeasure-speed]

Data: *photos*, the ImageNet classifier on the offline photos' views as in benchmarks/imagenet_agreement.py (the
calibration photos' views calibrate; the others' are compared, unlabelled); *fmnist*, the network transferred to
Fashion-MNIST by benchmarks/transfer.py (read from its cache in runs/transfer/, or trained) on the 10,000 test
images, labelled. Per model, data and recipe: top-1 agreement with the fake-quant model of the integer engine read
from the export folder (depthwise convolutions, ReLU6 as a clamp on codes, TensorFlow padding, inverted-residual
additions in int64) and of the faithful ONNX QDQ model in onnxruntime; the agreement of the engine with the same
fake-quant model evaluated in float64, and of the float32 fake-quant model with its float64 self (its own rounding
noise: rounding-boundary differences of one code grow through these 50-layer networks); the export's size.
Speed (``ptq-w8a8`` only): onnxruntime on the int8 graph (``quantize_residual=True``, so onnxruntime fuses
QLinearConv) against the fp32 model through the same writer, batch 1 and 32, ``--threads`` intra-op threads,
variants interleaved, median of ``--rounds``. The machine is shared with other jobs: the ratios mean more than the
milliseconds.

Rows go to docs/results/imagenet_deploy.json as they finish; the section "imagenet-deploy" of docs/RESULTS.md is
rewritten from all rows.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_speed import session, time_variants  # noqa: E402
from imagenet_agreement import CALIB_PHOTOS, recipe_for  # noqa: E402
from results_page import ROOT, load_rows, store_row, write_section  # noqa: E402
from transfer import FP_LR, FP_STEPS, SIZE, loaders, transferred  # noqa: E402

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
def fidelity(model: torch.nn.Module, recipe: str, calib: list, batches: list, engine_images: int) -> dict:
    """Top-1 agreement of the integer engine and the ONNX QDQ model with the fake-quant model (float32, and the
    same model evaluated in float64: the fake-quant model's own rounding noise) on ``batches`` of ``(x, y)``
    (``y`` None for unlabelled photo views); labelled batches also give each one's accuracy."""
    qmodel = lowbit.quantize(model, recipe_for(recipe, model), calib_data=calib).eval()
    q64 = copy.deepcopy(qmodel).double()
    folder = Path(tempfile.mkdtemp(prefix="lowbit-imagenet-"))
    lowbit.export(qmodel, folder, input_shape=[1, *batches[0][0].shape[1:]])
    engine = IntegerEngine.from_path(folder)
    sess = session(to_onnx(folder), 1)
    x_all = torch.cat([x for x, _ in batches])
    labels = None if batches[0][1] is None else torch.cat([y for _, y in batches])
    fq = torch.cat([qmodel(x) for x, _ in batches]).argmax(1)
    fq64 = torch.cat([q64(x.double()) for x, _ in batches]).argmax(1)
    onnx_logits = np.concatenate([sess.run(None, {"input": x.numpy()})[0] for x, _ in batches])
    onnx_top1 = torch.from_numpy(onnx_logits).argmax(1)
    n = min(engine_images, len(x_all))
    start = time.perf_counter()
    engine_top1 = torch.cat([engine.predict(x) for x in x_all[:n].split(50)])
    engine_seconds = (time.perf_counter() - start) / n
    row = {"images": len(x_all), "engine_images": n,
           "engine_same": int((engine_top1 == fq[:n]).sum()), "engine_same_f64": int((engine_top1 == fq64[:n]).sum()),
           "f32_same_f64": int((fq[:n] == fq64[:n]).sum()),
           "engine_saturated": engine.stats["saturated"], "engine_seconds_per_image": engine_seconds,
           "onnx_same": int((onnx_top1 == fq).sum()), "export_bytes": folder_bytes(folder),
           "fp32_bytes": 4 * sum(p.numel() for p in model.parameters())}
    if labels is not None:
        row.update(fake_quant_top1=100 * (fq == labels).float().mean().item(),
                   engine_top1=100 * (engine_top1 == labels[:n]).float().mean().item(),
                   onnx_top1=100 * (onnx_top1 == labels).float().mean().item())
    for p in folder.iterdir():
        p.unlink()
    folder.rmdir()
    return row


def speed(model_name: str, calib, views, rounds: int, threads: int) -> dict:
    """onnxruntime time per batch of the int8 speed graph and of the fp32 graph, the graph's fused convs, and its
    top-1 agreement with the fake-quant model on ``views`` (the held-out photo views)."""
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
    with torch.no_grad():
        expected = qmodel(views).argmax(1).numpy()
    same = int((sessions["int8"].run(None, {"input": views.numpy()})[0].argmax(1) == expected).sum())
    out = {"key": f"{model_name}/speed", "model": model_name, "threads": threads,
           "qlinearconv": fused["QLinearConv"], "convs": sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()),
           "int8_same": same, "int8_images": len(expected)}
    for batch in (1, 32):
        x = torch.randn(batch, *SHAPE[1:]).numpy()
        runners = {k: (lambda s=s: s.run(None, {"input": x})) for k, s in sessions.items()}
        t = time_variants(runners, batch, rounds)
        out[f"batch{batch}"] = {k: v * 1e3 for k, v in t.items()}
        print(model_name, batch, {k: f"{v * 1e3:.1f} ms" for k, v in t.items()}, flush=True)
    return out


def write(rows: list[dict], meta: dict) -> None:
    pct = lambda k, n: f"{100 * k / n:.2f} %"
    lines = ["Top-1 agreement of the deployment artefacts with the fake-quant model. *photos*: the offline photos' "
             f"held-out views ({meta['eval_photos']} photos x 20 views, 224x224; calibration on "
             f"{', '.join(meta['calib_names'])}), the ImageNet classifier. *fmnist*: the 10,000 Fashion-MNIST test "
             f"images at {SIZE}x{SIZE}, the model transferred by `benchmarks/transfer.py` (calibration on its 512 "
             "images), with labelled top-1. *f64*: the same fake-quant model evaluated in float64; *f32 = f64* is the "
             "fake-quant model's own float32 rounding noise, the floor under any agreement with it.", "",
             "| model | data | recipe | engine = fake-quant | engine = f64 | f32 = f64 | ONNX QDQ = fake-quant | "
             "top-1 fake-quant / engine / ONNX | engine s / image | export size | fp32 parameters |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted((r for r in rows if "recipe" in r), key=lambda r: r["key"]):
        n = r["engine_images"]
        top1 = (f"{r['fake_quant_top1']:.2f} / {r['engine_top1']:.2f} / {r['onnx_top1']:.2f}"
                if "engine_top1" in r else "(unlabelled)")
        lines.append(f"| {r['model']} | {r['data']} | `{r['recipe']}` | {pct(r['engine_same'], n)} | "
                     f"{pct(r['engine_same_f64'], n)} | {pct(r['f32_same_f64'], n)} | "
                     f"{pct(r['onnx_same'], r['images'])} | {top1} | {r['engine_seconds_per_image']:.3f} | "
                     f"{r['export_bytes'] / 1e6:.2f} MB | {r['fp32_bytes'] / 1e6:.2f} MB |")
    lines += ["", "Images compared: photos " + ", ".join(sorted({f"{r['images']}" for r in rows
                                                              if r.get("data") == "photos"})) +
              "; fmnist " + ", ".join(sorted({f"{r['engine_images']}" for r in rows if r.get("data") == "fmnist"})) +
              ". Saturated engine values: " + str(sum(r["engine_saturated"] for r in rows if "recipe" in r)) + ". "
              "The agreement rows come from `--no-speed` runs, the speed rows from `--recipes ''` runs; "
              "`--models ''` only rewrites this section."]
    speeds = [r for r in rows if r["key"].endswith("/speed")]
    if speeds:
        lines += ["", "onnxruntime, `ptq-w8a8` exported with 8-bit residual grids (`quantize_residual=True`) against the "
                  "float model through the same writer, 224x224 inputs; *int8 = fake-quant*: top-1 agreement of that "
                  "graph with the fake-quant model on the photos' held-out views (the extra 8-bit roundings of the "
                  "speed export: residual sums, and the last convolution's output on a [0, 6] grid in place of its "
                  "ReLU6):", "",
                  "| model | threads | QLinearConv / convs | int8 = fake-quant | batch 1 fp32 | batch 1 int8 | int8 "
                  "speed-up | batch 32 fp32 | batch 32 int8 | int8 speed-up |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(speeds, key=lambda r: r["model"]):
            b1, b32 = r["batch1"], r["batch32"]
            same = pct(r["int8_same"], r["int8_images"]) if "int8_same" in r else "not measured"
            lines.append(f"| {r['model']} | {r['threads']} | {r['qlinearconv']} / {r['convs']} | {same} | "
                         f"{b1['fp32']:.1f} ms | "
                         f"{b1['int8']:.1f} ms | {b1['fp32'] / b1['int8']:.2f}x | {b32['fp32']:.0f} ms | "
                         f"{b32['int8']:.0f} ms | {b32['fp32'] / b32['int8']:.2f}x |")
    write_section("imagenet-deploy", "ImageNet models: integer engine, ONNX and onnxruntime speed", "\n".join(lines),
                  SEED)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mobilenetv2,efficientnet-lite0")
    ap.add_argument("--recipes", default="ptq-w8a8,ptq-w4a4-aciq")
    ap.add_argument("--data", default="photos,fmnist", help="photos (ImageNet classifier) and/or fmnist "
                    "(the transferred model, labelled)")
    ap.add_argument("--engine-images", type=int, default=10_000, help="images the integer engine runs per row")
    ap.add_argument("--no-speed", dest="speed", action="store_false")
    ap.add_argument("--remeasure-speed", action="store_true", help="replace the stored speed rows")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.manual_seed(SEED)
    torch.set_num_threads(args.threads)
    calib_names = CALIB_PHOTOS.split(",")
    eval_names = [p for p in PHOTOS if p not in calib_names]
    meta = {"calib_names": calib_names, "eval_photos": len(eval_names)}
    done = {r["key"] for r in load_rows(ROWS)}
    transfer_args = argparse.Namespace(size=SIZE, fp_steps=FP_STEPS, fp_lr=FP_LR, seed=SEED)
    for model_name in filter(None, args.models.split(",")):
        prep = PREPROCESSING[model_name]
        calib_views = photo_views([load_photo(p) for p in calib_names], prep)
        for data_name in filter(None, args.data.split(",")):
            if data_name == "photos":
                model, calib = pretrained(model_name), list(calib_views.split(10))
                batches = [(v, None) for v in photo_views([load_photo(p) for p in eval_names], prep).split(10)]
            else:
                data = loaders(model_name, SIZE, SEED)
                model, _ = transferred(model_name, data, transfer_args, print)
                calib, batches = [x for x, _ in data["calib"]], list(data["test"])
            for recipe in filter(None, args.recipes.split(",")):
                key = f"{model_name}/{data_name}/{recipe}"
                if key in done:
                    continue
                row = {"key": key, "model": model_name, "data": data_name, "recipe": recipe,
                       **fidelity(model, recipe, calib, batches, args.engine_images)}
                store_row(ROWS, row)
                print(row, flush=True)
                write(load_rows(ROWS), meta)
        if args.speed and (f"{model_name}/speed" not in done or args.remeasure_speed):
            views = photo_views([load_photo(p) for p in eval_names], prep)
            store_row(ROWS, speed(model_name, calib_views, views, args.rounds, args.threads))
    write(load_rows(ROWS), meta)

if __name__ == "__main__":
    main()
