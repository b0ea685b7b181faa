"""``lowbit export``: quantize (or load) a model, write the deployment folder and/or ONNX, verify it."""

from __future__ import annotations

from pathlib import Path

import torch

from lowbit.errors import LowbitError


def _fmt(n: int) -> str:
    return f"{n:,} bytes"


def run_export(*, model_name: str, weights: str | None, dataset: str, recipe: str, quantized: str | None,
               calib_images: int, out: str, fmt: str = "lowbit", float_bias: bool = True,
               quantize_residual: bool = False, verify: int = 0, data_dir: str | None = None, log=print) -> dict:
    """What the command does; returns the numbers it printed (for tests)."""
    import lowbit
    from lowbit.data.datasets import dataset_info, make_loader
    from lowbit.export.format import build_export, fp32_checkpoint_bytes, write_export
    from lowbit.zoo import create_model

    info = dataset_info(dataset)
    shape = [1, info.in_channels, info.image_size, info.image_size]
    calib = make_loader(dataset, "calib", 128, limit=calib_images, data_dir=data_dir) if calib_images else None
    if quantized:
        import json

        from lowbit.serialize import load_quantized
        qmodel = load_quantized(quantized)  # raises a CheckpointError for a folder it cannot read
        meta = json.loads((Path(quantized) / "lowbit.json").read_text())
        model_name = meta.get("model") or model_name
        reference = create_model(model_name, in_channels=info.in_channels, num_classes=info.num_classes,
                                 in_size=info.image_size)
    else:
        from lowbit.cli import build_model
        reference = build_model(model_name, weights, dataset)
        if calib is None:
            raise LowbitError("quantizing needs calibration images: pass --calib-images N (N > 0)")
        qmodel = lowbit.quantize(reference, recipe, calib_data=calib)
    qmodel.eval()
    fp32 = fp32_checkpoint_bytes(reference)
    exp = build_export(qmodel, input_shape=shape)
    folder = Path(out)
    result: dict = {"fp32_checkpoint_bytes": fp32}
    if exp.left_float:
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
        from lowbit.export.onnx import to_onnx
        onnx_path = folder / "model.onnx"
        to_onnx(exp, onnx_path, input_shape=shape, quantize_residual=quantize_residual, calib_data=calib)
        result["onnx_bytes"] = onnx_path.stat().st_size
        log(f"wrote {onnx_path}: {_fmt(result['onnx_bytes'])} (QDQ, opset 17"
            + (", residual additions quantized to 8 bits" if quantize_residual else "") + ")")
    if verify:
        result.update(_verify(qmodel, exp, folder, fmt, dataset, verify, data_dir, log))
    return result


@torch.no_grad()
def _verify(qmodel, exp, folder: Path, fmt: str, dataset: str, n: int, data_dir, log) -> dict:
    from lowbit.data.datasets import make_loader
    from lowbit.export.engine import IntegerEngine

    test = make_loader(dataset, "test", 500, limit=n, data_dir=data_dir)
    out: dict = {}
    fq_correct = total = 0
    engine = agree_e = correct_e = None
    sess = agree_o = correct_o = None
    if fmt in ("lowbit", "both"):
        try:
            engine = IntegerEngine.from_path(folder)
            agree_e = correct_e = 0
        except LowbitError as exc:
            log(f"integer engine: cannot run this model ({exc})")
    if fmt in ("onnx", "both"):
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])
        agree_o = correct_o = 0
    for x, y in test:
        ref = qmodel(x).argmax(1)
        fq_correct += int((ref == y).sum())
        total += len(y)
        if engine is not None:
            p = engine.predict(x)
            agree_e += int((p == ref).sum())
            correct_e += int((p == y).sum())
        if sess is not None:
            p = torch.from_numpy(sess.run(None, {"input": x.numpy()})[0]).argmax(1)
            agree_o += int((p == ref).sum())
            correct_o += int((p == y).sum())
    out["fake_quant_top1"] = 100.0 * fq_correct / total
    log(f"verify on {total} {dataset} test images: fake-quant top-1 {out['fake_quant_top1']:.2f}%")
    if engine is not None:
        out.update(engine_agreement=100.0 * agree_e / total, engine_top1=100.0 * correct_e / total)
        log(f"  integer engine: top-1 {out['engine_top1']:.2f}%, same prediction as fake-quant on "
            f"{out['engine_agreement']:.2f}% of images")
    if sess is not None:
        out.update(onnx_agreement=100.0 * agree_o / total, onnx_top1=100.0 * correct_o / total)
        log(f"  onnxruntime:    top-1 {out['onnx_top1']:.2f}%, same prediction as fake-quant on "
            f"{out['onnx_agreement']:.2f}% of images")
    return out
