"""Training checkpoints of the fine-tuning loop: write atomically, resume exactly.

``checkpoint_dir/last.safetensors`` holds every tensor: the model's state dict under
``model.<key>`` and the optimizer's state under ``optim.<param index>.<name>``. Everything
else (step, epoch, config, schedule, RNG states of torch/python/numpy, optimizer
hyperparameters, running metrics, history, a fingerprint of the architecture and recipe)
is JSON, stored in the safetensors header, so one ``os.replace`` publishes tensors and
metadata together, and copied to ``last.json`` for people to read. The copy inside the
safetensors file is the one resume trusts.

A checkpoint is written to a temporary file, checked (every float tensor finite, the file
reads back), and only then moved over the previous one: a crash or a diverged run never
replaces a good checkpoint with a bad one.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lowbit.errors import CheckpointError, LowbitError

NAME = "last"
META_KEY = "lowbit_qat"
FORMAT = 1


class NonFiniteError(LowbitError, FloatingPointError):
    """The loss or the weights became NaN/Inf; training stopped, the last good checkpoint is kept."""


def checkpoint_paths(directory: str | os.PathLike) -> tuple[Path, Path]:
    d = Path(directory)
    return d / f"{NAME}.safetensors", d / f"{NAME}.json"


# ----- RNG states as JSON-safe data ------------------------------------------------------
def rng_state() -> dict:
    """torch (CPU, and CUDA when present), python ``random`` and numpy global RNG states."""
    version, internal, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii"),
        "python": [version, list(internal), gauss],
        "numpy": [np_kind, [int(k) for k in np_keys], int(np_pos), int(np_has_gauss), float(np_gauss)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode("ascii") for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    raw = np.frombuffer(base64.b64decode(state["torch"]), dtype=np.uint8).copy()
    torch.set_rng_state(torch.from_numpy(raw))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        states = [torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy()) for s in state["cuda"]]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


# ----- fingerprint ----------------------------------------------------------------------
def architecture(model: nn.Module) -> dict:
    """Module types and state-dict tensor shapes: what must match for a checkpoint to fit."""
    return {"modules": {name: type(m).__name__ for name, m in model.named_modules() if name},
            "tensors": {k: f"{list(v.shape)} {str(v.dtype).removeprefix('torch.')}"
                        for k, v in model.state_dict().items()}}


def recipe_of(model: nn.Module) -> dict | None:
    """The quantization part of the recipe the model was prepared with (None if unknown)."""
    report = getattr(model, "lowbit_report", None)
    if report is None:
        return None
    d = report.recipe.to_dict()
    return {k: d[k] for k in ("weights", "activations", "layers", "skip", "embeddings", "kv_cache") if k in d}


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint(model: nn.Module) -> dict:
    arch, recipe = architecture(model), recipe_of(model)
    return {"architecture": digest(arch), "recipe": digest(recipe), "architecture_detail": arch,
            "recipe_detail": recipe}


def _flatten(d, prefix="") -> dict:
    if not isinstance(d, dict):
        return {prefix or "(recipe)": d}
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(_flatten(v, key) if isinstance(v, dict) and v else {key: v})
    return out


def _diff(mine: dict, theirs: dict, limit: int = 4) -> list[str]:
    lines = []
    for k in sorted(set(mine) | set(theirs)):
        if mine.get(k, "<absent>") != theirs.get(k, "<absent>"):
            lines.append(f"{k}: checkpoint {theirs.get(k, '<absent>')} vs now {mine.get(k, '<absent>')}")
    return lines[:limit] + ([f"... ({len(lines) - limit} more)"] if len(lines) > limit else [])


def check_compatible(meta: dict, model: nn.Module, config: dict, ignore: frozenset, where: str) -> None:
    """Raise a :class:`CheckpointError` naming what differs between the checkpoint and this run."""
    now = fingerprint(model)
    then = meta.get("fingerprint", {})
    if then.get("architecture") != now["architecture"]:
        arch_then, arch_now = then.get("architecture_detail", {}), now["architecture_detail"]
        diff = _diff(arch_now.get("modules", {}), arch_then.get("modules", {}))
        diff += _diff(arch_now.get("tensors", {}), arch_then.get("tensors", {}))
        raise CheckpointError(f"{where} was written for another model architecture: " + "; ".join(diff[:6])
                              + ". Resume with the model (and recipe) that wrote it, or start without resume")
    if then.get("recipe") != now["recipe"]:
        diff = _diff(_flatten(now["recipe_detail"]), _flatten(then.get("recipe_detail")))
        raise CheckpointError(f"{where} was written with another recipe: " + "; ".join(diff)
                              + ". Resume with the recipe that wrote it, or start without resume")
    old = {k: v for k, v in meta.get("config", {}).items() if k not in ignore}
    new = {k: v for k, v in config.items() if k not in ignore}
    if old != new:
        raise CheckpointError(f"{where} was written with other fine-tuning settings: " + "; ".join(_diff(new, old))
                              + ". Resume with the same settings (only "
                              + ", ".join(sorted(ignore)) + " may change)")


# ----- save / load ----------------------------------------------------------------------
def _json_safe(v):
    if isinstance(v, tuple):
        return [_json_safe(x) for x in v]
    if isinstance(v, list):
        return [_json_safe(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    return v


def optimizer_to_flat(optimizer: torch.optim.Optimizer, state: dict | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """``optimizer``'s state (or ``state``, an index-keyed state dict gathered from shards) as tensors + JSON."""
    sd = state if state is not None else optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = _json_safe(v)
    return tensors, {"type": type(optimizer).__name__, "param_groups": _json_safe(sd["param_groups"]),
                     "scalars": scalars}


def optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict,
                        load=None) -> None:
    """Load the state :func:`optimizer_to_flat` wrote, with ``load`` (default ``optimizer.load_state_dict``)."""
    if meta["type"] != type(optimizer).__name__:
        raise CheckpointError(f"checkpoint optimizer is {meta['type']}, this run builds {type(optimizer).__name__}")
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    for key, v in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    (load or optimizer.load_state_dict)({"state": state, "param_groups": groups})


def _check_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]


def save_training_state(directory: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                        meta: dict, optimizer_state: dict | None = None) -> Path:
    """Write ``last.safetensors`` (+ ``last.json``) atomically; refuse non-finite tensors."""
    from safetensors import safe_open
    from lowbit.checkpoint import ALIASES_KEY, write_safetensors

    path, side = checkpoint_paths(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt_tensors, opt_meta = optimizer_to_flat(optimizer, optimizer_state)
    tensors.update(opt_tensors)
    bad = _check_finite(tensors)
    if bad:
        raise NonFiniteError(f"refusing to save a checkpoint at step {meta.get('step')}: non-finite values in "
                             f"{bad[:3]}{' ...' if len(bad) > 3 else ''}; the previous checkpoint is kept")
    meta = dict(meta, format=FORMAT, optimizer=opt_meta)
    text = json.dumps(_json_safe(meta), sort_keys=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    tmp = path.with_name(path.name + ".tmp")
    write_safetensors(tensors, tmp, metadata={META_KEY: text})
    with safe_open(str(tmp), "pt") as f:  # read back before publishing
        stored = set(f.keys()) | set(json.loads(f.metadata().get(ALIASES_KEY, "{}")))
        if stored != set(tensors) or json.loads(f.metadata()[META_KEY])["step"] != meta["step"]:
            raise CheckpointError(f"{tmp}: the checkpoint did not read back; the previous one is kept")
    os.replace(tmp, path)
    side_tmp = side.with_name(side.name + ".tmp")
    side_tmp.write_text(json.dumps(json.loads(text), indent=1, sort_keys=True) + "\n")
    os.replace(side_tmp, side)
    return path


def load_training_state(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict] | None:
    """``(tensors, meta)`` of ``directory``'s last checkpoint, or None if there is none."""
    from safetensors import SafetensorError
    from lowbit.checkpoint import read_safetensors

    path, _ = checkpoint_paths(directory)
    if not path.is_file():
        return None
    try:
        tensors, header = read_safetensors(path)
        meta = json.loads(header[META_KEY])
    except (SafetensorError, OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: not a lowbit fine-tuning checkpoint ({exc}); delete it or "
                              "start without resume") from exc
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format')} is not {FORMAT}")
    return tensors, meta


def model_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
