"""``lowbit.load_export``: an export folder as a torch model, zoo architectures built by name.

:mod:`lowbit.deploy` knows only the model it is handed; this thin layer above it and the zoo
supplies one. A zoo model's manifest records ``{"zoo": name, "kwargs": {...}}`` (what
:func:`lowbit.zoo.create_model` was called with); any other export needs its float architecture
passed in.
"""

from __future__ import annotations

import os

from torch import nn

from lowbit import zoo
from lowbit.deploy import Exported, ExportFileError, read_export
from lowbit.deploy import load as load_into_model


def load_export(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """The quantized model of the export folder ``path``, in eval mode (see :func:`lowbit.deploy.load`).

    ``model``: the float architecture it was exported from (left unchanged); omit it for zoo models,
    which are built from the manifest's architecture record. The folder is read and checked in full
    before anything is built. Raises :class:`~lowbit.deploy.errors.ExportFileError` (a
    ``CheckpointError``) for a damaged or edited folder, an export of a non-zoo model without
    ``model``, or a model that is not the exported architecture.
    """
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
