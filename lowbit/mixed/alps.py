"""ALPS: Accuracy-aware Layer Precision Selection (Bablani et al., arXiv:2301.13330; ALGORITHMS.md 6.3).

For each candidate layer ``l`` and each lower precision ``p``:

    model_l = copy(base); layer l -> p (fresh weight step from the weights, fresh activation
              step calibrated on the calibration data); fine-tune `steps` steps; measure accuracy

and the base itself (every candidate at the high precision) gets the same fine-tune, so
that the fine-tuning's own improvement cancels out:

    drop_l(p) = acc(base, fine-tuned) - acc(model_l at p, fine-tuned)
    gain_l(p) = drop_l(lowest) - drop_l(p)           # accuracy kept by not going to the lowest

(two precisions: ``gain_l(high) = drop_l(low)``, the accuracy lost by lowering ``l``).
``base``: a quantized model at the high precision (e.g. LSQ fine-tuned) or, by default, the
float model quantized with the space's all-high recipe. Accuracy is measured on ``eval_data``
(use held-out training images, e.g. the ``calib`` split, never the test set): top-1 by default,
or ``score(model, eval_data)`` for a model without labels (an encoder: the mean cosine of its
sentence embeddings to the float model's, as ``benchmarks/mixed_pretrained.py`` does for MiniLM;
higher is better, in any unit).

The paper fine-tunes one epoch per layer; here ``steps`` sets the budget (the cost is
``(1 + L (P - 1)) * steps`` fine-tuning steps for L candidates and P precisions).

Runs are independent: ``shard=(i, n)`` (or ``"i/n"``, 0-based) runs every n-th of them, so
n processes share the work; each run's result is one JSON file under
``cache_dir/alps-<key>/``, where the key hashes the float (and base) model's tensors, the search
space (recipe, candidates, precisions), the fine-tuning settings and step budget, the seed and
the data. A rerun with the same key reads the files and trains nothing; a run with every
shard's files present returns the gains.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import RecipeError
from lowbit.evaluate import evaluate
from lowbit.files import write_text_atomic
from lowbit.mixed.cost import Precision, precision_label
from lowbit.mixed.tune import frozen_teacher, short_finetune, step_config
from lowbit.prepare import build_quantizer, forward_batch, quantize

BASE = "base"


def default_cache_dir() -> Path:
    return Path(os.environ.get("LOWBIT_CACHE_DIR", "~/.cache/lowbit")).expanduser() / "alps"


def parse_shard(shard) -> tuple[int, int] | None:
    """``None``, ``(i, n)`` or ``"i/n"`` (0 <= i < n) -> ``(i, n)``."""
    if shard is None:
        return None
    if isinstance(shard, str):
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", shard)
        if not m:
            raise RecipeError(f"a shard is written 'i/n' (this process runs part i of n, 0 <= i < n), got {shard!r}")
        shard = (int(m[1]), int(m[2]))
    i, n = shard
    if n < 1 or not 0 <= i < n:
        raise RecipeError(f"shard {i}/{n}: need n >= 1 and 0 <= i < n (parts are numbered from 0)")
    return i, n


def _hash_tensors(h, tensors: dict) -> None:
    for k in sorted(tensors):
        t = tensors[k]
        h.update(k.encode())
        if isinstance(t, torch.Tensor):
            t = t.detach().cpu().contiguous()
            h.update(str((t.dtype, tuple(t.shape))).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def data_fingerprint(data) -> str:
    """A short hash of a loader: its images, labels and settings for a TensorLoader, else its
    length and first batch (tensors, tuples of them, or a tokenizer's dict of them)."""
    if data is None:
        return "none"
    h = hashlib.blake2b(digest_size=12)
    if hasattr(data, "images") and hasattr(data, "labels"):
        _hash_tensors(h, {"images": data.images, "labels": data.labels})
        h.update(json.dumps({k: getattr(data, k, None) for k in ("batch_size", "shuffle", "augment", "pad", "seed",
                                                                "mean", "std", "drop_last", "flip")},
                            sort_keys=True, default=str).encode())
    else:
        h.update(str(len(data) if hasattr(data, "__len__") else "?").encode())
        first = next(iter(data))
        parts = first if isinstance(first, (tuple, list)) else [first]
        for i, part in enumerate(parts):  # a tokenizer's batch is a dict of tensors
            _hash_tensors(h, {f"{i}.{k}": t for k, t in part.items()} if isinstance(part, dict) else {str(i): part})
    return h.hexdigest()


def model_fingerprint(model: nn.Module | None) -> str:
    if model is None:
        return "none"
    h = hashlib.blake2b(digest_size=12)
    _hash_tensors(h, model.state_dict())
    return h.hexdigest()


@dataclass
class ALPSResult:
    """ALPS's measurements and gains; ``complete`` is False while some shard's runs are missing."""

    base_accuracy: float | None
    accuracies: dict[str, dict[str, float]]       # layer -> precision label -> accuracy
    gains: dict[str, list[float]]                 # layer -> gain per space.precisions (complete only)
    steps_per_run: int
    runs: int                                     # runs the method needs
    steps_total: int                              # fine-tuning steps of all runs
    seconds_total: float                          # seconds of all runs (including ones read from the cache)
    trained_now: int                              # runs trained by this call
    complete: bool
    missing: list[str] = field(default_factory=list)
    cache_dir: str | None = None
    lowest: str = ""                              # label of the lowest precision

    def drops(self) -> dict[str, float]:
        """Accuracy lost by lowering each layer alone to the lowest precision."""
        if self.base_accuracy is None:
            return {}
        return {n: self.base_accuracy - by[self.lowest] for n, by in self.accuracies.items() if self.lowest in by}


class ALPS:
    """Runs (and caches) short fine-tunes of the base with some layers lowered."""

    def __init__(self, model: nn.Module, space, train_data, eval_data: Iterable, *, steps: int = 100,
                 calib_data: Iterable | None = None, base_model: nn.Module | None = None,
                 cache_dir: str | os.PathLike | None | bool = None, config=None, seed: int = 0,
                 eval_batches: int | None = None, calib_batches: int = 4,
                 score: Callable[[nn.Module, Iterable], float] | None = None, log=print):
        if steps < 0:
            raise RecipeError(f"ALPS steps must be >= 0, got {steps}")
        self.model, self.space, self.train_data, self.eval_data = model, space, train_data, eval_data
        self.steps, self.calib_data, self.base_model, self.seed = steps, calib_data, base_model, seed
        self.eval_batches, self.calib_batches, self.score, self.log = eval_batches, calib_batches, score, log
        self.config = step_config(space.recipe, max(1, steps), train_data, config=config, seed=seed)
        self._base_q = None
        self._teacher = None
        if cache_dir is False:
            self.dir = None
        else:
            root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
            self.dir = root / f"alps-{self.key()}"

    # ----- cache ---------------------------------------------------------------------------
    def key(self) -> str:
        h = hashlib.blake2b(digest_size=10)
        score = {"score": getattr(self.score, "__qualname__", repr(self.score))} if self.score else {}
        h.update(json.dumps({"model": model_fingerprint(self.model), "base": model_fingerprint(self.base_model),
                             "space": self.space.fingerprint(), "steps": self.steps,
                             "config": self.config.to_dict(), "seed": self.seed, "eval_batches": self.eval_batches,
                             "calib_batches": self.calib_batches, "train": data_fingerprint(self.train_data),
                             "eval": data_fingerprint(self.eval_data), "calib": data_fingerprint(self.calib_data),
                             **score},
                            sort_keys=True, default=str).encode())
        return h.hexdigest()

    @staticmethod
    def task_name(lowered: dict[str, Precision]) -> str:
        if not lowered:
            return BASE
        return "+".join(f"{n}@{precision_label(p)}" for n, p in sorted(lowered.items()))

    def _path(self, name: str) -> Path | None:
        if self.dir is None:
            return None
        safe = re.sub(r"[^A-Za-z0-9_.@+-]", "_", name)
        if len(safe) > 120:
            safe = "combo-" + hashlib.blake2b(name.encode(), digest_size=10).hexdigest()
        return self.dir / f"{safe}.json"

    def cached(self, name: str) -> dict | None:
        path = self._path(name)
        if path is None or not path.is_file():
            return None
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return entry if entry.get("task") == name else None

    def _store(self, name: str, entry: dict) -> None:
        path = self._path(name)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        manifest = path.parent / "manifest.json"
        if not manifest.exists():
            write_text_atomic(manifest, json.dumps({"space": self.space.fingerprint(), "steps": self.steps,
                                                    "config": self.config.to_dict(), "seed": self.seed}, indent=1))
        write_text_atomic(path, json.dumps(entry, indent=1, sort_keys=True))

    # ----- runs ----------------------------------------------------------------------------
    def base_qmodel(self) -> nn.Module:
        if self._base_q is None:
            if self.base_model is not None:
                self._base_q = self.base_model
            else:
                torch.manual_seed(self.seed)
                recipe = self.space.recipe_for(self.space.uniform(self.space.highest))
                self._base_q = quantize(self.model, recipe, calib_data=self.calib_data,
                                               calib_batches=self.calib_batches)
        return self._base_q

    def teacher(self) -> nn.Module:
        if self._teacher is None:
            self._teacher = frozen_teacher(self.model)
        return self._teacher

    def lowered_model(self, lowered: dict[str, Precision]) -> nn.Module:
        """A copy of the base with each layer of ``lowered`` at its precision (fresh steps)."""
        qm = copy.deepcopy(self.base_qmodel())
        for name, p in lowered.items():
            layer = qm.get_submodule(name)
            w_spec, a_spec = self.space.specs[name]
            wq = build_quantizer({**w_spec, "bits": p[0]}, "weight", name, layer)
            wq.init_from(layer.weight.detach())
            aq = build_quantizer({**a_spec, "bits": p[1]}, "activation", name, layer)
            layer.weight_quantizer, layer.input_quantizer = wq, aq
            self._calibrate(qm, aq)
        return qm

    @torch.no_grad()
    def _calibrate(self, qm: nn.Module, q) -> None:
        data = self.calib_data if self.calib_data is not None else self.train_data
        was = qm.training
        qm.eval()
        q.reset_stats()
        q.calibrating = True
        try:
            for i, batch in enumerate(data):
                if i >= self.calib_batches:
                    break
                forward_batch(qm, batch)
        finally:
            q.calibrating = False
            qm.train(was)
        q.finalize()

    def measure(self, lowered: dict[str, Precision]) -> dict:
        """Accuracy after the short fine-tune of the base with ``lowered`` layers (cached)."""
        name = self.task_name(lowered)
        entry = self.cached(name)
        if entry is not None:
            return entry
        start = time.perf_counter()
        torch.manual_seed(self.seed)
        qm = self.lowered_model(lowered)
        result = short_finetune(qm, self.train_data, self.steps, recipe=self.space.recipe, teacher=self.teacher(),
                                config=self.config, seed=self.seed)
        acc = (evaluate(qm, self.eval_data, max_batches=self.eval_batches)["top1"] if self.score is None
               else float(self.score(qm, self.eval_data)))
        entry = {"task": name, "accuracy": acc, "steps": int(result.get("steps", 0)),
                 "seconds": round(time.perf_counter() - start, 3), "trained": True}
        self._store(name, entry)
        self.log(f"alps {name}: accuracy {acc:.2f}% ({entry['steps']} steps, {entry['seconds']:.1f} s)")
        return entry

    def tasks(self) -> list[dict[str, Precision]]:
        out: list[dict[str, Precision]] = [{}]
        for n in self.space.candidates:
            for p in self.space.precisions[1:]:
                out.append({n: p})
        return out

    def run(self, shard=None) -> ALPSResult:
        """Run this shard's share of the runs (all of them without ``shard``); gather what exists."""
        shard = parse_shard(shard)
        tasks = self.tasks()
        entries: dict[str, dict] = {}
        trained = 0
        for k, lowered in enumerate(tasks):
            name = self.task_name(lowered)
            entry = self.cached(name)
            if entry is None and (shard is None or k % shard[1] == shard[0]):
                entry = dict(self.measure(lowered))
                trained += 1
            if entry is not None:
                entries[name] = entry
        missing = [self.task_name(t) for t in tasks if self.task_name(t) not in entries]
        base = entries.get(BASE, {}).get("accuracy")
        accuracies: dict[str, dict[str, float]] = {n: {} for n in self.space.candidates}
        for lowered in tasks[1:]:
            (n, p), = lowered.items()
            e = entries.get(self.task_name(lowered))
            if e is not None:
                accuracies[n][precision_label(p)] = e["accuracy"]
        gains = {}
        if not missing:
            low = precision_label(self.space.lowest)
            for n in self.space.candidates:
                acc = {precision_label(self.space.highest): base, **accuracies[n]}
                gains[n] = [acc[precision_label(p)] - acc[low] for p in self.space.precisions]
        return ALPSResult(base, accuracies, gains, self.steps, len(tasks), len(tasks) * self.steps,
                          round(sum(e.get("seconds", 0.0) for e in entries.values()), 3), trained, not missing,
                          missing, str(self.dir) if self.dir is not None else None,
                          precision_label(self.space.lowest))

    def measure_assignment(self, assignment: dict) -> float:
        """Accuracy of an assignment measured the ALPS way (for :func:`~lowbit.mixed.knapsack.additivity_check`)."""
        lowered = {n: p for n, p in assignment.items() if tuple(p) != self.space.highest}
        return self.measure(lowered)["accuracy"]


def run_alps(model: nn.Module, space, train_data, eval_data: Iterable, *, steps: int = 100, shard=None,
             **options) -> ALPSResult:
    """ALPS gains of ``space``'s candidates (see the module docstring); options as :class:`ALPS`."""
    return ALPS(model, space, train_data, eval_data, steps=steps, **options).run(shard)


def alps_gains(result: ALPSResult) -> dict[str, list[float]]:
    if not result.complete:
        raise RecipeError(f"ALPS is missing {len(result.missing)} of {result.runs} runs (e.g. "
                          f"{result.missing[:3]}); run the remaining shards (--shard i/n) with the same settings "
                          f"and cache folder {result.cache_dir}, then run again without --shard")
    return result.gains
