"""Saving and loading weights without unpickling: safetensors, plus a JSON sidecar.

``save_checkpoint(model, "m.safetensors", meta)`` writes the state dict as safetensors
and ``m.json`` beside it. ``load_state_dict(path)`` reads safetensors, or a user's
``.pt``/``.pth`` file through ``torch.load(weights_only=True)``, which refuses arbitrary
pickled objects. ``load_into(model, path)`` checks names and shapes first and says what
does not match, so a wrong checkpoint never half-loads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lowbit.errors import CheckpointError
from lowbit.files import temporary_path, write_text_atomic
from lowbit.quant.base import Quantizer

ALIASES_KEY = "lowbit_aliases"


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """``safetensors.torch.save_file`` with the usual file mode (``0o666`` less the umask), and tied
    tensors stored once.

    safetensors creates its files owner-only (0600), so a checkpoint shipped or shared from it
    would be unreadable to other users; callers write to a temporary name and ``os.replace`` it.
    safetensors refuses tensors that share memory (a language model's tied embedding and output
    weights): each is written once, and the header's ``lowbit_aliases`` maps every other name to the
    one stored (:func:`read_safetensors` restores them).
    """
    unique, aliases, seen = {}, {}, {}
    for name, t in tensors.items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()),
               t.dtype) if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        unique[name] = t
    if aliases:
        metadata = {**(metadata or {}), ALIASES_KEY: json.dumps(aliases, sort_keys=True)}
    save_file(unique, str(path), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, header metadata)`` of a safetensors file, tied names restored (see
    :func:`write_safetensors`); the restored names share the stored tensor, as they did when saved."""
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    tensors = load_file(str(path))
    for name, stored in json.loads(metadata.get(ALIASES_KEY, "{}")).items():
        tensors[name] = tensors[stored]
    return tensors, metadata


def sidecar_path(path: str | os.PathLike) -> Path:
    return Path(path).with_suffix(".json")


def save_checkpoint(model_or_state: nn.Module | dict, path: str | os.PathLike, meta: dict | None = None) -> Path:
    """Write a safetensors file (and a JSON sidecar with ``meta``); returns the path."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: checkpoints are written as safetensors; name the file *.safetensors")
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items() if isinstance(v, torch.Tensor)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    write_safetensors(tensors, tmp)
    os.replace(tmp, path)  # atomic: an interrupted save never leaves a truncated checkpoint
    if meta is not None:
        write_text_atomic(sidecar_path(path), json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return path


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read tensors from a safetensors file, or a ``.pt``/``.pth`` state dict without unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        try:
            return read_safetensors(path)[0]
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a valid safetensors file ({exc}); re-save it with "
                                  "lowbit.checkpoint.save_checkpoint or safetensors.torch.save_file") from exc
    if path.suffix in (".pt", ".pth", ".bin"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError...
            raise CheckpointError(f"{path}: cannot be read as a tensor-only PyTorch file ({exc}). lowbit loads "
                                  "with weights_only=True and never unpickles code; save a plain state_dict "
                                  "or convert it to safetensors") from exc
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointError(f"{path}: expected a state_dict (name -> tensor), got {type(obj).__name__}")
        return obj
    raise CheckpointError(f"{path}: unknown checkpoint type {path.suffix!r}; use .safetensors (or .pt/.pth)")


def load_into(model: nn.Module, path_or_state: str | os.PathLike | dict, *, strict: bool = True) -> nn.Module:
    """Load weights into ``model`` after checking that every name and shape matches."""
    state = path_or_state if isinstance(path_or_state, dict) else load_state_dict(path_or_state)
    where = "state dict" if isinstance(path_or_state, dict) else str(path_or_state)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    adopting = _quantizer_prefixes(model)  # quantizer grids take their shape from the checkpoint
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state and state[k].shape != own[k].shape and not k.startswith(adopting)]
    if wrong or (strict and (missing or unexpected)):
        parts = []
        if wrong:
            parts.append("shape mismatch: " + "; ".join(wrong[:5]) + (" ..." if len(wrong) > 5 else ""))
        if strict and missing:
            parts.append(f"missing {len(missing)} tensors, e.g. {missing[:3]}")
        if strict and unexpected:
            parts.append(f"unexpected {len(unexpected)} tensors, e.g. {unexpected[:3]}")
        raise CheckpointError(f"{where} does not fit {type(model).__name__}: " + ", ".join(parts)
                              + ". Check that the checkpoint was saved from the same architecture.")
    model.load_state_dict(state, strict=strict)
    return model


def _quantizer_prefixes(model: nn.Module) -> tuple[str, ...]:
    return tuple(f"{name}." for name, m in model.named_modules() if isinstance(m, Quantizer))
