"""Checking an exported folder against the fake-quant model it came from, on labelled batches.

    report = verify_export(qmodel, "out/", test_loader, formats=("lowbit", "onnx"))

For each batch the fake-quant model, the integer engine (``lowbit``: the folder's
``model.safetensors`` + ``manifest.json``) and onnxruntime (``onnx``: the folder's
``model.onnx``) predict; the report gives each one's top-1 accuracy and the share of images on
which the deployed form predicts what the fake-quant model predicts (the deployment check of
docs/DEPLOYMENT.md).

On deep networks the float32 fake-quant model is itself only one evaluation of the quantized
network: a value within float32 rounding of a grid's rounding boundary takes one code or the next,
and on MobileNetV2 or EfficientNet-Lite0 (50+ quantized layers) such one-code differences grow
through the layers until a few predictions in a thousand differ between the fake-quant model in
float32 and the same model in float64. ``float64=True`` also reports each form's agreement with
the float64 evaluation, and the float32 model's own agreement with it: the noise floor under any
comparison with the float32 model (``benchmarks/imagenet_deploy.py`` measures both).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from lowbit.deploy.engine import IntegerEngine
from lowbit.errors import LowbitError

FORMATS = ("lowbit", "onnx")


class _Tally:
    def __init__(self, predict):
        self.predict, self.agree, self.agree_f64, self.correct = predict, 0, 0, 0

    def add(self, x: torch.Tensor, y: torch.Tensor, reference: torch.Tensor, reference_f64=None) -> None:
        p = self.predict(x)
        self.agree += int((p == reference).sum())
        self.correct += int((p == y).sum())
        if reference_f64 is not None:
            self.agree_f64 += int((p == reference_f64).sum())


def _onnx_predictor(path: Path):
    import onnxruntime as ort  # optional dependency (the `onnx` extra), needed only for this format

    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"input": x.numpy()})[0]).argmax(1)


@torch.no_grad()
def verify_export(qmodel: nn.Module, folder: str | os.PathLike, data: Iterable, *,
                  formats: tuple[str, ...] = ("lowbit",), float64: bool = False, log=print) -> dict:
    """Top-1 of the fake-quant model and of each deployed form, and their agreement, in percent.

    ``data``: ``(images, labels)`` batches. Returns ``{"images", "fake_quant_top1"}`` plus
    ``engine_top1``/``engine_agreement`` and ``onnx_top1``/``onnx_agreement`` for the formats
    asked for. A model the integer engine cannot run is reported (``engine_error``), not raised.
    ``float64``: also ``fake_quant_f32_agreement_f64`` (the float32 fake-quant model against its float64 self)
    and ``engine_agreement_f64`` / ``onnx_agreement_f64`` (module docstring); ``qmodel`` is copied, not changed.
    Raises ``ValueError`` for an unknown format.
    """
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown format(s) {sorted(unknown)}; choose from {FORMATS}")
    folder = Path(folder)
    out: dict = {}
    tallies: dict[str, _Tally] = {}
    if "lowbit" in formats:
        try:
            engine = IntegerEngine.from_path(folder)
            tallies["engine"] = _Tally(engine.predict)
        except LowbitError as exc:
            out["engine_error"] = str(exc)
            log(f"integer engine: cannot run this model ({exc})")
    if "onnx" in formats:
        tallies["onnx"] = _Tally(_onnx_predictor(folder / "model.onnx"))
    qmodel.eval()
    q64 = copy.deepcopy(qmodel).double() if float64 else None
    fq_correct = total = f32_f64 = 0
    for x, y in data:
        reference = qmodel(x).argmax(1)
        reference_f64 = q64(x.double()).argmax(1) if float64 else None
        fq_correct += int((reference == y).sum())
        total += len(y)
        if float64:
            f32_f64 += int((reference == reference_f64).sum())
        for tally in tallies.values():
            tally.add(x, y, reference, reference_f64)
    if total == 0:
        raise ValueError("verify_export needs at least one labelled batch")
    out.update(images=total, fake_quant_top1=100.0 * fq_correct / total)
    log(f"verify on {total} images: fake-quant top-1 {out['fake_quant_top1']:.2f}%")
    if float64:
        out["fake_quant_f32_agreement_f64"] = 100.0 * f32_f64 / total
        log(f"  fake-quant float32 = float64 on {out['fake_quant_f32_agreement_f64']:.2f}% of images")
    for name, tally in tallies.items():
        out[f"{name}_top1"], out[f"{name}_agreement"] = 100.0 * tally.correct / total, 100.0 * tally.agree / total
        label = "integer engine" if name == "engine" else "onnxruntime"
        if float64:
            out[f"{name}_agreement_f64"] = 100.0 * tally.agree_f64 / total
        log(f"  {label + ':':15} top-1 {out[f'{name}_top1']:.2f}%, same prediction as fake-quant on "
            f"{out[f'{name}_agreement']:.2f}% of images"
            + (f" (as its float64 evaluation: {out[f'{name}_agreement_f64']:.2f}%)" if float64 else ""))
    return out
