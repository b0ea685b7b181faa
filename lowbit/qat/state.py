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

The header also holds :func:`state_digest`, a SHA-256 of the metadata text and of every tensor
(name, dtype, shape, bytes): :func:`load_training_state` recomputes it, so a damaged or edited
checkpoint is refused, and then checks the fields before anything is restored
(:func:`check_training_meta`: model tensors exactly as the recorded architecture lists them, and
in a fine-tuning checkpoint every field the loop reads, RNG states included, which fresh
generators must accept); :func:`optimizer_from_flat` checks the optimizer's record against the
optimizer of the run. Every failure is a :class:`~lowbit.errors.CheckpointError` naming the file
and the field. Fields a caller adds for itself (the RL loop's episode counters) are its own to
check.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import random
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from lowbit.checkpoint import ALIASES_KEY, read_safetensors, write_safetensors
from lowbit.errors import CheckpointError, LowbitError
from lowbit.files import loads_json, temporary_path, write_text_atomic

NAME = "last"
META_KEY = "lowbit_qat"
DIGEST_KEY = "lowbit_qat_sha256"
FORMAT = 2  # 2: the header holds state_digest of the metadata and every tensor


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
    """Restore ``optimizer`` from a checkpoint's ``optim.*`` tensors and ``meta`` (its ``optimizer`` field), after
    checking them against the optimizer this run built: same type, the same groups with the same settings
    (values of the same kinds) and parameters, per-parameter state of each parameter's shape. Raises
    :class:`CheckpointError` naming the field. ``load`` puts the checked state in place (default
    ``optimizer.load_state_dict``; FSDP2 scatters it to the shards)."""
    if meta["type"] != type(optimizer).__name__:
        raise CheckpointError(f"checkpoint optimizer is {meta['type']}, this run builds {type(optimizer).__name__}")
    own = optimizer.state_dict()
    shapes = {}
    for own_group, group in zip(own["param_groups"], optimizer.param_groups):
        shapes.update({i: p.shape for i, p in zip(own_group["params"], group["params"])})
    groups = meta["param_groups"]
    if len(groups) != len(own["param_groups"]):
        raise CheckpointError(f"field optimizer.param_groups: {len(groups)} groups, this run's optimizer has "
                              f"{len(own['param_groups'])}")
    restored = []
    for i, (g, mine) in enumerate(zip(groups, own["param_groups"])):
        if set(g) != set(mine) or g["params"] != mine["params"] or \
                not all(_same_kind(mine[k], g[k]) for k in mine if k != "params"):
            raise CheckpointError(f"field optimizer.param_groups[{i}]: {dict(g)!r:.300} does not fit this run's "
                                  f"optimizer group ({sorted(mine)})")
        restored.append({k: tuple(v) if isinstance(mine[k], tuple) else v for k, v in g.items()})
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            fits = int(idx) in shapes and (v.numel() == 1 if name == "step" else v.shape == shapes[int(idx)])
            if not fits:
                raise CheckpointError(f"tensor {key}: shape {list(v.shape)} does not fit parameter {idx} of this run's "
                                      "optimizer")
            state.setdefault(int(idx), {})[name] = v
    for key, v in meta["scalars"].items():
        idx, _, name = key.partition(".")
        if not idx.isdigit() or int(idx) not in shapes or not name or not _is_number(v):
            raise CheckpointError(f"field optimizer.scalars.{key}: a number for a parameter of this run's optimizer, "
                                  f"got {v!r}")
        state.setdefault(int(idx), {})[name] = v
    (load or optimizer.load_state_dict)({"state": state, "param_groups": restored})


def _same_kind(mine, theirs) -> bool:
    """Whether a checkpoint's optimizer setting ``theirs`` can stand where this run has ``mine``."""
    if mine is None:
        return theirs is None or isinstance(theirs, bool)
    if isinstance(mine, bool):
        return isinstance(theirs, bool)
    if _is_number(mine):
        return _is_number(theirs) and np.isfinite(theirs)
    if isinstance(mine, (tuple, list)):
        return isinstance(theirs, list) and len(theirs) == len(mine) and all(map(_same_kind, mine, theirs))
    return type(theirs) is type(mine)


def _check_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]


def state_digest(text: str, tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the metadata ``text`` and of each tensor's name, dtype, shape and bytes (in name order)."""
    h = hashlib.sha256(text.encode("utf-8"))
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        h.update(f"\0{key}\0{t.dtype}\0{list(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_training_state(directory: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                        meta: dict, extra: dict[str, torch.Tensor] | None = None,
                        optimizer_state: dict | None = None) -> Path:
    """Write ``last.safetensors`` (+ ``last.json``) atomically; refuse non-finite tensors.

    ``extra`` adds tensors of the caller's own (a target network, a replay memory), under names
    that start with neither ``model.`` nor ``optim.``. ``optimizer_state``: the optimizer's state
    gathered from shards (FSDP2), in place of ``optimizer.state_dict()``."""
    path, side = checkpoint_paths(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt_tensors, opt_meta = optimizer_to_flat(optimizer, optimizer_state)
    tensors.update(opt_tensors)
    for key, value in (extra or {}).items():
        if key.startswith(("model.", "optim.")):
            raise ValueError(f"extra checkpoint tensor {key!r}: the prefixes model. and optim. are taken")
        tensors[key] = value
    bad = _check_finite(tensors)
    if bad:
        raise NonFiniteError(f"refusing to save a checkpoint at step {meta.get('step')}: non-finite values in "
                             f"{bad[:3]}{' ...' if len(bad) > 3 else ''}; the previous checkpoint is kept")
    meta = dict(meta, format=FORMAT, optimizer=opt_meta)
    text = json.dumps(_json_safe(meta), sort_keys=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    tmp = temporary_path(path)
    write_safetensors(tensors, tmp, metadata={META_KEY: text, DIGEST_KEY: state_digest(text, tensors)})
    with safe_open(str(tmp), "pt") as f:  # read back before publishing
        stored = set(f.keys()) | set(json.loads(f.metadata().get(ALIASES_KEY, "{}")))
        if stored != set(tensors) or json.loads(f.metadata()[META_KEY])["step"] != meta["step"]:
            raise CheckpointError(f"{tmp}: the checkpoint did not read back; the previous one is kept")
    os.replace(tmp, path)
    write_text_atomic(side, json.dumps(json.loads(text), indent=1, sort_keys=True) + "\n")
    return path


def load_training_state(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict] | None:
    """``(tensors, meta)`` of ``directory``'s last checkpoint, or None if there is none.

    Raises :class:`CheckpointError` naming the file and field for a damaged, edited or malformed
    checkpoint (see the module docstring); nothing is restored from it here.
    """
    path, _ = checkpoint_paths(directory)
    if not path.is_file():
        return None
    try:
        tensors, header = read_safetensors(path)
        text = header[META_KEY]
        meta = loads_json(text)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: not a lowbit training checkpoint ({exc}); delete it or "
                              "start without resume") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"{path}: checkpoint format {found!r} is not {FORMAT}; delete it or start without resume")
    if header.get(DIGEST_KEY) != state_digest(text, tensors):
        raise CheckpointError(f"{path}: its tensors or metadata do not match the digest in its header "
                              f"({DIGEST_KEY}): the file was damaged or edited; delete it or start without resume")
    check_training_meta(meta, tensors, str(path))
    return tensors, meta


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_training_meta(meta: dict, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Check the fields every training checkpoint has (step, config, the architecture fingerprint and the model
    tensors it lists, the optimizer's record) and, in a fine-tuning checkpoint (one with ``steps_per_epoch``:
    the fine-tuning loop refuses any other), every field the loop reads back. Raise a
    :class:`CheckpointError` naming the first bad field."""
    def need(ok: bool, field: str, rule: str):
        if not ok:
            raise CheckpointError(f"{where}: field {field}: {rule}, got {meta.get(field.split('.')[0])!r:.200}")

    integers = [("step", 0)]
    if "steps_per_epoch" in meta:
        integers += [("epoch", 0), ("total_steps", 0), ("steps_per_epoch", 1), ("world_size", 1)]
        need(isinstance(meta.get("history"), list) and all(isinstance(h, dict) for h in meta["history"]), "history",
             "a list of evaluation records")
        stats = meta.get("stats")
        need(isinstance(stats, dict) and set(stats) == {"epoch", "window"} and
             all(isinstance(v, list) and len(v) == 3 and all(_is_number(x) for x in v) for v in stats.values()),
             "stats", "{epoch: [3 numbers], window: [3 numbers]}")
        _check_rng(meta.get("rng"), where)
    for key, low in integers:
        need(_is_int(meta.get(key)) and meta[key] >= low, key, f"an integer >= {low}")
    need(isinstance(meta.get("config"), dict), "config", "the training settings as a mapping")
    opt = meta.get("optimizer")
    need(isinstance(opt, dict) and isinstance(opt.get("type"), str) and isinstance(opt.get("param_groups"), list)
         and all(isinstance(g, dict) for g in opt["param_groups"]) and isinstance(opt.get("scalars"), dict),
         "optimizer", "{type, param_groups, scalars}")
    fp = meta.get("fingerprint")
    detail = fp.get("architecture_detail") if isinstance(fp, dict) else None
    need(isinstance(detail, dict) and isinstance(detail.get("tensors"), dict) and
         fp.get("architecture") == digest(detail) and isinstance(fp.get("recipe"), str), "fingerprint",
         "the architecture and recipe digests with the detail they digest")
    model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    if set(model) != set(detail["tensors"]):
        raise CheckpointError(f"{where}: its model tensors {sorted(set(model) ^ set(detail['tensors']))[:4]} differ "
                              "from the architecture it records (field fingerprint.architecture_detail)")
    for k, t in model.items():
        if detail["tensors"][k] != f"{list(t.shape)} {str(t.dtype).removeprefix('torch.')}":
            raise CheckpointError(f"{where}: tensor model.{k} is {list(t.shape)} {t.dtype}, the architecture it "
                                  f"records says {detail['tensors'][k]}")
    bad = [k for k in tensors if k.startswith("optim.") and not (k.count(".") >= 2 and k.split(".")[1].isdigit())]
    if bad:
        raise CheckpointError(f"{where}: tensors {bad[:4]}: optimizer state is named optim.<parameter index>.<name>")


def _check_rng(state, where: str) -> None:
    """Check the RNG states by handing them to fresh generators (the global ones are untouched)."""
    try:
        raw = np.frombuffer(base64.b64decode(state["torch"], validate=True), dtype=np.uint8).copy()
        torch.Generator().set_state(torch.from_numpy(raw))
        version, internal, gauss = state["python"]
        random.Random().setstate((version, tuple(internal), gauss))
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.RandomState().set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
        if "cuda" in state:
            if not isinstance(state["cuda"], list):
                raise TypeError("cuda: a list of states")
            for s in state["cuda"]:
                base64.b64decode(s, validate=True)
    except (KeyError, TypeError, ValueError, RuntimeError, OverflowError, binascii.Error) as exc:
        raise CheckpointError(f"{where}: field rng: not the RNG states of torch, python and numpy "
                              f"({type(exc).__name__}: {exc})") from None


def model_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
