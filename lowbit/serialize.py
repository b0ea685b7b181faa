"""Saving a quantized model (float weights + every quantizer's state) and rebuilding it.

A folder holds ``model.safetensors`` (the quantized model's state dict), ``recipe.yaml`` and
``lowbit.json`` (format version, zoo model name, dataset, folded batch norms, and the SHA-256 and
size of the two other files). Loading builds the architecture (a zoo name, or the ``model`` you
pass), re-applies the folding structure, prepares it with the recipe and loads the state
strictly, so learned steps, calibrated grids, per-channel widths and frozen codes all come back
as saved. This is lowbit's training-side checkpoint (``lowbit.save``/``lowbit.load``); the packed
integer deployment format is ``lowbit.export``/``lowbit.load_export``.

Integrity, as in the deployment format: ``lowbit.json`` holds the digests of the tensor file and
the recipe, and the tensor file's safetensors header holds the digest of ``lowbit.json`` itself
(its canonical JSON without the ``files`` entry), so an edit to any of the three files is refused.
A folder is published file by file, each atomically, ``lowbit.json`` last.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from torch import nn

from lowbit.checkpoint import ALIASES_KEY, load_into, write_safetensors
from lowbit.data.datasets import dataset_info
from lowbit.errors import CheckpointError
from lowbit.files import (canonical_sha256, file_record, is_file_record, loads_json, read_listed,
                          safetensors_metadata, temporary_path, write_text_atomic)
from lowbit.nn.modules import QuantMixin
from lowbit.prepare import quantize
from lowbit.quant.grid import check_bits
from lowbit.recipe import recipe_from_yaml
from lowbit.zoo import create_model_matching
from lowbit.zoo.language import LANGUAGE_MODELS, load_language_model

FORMAT = "lowbit-quantized"
VERSION = 2  # 2: lowbit.json names the digests of the other files and is sealed into the tensor file
META_FILE, RECIPE_FILE, TENSOR_FILE = "lowbit.json", "recipe.yaml", "model.safetensors"
META_DIGEST_KEY = "lowbit_json_sha256"  # in the tensor file's safetensors metadata


def save(qmodel: nn.Module, folder: str | os.PathLike, *, model_name: str | None = None,
         dataset: str | None = None, extra: dict | None = None) -> Path:
    """Write ``qmodel`` (from :func:`lowbit.quantize`, possibly fine-tuned) into ``folder``; returns it.

    A zoo model's architecture record (``qmodel.lowbit_architecture``) goes into ``lowbit.json``, so that
    :func:`load` rebuilds it by name; ``model_name``/``dataset`` are recorded as given; ``extra``: more
    plain data for ``lowbit.json``. Raises :class:`CheckpointError` for a model that did not come from
    :func:`lowbit.quantize` or ``extra`` that is not plain data.
    """
    report = getattr(qmodel, "lowbit_report", None)
    if report is None:
        raise CheckpointError("save expects a model returned by lowbit.quantize")
    arch = getattr(qmodel, "lowbit_architecture", None)
    meta = {"format": FORMAT, "version": VERSION, "model": model_name or (arch or {}).get("zoo"), "dataset": dataset,
            "architecture": arch, "folded": [list(p) for p in report.folded], **(extra or {})}
    try:
        digest = canonical_sha256(meta)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"save: extra must be plain JSON data ({exc})") from None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in qmodel.state_dict().items()}
    tmp = temporary_path(folder / TENSOR_FILE)
    write_safetensors(state, tmp, metadata={META_DIGEST_KEY: digest})
    tensor_bytes = tmp.read_bytes()
    os.replace(tmp, folder / TENSOR_FILE)
    recipe_text = report.recipe.to_yaml()
    write_text_atomic(folder / RECIPE_FILE, recipe_text)
    meta["files"] = {TENSOR_FILE: file_record(tensor_bytes), RECIPE_FILE: file_record(recipe_text.encode("utf-8"))}
    write_text_atomic(folder / META_FILE, json.dumps(meta, indent=2) + "\n")
    return folder


def load(folder: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a model saved by :func:`save`, in eval mode.

    ``model``: the float architecture, if the folder names no zoo model (a copy is used; yours is left
    alone). Raises :class:`CheckpointError` naming the file and field for a missing, damaged or edited
    file, an unknown format version, or a model the checkpoint does not fit, and
    :class:`~lowbit.errors.RecipeError` for a recipe this lowbit cannot use.
    """
    folder = Path(folder)
    meta = _read_meta(folder)
    tensor_bytes, recipe_bytes = (read_listed(folder / name, meta["files"][name], listed_in=META_FILE,
                                              field=f"files.{name}", error=CheckpointError, fix="re-save the model")
                                  for name in (TENSOR_FILE, RECIPE_FILE))
    state = _read_state(folder / TENSOR_FILE, tensor_bytes, meta)
    recipe = recipe_from_yaml(recipe_bytes, folder / RECIPE_FILE)
    model = copy.deepcopy(model) if model is not None else _zoo_model(folder / META_FILE, meta, state)
    _apply_fold_structure(model, meta["folded"], folder / META_FILE)
    sections = {**recipe.sections, "ptq": {**(recipe.sections.get("ptq") or {}), "fold_bn": False}}
    rebuilt = dataclasses.replace(recipe, sections=sections)
    qmodel = quantize(model, rebuilt, inplace=True)
    load_into(qmodel, state)
    check_quantizer_state(qmodel, folder / TENSOR_FILE)
    qmodel.lowbit_report.recipe = recipe
    qmodel.lowbit_report.folded = [tuple(p) for p in meta["folded"]]
    return qmodel.eval()


def _read_meta(folder: Path) -> dict:
    path = folder / META_FILE
    if not path.is_file():
        if (folder / "manifest.json").is_file():
            raise CheckpointError(f"{folder} is a deployment export (manifest.json); load it with "
                                  "lowbit.load_export(folder)")
        raise CheckpointError(f"{folder}: no {META_FILE}; not a folder written by lowbit.save")
    try:
        meta = loads_json(path.read_bytes())
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}); re-save the model") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION or \
            isinstance(meta.get("version"), bool):
        got = (meta.get("format"), meta.get("version")) if isinstance(meta, dict) else (None, None)
        raise CheckpointError(f"{path}: format {got[0]!r} version {got[1]!r} is not {FORMAT!r} version {VERSION}; "
                              "upgrade lowbit or re-save the model (lowbit.save)")
    for key in ("model", "dataset"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise CheckpointError(f"{path}: field {key}: a name or null, got {meta[key]!r}")
    folded = meta.get("folded")
    if not isinstance(folded, list) or not all(isinstance(p, list) and len(p) == 2 and all(isinstance(n, str) and n
                                                                                         for n in p) for p in folded):
        raise CheckpointError(f"{path}: field folded: a list of [layer, batch norm] name pairs, got {folded!r}")
    files = meta.get("files")
    for name in (TENSOR_FILE, RECIPE_FILE):
        entry = files.get(name) if isinstance(files, dict) else None
        if not is_file_record(entry):
            raise CheckpointError(f"{path}: field files.{name}: {{sha256: 64 hex digits, bytes: size}}, got {entry!r}")
    return meta


def _read_state(path: Path, data: bytes, meta: dict) -> dict[str, torch.Tensor]:
    """The state dict in ``data`` (tied tensors restored from the header's aliases), after checking the digest of
    ``lowbit.json`` sealed into its header."""
    try:
        metadata = safetensors_metadata(data)
        sealed = metadata.get(META_DIGEST_KEY)
        state = load_safetensors(data)
        aliases = json.loads(metadata.get(ALIASES_KEY, "{}"))
        state.update({name: state[stored] for name, stored in aliases.items()})
    except (SafetensorError, ValueError, UnicodeDecodeError, RecursionError, RuntimeError, AttributeError,
            KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: not a valid safetensors file ({type(exc).__name__}: {exc}); re-save the "
                              "model") from None
    if sealed != canonical_sha256({k: v for k, v in meta.items() if k != "files"}):
        raise CheckpointError(f"{path.parent / META_FILE}: its content does not match the digest sealed into "
                              f"{TENSOR_FILE} ({META_DIGEST_KEY}): {META_FILE} was edited (model, dataset, folded, "
                              "...) or belongs to another checkpoint; re-save the model")
    return state


def _zoo_model(path: Path, meta: dict, state: dict[str, torch.Tensor]) -> nn.Module:
    """The zoo architecture the metadata names (its record, or a model name and dataset), checked against the
    saved weight shapes before it is built (:func:`lowbit.zoo.create_model_matching`); a zoo language model
    comes with its float weights."""
    arch = meta.get("architecture")
    shapes = {k.removesuffix(".weight"): tuple(v.shape) for k, v in state.items() if k.endswith(".weight")}
    try:
        if arch is not None:
            if not isinstance(arch, dict) or not isinstance(arch.get("zoo"), str) or \
                    not isinstance(arch.get("kwargs", {}), dict):
                raise ValueError(f"a record {{zoo: name, kwargs: {{...}}}}, got {arch!r}")
            return create_model_matching(arch["zoo"], shapes, **arch.get("kwargs", {}))
        if not meta.get("model"):
            raise CheckpointError(f"{path}: names no zoo model; pass the float model: lowbit.load(folder, model)")
        if meta["model"] in LANGUAGE_MODELS:  # with its weights, which the saved state then replaces
            return load_language_model(meta["model"])[0]
        info = dataset_info(meta.get("dataset") or "fashion-mnist")
        return create_model_matching(meta["model"], shapes, in_channels=info.in_channels,
                                     num_classes=info.num_classes, in_size=info.image_size)
    except (ValueError, TypeError) as exc:
        fields = "field architecture" if arch is not None else "fields model/dataset"
        raise CheckpointError(f"{path}: {fields}: {exc}; pass the float model: lowbit.load(folder, model)") from None


def _apply_fold_structure(model: nn.Module, folded: list, where: Path) -> None:
    """Replace folded batch norms by Identity and give their convs a bias, as folding did."""
    for i, (conv_name, bn_name) in enumerate(folded):
        try:
            conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        except AttributeError as exc:
            raise CheckpointError(f"{where}: field folded[{i}]: {exc}; is the model the saved architecture?") from None
        if not isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Linear)) or \
                not isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d, nn.Identity)):
            raise CheckpointError(f"{where}: field folded[{i}]: {conv_name!r} ({type(conv).__name__}) and {bn_name!r} "
                                  f"({type(bn).__name__}) are not a Conv/Linear and the batch norm folded into it")
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros(conv.weight.shape[0]))
        model.set_submodule(bn_name, nn.Identity())


def check_quantizer_state(qmodel: nn.Module, where) -> None:
    """Raise a :class:`CheckpointError` when a loaded quantizer state cannot belong to its layer: steps and zero
    points of the shape the granularity gives (output channels for weights, input channels or features for
    inputs), finite, non-zero steps, per-channel widths in 0..16 (one per channel), frozen codes of the
    weight's shape, a signedness flag of -1, 0 or 1."""
    for name, m in qmodel.named_modules():
        if not isinstance(m, QuantMixin):
            continue
        in_channels = m.weight.shape[1] * getattr(m, "groups", 1)
        for q, role in ((m.weight_quantizer, "weight"), (m.input_quantizer, "input")):
            if q is None or not bool(q.initialized):
                continue
            field = f"{name}.{role}_quantizer"
            channels = m.weight.shape[0] if role == "weight" else in_channels
            g = q.granularity
            expected = () if g.kind == "tensor" else (channels,) if g.kind == "channel" else \
                g.param_shape(m.weight.detach())
            scale, zero = q.get_scale().detach(), q.zero_point
            problems = []
            if tuple(scale.shape) != expected or tuple(zero.shape) != expected:
                problems.append(f"step {tuple(scale.shape)} and zero point {tuple(zero.shape)} for a {g.kind} grid "
                                f"of shape {expected}")
            elif not bool(torch.isfinite(scale).all() and (scale != 0).all() and torch.isfinite(zero).all()):
                problems.append("a zero or non-finite step or zero point")
            widths = q.channel_bits
            if widths.numel() and (widths.numel() != channels or not bool(((widths >= 0) & (widths <= 16)).all())):
                problems.append(f"{widths.numel()} per-channel widths for {channels} channels (each 0..16)")
            if q.codes.numel() and (role != "weight" or q.codes.shape != m.weight.shape):
                problems.append(f"frozen codes of shape {tuple(q.codes.shape)}")
            if int(q.signed_flag) not in (-1, 0, 1):
                problems.append(f"signedness flag {int(q.signed_flag)}")
            try:
                check_bits(q.bits)
            except ValueError as exc:
                problems.append(str(exc))
            if problems:
                raise CheckpointError(f"{where}: {field}: " + "; ".join(problems) + " - the checkpoint does not fit "
                                      "this layer; re-save the model")
