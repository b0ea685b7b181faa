"""A quantized model as an :class:`~lowbit.deploy.format.Exported`: its graph, layers and metadata.

The architecture record comes from the model itself: a zoo model carries
``lowbit_architecture = {"zoo": name, "kwargs": {...}}`` (set by :func:`lowbit.zoo.create_model`),
any other model is named by the caller (``arch=``) or by its class. Nothing here builds or
guesses models.
"""

from __future__ import annotations

from torch import nn

from lowbit.deploy.errors import ExportError
from lowbit.deploy.format import Exported
from lowbit.deploy.graph import trace_graph
from lowbit.deploy.layers import extract_layers

ARCHITECTURE_ATTR = "lowbit_architecture"


def architecture_of(model: nn.Module, arch: str | None = None) -> dict:
    """The manifest's architecture record: ``{"zoo": None, "name": arch}`` when ``arch`` is given, else the
    model's own ``lowbit_architecture`` (zoo models), else ``{"zoo": None, "name": "<module>.<class>"}``."""
    if arch is not None:
        return {"zoo": None, "name": str(arch)}
    record = getattr(model, ARCHITECTURE_ATTR, None)
    if isinstance(record, dict) and record.get("zoo"):
        return {"zoo": str(record["zoo"]), "kwargs": dict(record.get("kwargs") or {})}
    return {"zoo": None, "name": f"{type(model).__module__}.{type(model).__qualname__}"}


def build_export(qmodel: nn.Module, *, arch: str | None = None, input_shape=None) -> Exported:
    """Trace ``qmodel`` and read every layer's integers and grids (the model is put back in the mode it had).

    ``arch``: a name for the architecture (see :func:`architecture_of`); ``input_shape``: recorded in
    the manifest (default: the one a zoo model records). Raises :class:`~lowbit.deploy.errors.ExportError`
    for an operation or layer the format cannot hold, naming it.
    """
    was_training = qmodel.training
    qmodel.eval()  # eval re-derives dynamic weight grids from the current weights, as evaluation uses
    try:
        graph = trace_graph(qmodel)
        report = getattr(qmodel, "lowbit_report", None)
        folded = {conv: bn for conv, bn in (report.folded if report is not None else [])}
        layers = extract_layers(qmodel, graph, folded_at_quantize=folded)
    finally:
        qmodel.train(was_training)
    for name, layer in layers.items():
        if layer.input_grid is not None and layer.input_grid.kind == "token":
            raise ExportError(f"layer {name!r}: its input steps are per token, computed at run time; the integer "
                              "engine and ONNX run calibrated steps: quantize with activation granularity 'tensor' or "
                              "'channel' (per-token steps export only from transformers)")
    left_float = {}
    for name, layer in layers.items():
        if layer.weight_grid is None or layer.input_grid is None:
            why = (report.left_float.get(name) if report is not None else None) or \
                ("weights and input float" if layer.weight_grid is None and layer.input_grid is None else
                 "weights float" if layer.weight_grid is None else "input (activations) float")
            left_float[name] = why
    recipe = report.recipe.to_dict() if report is not None else None
    if input_shape is None:  # a zoo model records its own
        input_shape = (getattr(qmodel, ARCHITECTURE_ATTR, None) or {}).get("input_shape")
    return Exported(graph, layers, architecture_of(qmodel, arch), recipe,
                    list(input_shape) if input_shape is not None else None, left_float)
