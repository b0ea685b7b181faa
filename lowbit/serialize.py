"""Saving a quantized model (float weights + every quantizer's state) and rebuilding it.

A folder holds ``model.safetensors`` (the quantized model's state dict), ``recipe.yaml`` and
``lowbit.json`` (format version, zoo model name, dataset, folded batch norms). Loading builds
the architecture (a zoo name, or the ``model`` you pass), re-applies the folding structure,
prepares it with the recipe and loads the state strictly, so learned steps, calibrated grids,
per-channel widths and frozen codes all come back as saved. This is lowbit's training-side
checkpoint (``lowbit.save``/``lowbit.load``); the packed integer deployment format is
``lowbit.export``/``lowbit.load_export``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from torch import nn

from lowbit.checkpoint import load_into, save_checkpoint
from lowbit.errors import CheckpointError
from lowbit.recipe import load_recipe

FORMAT = "lowbit-quantized"
VERSION = 1


def save(qmodel: nn.Module, folder: str | os.PathLike, *, model_name: str | None = None,
                   dataset: str | None = None, extra: dict | None = None) -> Path:
    report = getattr(qmodel, "lowbit_report", None)
    if report is None:
        raise CheckpointError("save expects a model returned by lowbit.quantize")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint(qmodel, folder / "model.safetensors")
    report.recipe.save(folder / "recipe.yaml")
    meta = {"format": FORMAT, "version": VERSION, "model": model_name, "dataset": dataset,
            "folded": [list(p) for p in report.folded], **(extra or {})}
    (folder / "lowbit.json").write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def load(folder: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a model saved by :func:`save` (``model``: the float architecture, if not a zoo model,
    image or language)."""
    from lowbit.prepare import quantize

    folder = Path(folder)
    meta_path = folder / "lowbit.json"
    if not meta_path.is_file():
        if (folder / "manifest.json").is_file():
            raise CheckpointError(f"{folder} is a deployment export (manifest.json); load it with "
                                  "lowbit.load_export(folder)")
        raise CheckpointError(f"{folder}: no lowbit.json; not a folder written by lowbit.save")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(f"{meta_path}: format {meta.get('format')!r} version {meta.get('version')!r} is not "
                              f"{FORMAT!r} version {VERSION}; upgrade lowbit or re-save the model")
    if model is None:
        model = _architecture(meta, meta_path)
    recipe = load_recipe(folder / "recipe.yaml")
    _apply_fold_structure(model, meta.get("folded", []))
    sections = {**recipe.sections, "ptq": {**(recipe.sections.get("ptq") or {}), "fold_bn": False}}
    rebuilt = dataclasses.replace(recipe, sections=sections)
    qmodel = quantize(model, rebuilt, inplace=True)
    load_into(qmodel, folder / "model.safetensors")
    qmodel.lowbit_report.recipe = recipe
    qmodel.lowbit_report.folded = [tuple(p) for p in meta.get("folded", [])]
    return qmodel.eval()


def _architecture(meta: dict, meta_path: Path) -> nn.Module:
    """The float model a saved folder names: a zoo image model, or a zoo language model (with its weights,
    which the saved state then replaces)."""
    from lowbit.zoo.language import LANGUAGE_MODELS, load_language_model

    if not meta.get("model"):
        raise CheckpointError(f"{meta_path}: names no zoo model; pass the float model: load(folder, model)")
    if meta["model"] in LANGUAGE_MODELS:
        return load_language_model(meta["model"])[0]
    from lowbit.data.datasets import dataset_info
    from lowbit.zoo import create_model
    info = dataset_info(meta.get("dataset") or "fashion-mnist")
    return create_model(meta["model"], in_channels=info.in_channels, num_classes=info.num_classes,
                        in_size=info.image_size)


def _apply_fold_structure(model: nn.Module, folded: list) -> None:
    """Replace folded batch norms by Identity and give their convs a bias, as folding did."""
    for conv_name, bn_name in folded:
        conv = model.get_submodule(conv_name)
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros(conv.weight.shape[0]))
        parent, _, child = bn_name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, nn.Identity())
