"""``lowbit.export`` and ``lowbit.load_export``: the model kinds, and the architectures they are loaded into.

:mod:`lowbit.deploy` knows only the model it is handed; this thin layer above it picks the writer
and reader by model kind and supplies the architecture:

- a Hugging Face causal LM or encoder goes to :mod:`lowbit.deploy.transformer` (packed weights, activation
  and KV-cache steps, float tensors; no graph), and is loaded into the float model the caller passes;
- every other model is traced into a graph (:func:`lowbit.deploy.export`). A zoo model's manifest
  records ``{"zoo": name, "kwargs": {...}}`` (what :func:`lowbit.zoo.create_model` was called with)
  and is rebuilt by name; any other export needs its float architecture passed in.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from lowbit import zoo
from lowbit.deploy import Exported, ExportFileError, read_export
from lowbit.deploy import export as export_graph
from lowbit.deploy import load as load_into_model
from lowbit.deploy.read import read_manifest
from lowbit.deploy.transformer import export_transformer, is_transformer_manifest, kind_of, load_transformer


def export(qmodel: nn.Module, path: str | os.PathLike, *, arch: str | None = None, input_shape=None,
           float_bias: bool = True) -> Path:
    """Write ``qmodel`` (from :func:`lowbit.quantize`, possibly fine-tuned) as a deployment folder; returns it.

    A Hugging Face causal LM or encoder is written by :func:`lowbit.deploy.transformer.export_transformer` (``arch`` and
    ``input_shape`` do not apply to it); any other model by :func:`lowbit.deploy.export` (see there for
    ``arch``, ``input_shape`` and ``float_bias``). ``qmodel`` is only read. Raises
    :class:`~lowbit.deploy.errors.ExportError` naming the module the format cannot hold.
    """
    if kind_of(qmodel) is not None:
        return export_transformer(qmodel, path, float_bias=float_bias)
    return export_graph(qmodel, path, arch=arch, input_shape=input_shape, float_bias=float_bias)


def load_export(path: str | os.PathLike, model: nn.Module | None = None, *, packed: str | None = None) -> nn.Module:
    """The quantized model of the export folder ``path``, in eval mode (see :func:`lowbit.deploy.load` and
    :func:`lowbit.deploy.transformer.load_transformer`).

    ``model``: the float architecture it was exported from (left unchanged); omit it for zoo models,
    which are built from the manifest's architecture record; a transformer needs its float model (of the
    exported class and config). ``packed`` (transformers): ``"int4"`` or ``"int8"`` loads the quantized layers
    as packed CPU layers (:mod:`lowbit.deploy.packed`). The folder is read and checked in full before
    anything is built. Raises :class:`~lowbit.deploy.errors.ExportFileError` (a ``CheckpointError``) for a
    damaged or edited folder, an export of a non-zoo model without ``model``, a model that is not the
    exported architecture, or ``packed`` with an export that is not a transformer.
    """
    if is_transformer_manifest(read_manifest(path)):
        return load_transformer(path, model, packed=packed)
    if packed is not None:
        raise ExportFileError(f"{path}: packed={packed!r} loads transformer exports; this one is a graph export "
                              "(run it with lowbit.deploy.IntegerEngine.from_path)")
    exp = read_export(path)
    if model is None:
        model = zoo_model(exp, path)
    return load_into_model(exp, model)


def zoo_model(exp: Exported, where) -> nn.Module:
    """The untrained zoo model ``exp.architecture`` names, checked against the exported layer shapes before it is
    built (:func:`lowbit.zoo.create_model_matching`): the record cannot make lowbit allocate another model."""
    arch = exp.architecture
    if not arch.get("zoo"):
        raise ExportFileError(f"{where}: the export is of {arch.get('name')!r}, not a zoo model; pass its float "
                              "architecture: lowbit.load_export(path, model)")
    shapes = {n: layer.weight_shape for n, layer in exp.layers.items()}
    try:
        return zoo.create_model_matching(arch["zoo"], shapes, **arch["kwargs"])
    except (ValueError, TypeError) as exc:
        raise ExportFileError(f"{where}: manifest field architecture {arch!r} does not describe this export: {exc}") \
            from None
