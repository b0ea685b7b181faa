"""The deployment artefacts against lowbit's own evaluation on the full Fashion-MNIST test set: the integer
reference engine and the ONNX QDQ model in onnxruntime, for the shipped ResNet-20 under the PTQ recipes;
plus the exported file sizes.

    python benchmarks/export_engine.py [--recipes ptq-w8a8,ptq-w4a4-minmax,ptq-w4a4-aciq,faq-pow2]
                                       [--int32-images 2000]

For each recipe: quantize (512 calibration images), export the folder, then over the 10,000 test images
compare top-1 predictions of the fake-quantized model with the integer engine read from the folder
(targets: the same prediction on >= 99.9 % of images, accuracy within 0.05 points) and with the ONNX QDQ
model in onnxruntime (target: accuracy within 0.1 point). ``faq-pow2`` is FAQ's power-of-two steps with
batch norm folded before quantization (no fine-tuning here), where every layer requantizes by a pure shift.
The engine with the int32 biases alone (``bias="int32"``, what a runtime adding only the int32 bias
computes) is measured on the first ``--int32-images`` images.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_page import write_section  # noqa: E402

import lowbit  # noqa: E402
from lowbit.data.datasets import make_loader  # noqa: E402
from lowbit.deploy import IntegerEngine, fp32_checkpoint_bytes  # noqa: E402
from lowbit.zoo import pretrained  # noqa: E402

SEED = 0
FAQ_POW2 = {"weights": {"method": "faq", "bits": 4}, "activations": {"method": "faq", "bits": 4},
            "layers": {"@first": {"weights": {"bits": 8}, "activations": {"bits": 8}},
                       "@last": {"weights": {"bits": 8}, "activations": {"bits": 8}}},
            "ptq": {"fold_bn": True}}
RECIPES = {"faq-pow2": FAQ_POW2}


def ort_session(path):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@torch.no_grad()
def measure(name: str, model, calib, test, int32_images: int, log) -> dict:
    from lowbit.deploy.onnx import to_onnx

    qmodel = lowbit.quantize(model, RECIPES.get(name, name), calib_data=calib).eval()
    folder = Path(tempfile.mkdtemp())
    lowbit.export(qmodel, folder, input_shape=[1, 1, 28, 28])
    to_onnx(folder, folder / "model.onnx")
    to_onnx(folder, folder / "int8.onnx", quantize_residual=True, calib_data=calib)
    engine = IntegerEngine.from_path(folder)
    engine32 = IntegerEngine.from_path(folder, bias="int32")
    onnx_faithful, onnx_int8 = ort_session(folder / "model.onnx"), ort_session(folder / "int8.onnx")
    c = dict.fromkeys(["fq", "eng", "eng_agree", "onnx", "onnx_agree", "int8", "int8_agree", "e32", "e32_agree",
                       "e32_fq", "n", "n32"], 0)
    sat = 0
    t0 = time.perf_counter()
    for x, y in test:
        ref = qmodel(x).argmax(1)
        e = engine.predict(x)
        sat += engine.stats["saturated"]
        o = torch.from_numpy(onnx_faithful.run(None, {"input": x.numpy()})[0]).argmax(1)
        i8 = torch.from_numpy(onnx_int8.run(None, {"input": x.numpy()})[0]).argmax(1)
        c["fq"] += int((ref == y).sum())
        c["eng"] += int((e == y).sum())
        c["eng_agree"] += int((e == ref).sum())
        c["onnx"] += int((o == y).sum())
        c["onnx_agree"] += int((o == ref).sum())
        c["int8"] += int((i8 == y).sum())
        c["int8_agree"] += int((i8 == ref).sum())
        if c["n"] < int32_images:
            e32 = engine32.predict(x)
            c["e32"] += int((e32 == y).sum())
            c["e32_fq"] += int((ref == y).sum())
            c["e32_agree"] += int((e32 == ref).sum())
            c["n32"] += len(y)
        c["n"] += len(y)
    counts = engine.summary_counts()
    size = (folder / "model.safetensors").stat().st_size
    res = {"recipe": name, "n": c["n"], "fq": 100 * c["fq"] / c["n"], "eng": 100 * c["eng"] / c["n"],
           "eng_agree": 100 * c["eng_agree"] / c["n"], "onnx": 100 * c["onnx"] / c["n"],
           "onnx_agree": 100 * c["onnx_agree"] / c["n"], "int8": 100 * c["int8"] / c["n"],
           "int8_agree": 100 * c["int8_agree"] / c["n"], "n32": c["n32"],
           "e32_delta": 100 * (c["e32"] - c["e32_fq"]) / max(c["n32"], 1),
           "e32_agree": 100 * c["e32_agree"] / max(c["n32"], 1), "saturated": sat, "counts": counts,
           "size": size, "manifest": (folder / "manifest.json").stat().st_size,
           "seconds": time.perf_counter() - t0}
    log(f"{name}: {res}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", default="ptq-w8a8,ptq-w4a4-minmax,ptq-w4a4-aciq,faq-pow2")
    ap.add_argument("--calib-images", type=int, default=512)
    ap.add_argument("--test-images", type=int, default=None, help="default: the whole test set")
    ap.add_argument("--int32-images", type=int, default=2000)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(SEED)
    model = pretrained("resnet20")
    fp32 = fp32_checkpoint_bytes(model)
    calib = list(make_loader("fashion-mnist", "calib", 128, limit=args.calib_images))
    test = list(make_loader("fashion-mnist", "test", 500, limit=args.test_images))
    rows = [measure(r, model, calib, test, args.int32_images, lambda s: print(s, flush=True))
            for r in args.recipes.split(",")]
    lines = ["| recipe | fake-quant top-1 | engine top-1 | engine = fake-quant | ONNX QDQ top-1 | ONNX = fake-quant "
             "| engine, int32 bias only: = fake-quant / top-1 change | ONNX int8-residual top-1 "
             "| how layers requantize "
             "| model.safetensors (fp32 / file) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        k = r["counts"]
        how = (f"{k['pure_shift']} pure shift, " if k["pure_shift"] else "") + \
              (f"{k['multiplier']} multiplier" if k["multiplier"] else "") + \
              (f", {k['folded']} per-input-channel (int64)" if k["folded"] else "")
        lines.append(f"| {r['recipe']} | {r['fq']:.2f}% | {r['eng']:.2f}% ({r['eng'] - r['fq']:+.2f}) | "
                     f"{r['eng_agree']:.2f}% | {r['onnx']:.2f}% ({r['onnx'] - r['fq']:+.2f}) | "
                     f"{r['onnx_agree']:.2f}% | "
                     f"{r['e32_agree']:.2f}% / {r['e32_delta']:+.2f} ({r['n32']:,} images) | "
                     f"{r['int8']:.2f}% ({r['int8'] - r['fq']:+.2f}) | {how.strip(', ')} | "
                     f"{r['size']:,} B ({fp32 / r['size']:.2f}x) |")
    body = (f"Shipped ResNet-20 on the Fashion-MNIST test set ({rows[0]['n']:,} images), 512 calibration images. "
            "*engine*: `lowbit.deploy.IntegerEngine` reading the exported folder (integer tensors only, exact biases); "
            "*= fake-quant*: share of images with the same top-1 prediction as the fake-quantized model. Targets: "
            "engine = fake-quant >= 99.9 %, engine accuracy within 0.05 points, ONNX accuracy within 0.1 point. "
            "*int32 bias only*: the engine adding just the exported int32 bias (rounded to the accumulator grid), as "
            "a runtime without the float biases would. *ONNX int8-residual*: the speed export "
            "(`quantize_residual=True`), which adds 8-bit rounding on the residual path. "
            f"fp32 checkpoint: {fp32:,} bytes; the manifest adds about {rows[0]['manifest']:,} bytes. "
            f"Saturated wide values: {sum(r['saturated'] for r in rows)}.\n\n" + "\n".join(lines))
    print(body)
    if not args.no_write:
        write_section("export-engine", "Deployment: integer engine and ONNX against the fake-quant model", body, SEED)


if __name__ == "__main__":
    main()
