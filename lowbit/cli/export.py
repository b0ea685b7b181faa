"""``lowbit export``: quantize (or load) a zoo model, write the deployment folder and/or ONNX, verify it."""

from __future__ import annotations

import json
from pathlib import Path

import lowbit
from lowbit.data.datasets import dataset_info, make_loader
from lowbit.deploy import build_export, fp32_checkpoint_bytes, write_export
from lowbit.deploy.verify import verify_export
from lowbit.errors import LowbitError
from lowbit.zoo import build_model, create_model


def _fmt(n: int) -> str:
    return f"{n:,} bytes"


def run_export(*, model_name: str, weights: str | None, dataset: str, recipe: str, quantized: str | None,
               calib_images: int, out: str, fmt: str = "lowbit", float_bias: bool = True,
               quantize_residual: bool = False, verify: int = 0, data_dir: str | None = None, log=print) -> dict:
    """What the command does; returns the numbers it printed (for tests)."""
    info = dataset_info(dataset)
    shape = [1, info.in_channels, info.image_size, info.image_size]
    calib = make_loader(dataset, "calib", 128, limit=calib_images, data_dir=data_dir) if calib_images else None
    if quantized:
        qmodel = lowbit.load(quantized)  # raises a CheckpointError for a folder it cannot read
        meta = json.loads((Path(quantized) / "lowbit.json").read_text())
        model_name = meta.get("model") or model_name
        reference = create_model(model_name, in_channels=info.in_channels, num_classes=info.num_classes,
                                 in_size=info.image_size)
    else:
        reference = build_model(model_name, weights, dataset)
        if calib is None:
            raise LowbitError("quantizing needs calibration images: pass --calib-images N (N > 0)")
        qmodel = lowbit.quantize(reference, recipe, calib_data=calib)
    qmodel.eval()
    fp32 = fp32_checkpoint_bytes(reference)
    exp = build_export(qmodel, input_shape=shape)
    folder = Path(out)
    result: dict = {"fp32_checkpoint_bytes": fp32}
    for name, why in exp.left_float.items():
        log(f"left float: {name}: {why}")
    if fmt in ("lowbit", "both"):
        write_export(exp, folder, float_bias=float_bias)
        size = (folder / "model.safetensors").stat().st_size
        manifest = (folder / "manifest.json").stat().st_size
        result.update(tensor_file_bytes=size, manifest_bytes=manifest)
        log(f"wrote {folder}/model.safetensors: {_fmt(size)} and manifest.json: {_fmt(manifest)}")
        log(f"fp32 checkpoint: {_fmt(fp32)}; model.safetensors is {fp32 / size:.2f}x smaller "
            f"({100 * size / fp32:.1f}% of fp32; with the manifest {fp32 / (size + manifest):.2f}x)")
    if fmt in ("onnx", "both"):
        onnx_path = folder / "model.onnx"
        lowbit.deploy.to_onnx(exp, onnx_path, input_shape=shape, quantize_residual=quantize_residual,
                              calib_data=calib)
        result["onnx_bytes"] = onnx_path.stat().st_size
        log(f"wrote {onnx_path}: {_fmt(result['onnx_bytes'])} (QDQ, opset 17"
            + (", residual additions quantized to 8 bits" if quantize_residual else "") + ")")
    if verify:
        test = make_loader(dataset, "test", 500, limit=verify, data_dir=data_dir)
        formats = ("lowbit", "onnx") if fmt == "both" else (fmt,)
        result.update(verify_export(qmodel, folder, test, formats=formats, log=log))
    return result
