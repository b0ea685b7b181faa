"""The quantization-aware fine-tuning loop: :func:`finetune`.

    qmodel = lowbit.quantize(model, "lsq-w4a4", calib_data=calib)
    result = lowbit.finetune(qmodel, train_loader, eval_data=val_loader, teacher=model,
                             config=FinetuneConfig.from_recipe("lsq-w4a4"), checkpoint_dir="runs/lsq4")

One step: rate from the schedule, forward (fake-quantized; SAWB/min-max weight steps are
re-derived from the current weights), loss (cross-entropy, or mixed with distillation from
the teacher), a NaN/Inf check, backward, optional gradient clipping, the optimizer update,
learned steps/clips kept positive. Batch norm may be frozen after a number of epochs or
steps. Checkpoints every ``checkpoint_every`` steps, at each epoch end and at the end;
``resume=True`` continues from ``checkpoint_dir`` so that the end result is bit-identical to
an uninterrupted run (same seed, CPU). Under ``torchrun`` it trains with DDP
(:mod:`lowbit.qat.distributed`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from lowbit.checkpoint import load_into
from lowbit.errors import CheckpointError, RecipeError
from lowbit.files import write_text_atomic
from lowbit.prepare import calibrate, release_frozen_weights
from lowbit.progress import progress
from lowbit.qat import distributed as D
from lowbit.qat import fsdp as F
from lowbit.qat.batchnorm import BATCH_NORMS, reestimate_batchnorm
from lowbit.qat.config import BOOKKEEPING, FinetuneConfig
from lowbit.qat.distill import TeacherMismatchError
from lowbit.qat.objective import Objective, first_inputs, objective_for
from lowbit.qat.optim import build_optimizer, clamp_quantizer_parameters, set_lr
from lowbit.qat.schedule import LRSchedule
from lowbit.qat.state import (NonFiniteError, check_compatible, checkpoint_paths, fingerprint, load_training_state,
                               optimizer_from_flat,
                              model_tensors, rng_state, save_training_state, seed_everything, set_rng_state)
from lowbit.quant.base import Quantizer

METRICS_FILE = "metrics.jsonl"


def resolve_config(config, qmodel: nn.Module) -> FinetuneConfig:
    """``config`` as a :class:`FinetuneConfig`; None: the ``qat:`` section of the model's recipe."""
    if isinstance(config, FinetuneConfig):
        return config
    if isinstance(config, dict):
        return FinetuneConfig.from_dict(config)
    if config is None:
        report = getattr(qmodel, "lowbit_report", None)
        return FinetuneConfig.from_recipe(report.recipe) if report is not None else FinetuneConfig()
    raise TypeError(f"config must be a FinetuneConfig, a dict or None, got {type(config).__name__}")


def _set_epoch(data, epoch: int) -> None:
    for obj in (data, getattr(data, "sampler", None), getattr(data, "batch_sampler", None)):
        if obj is not None and hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)


def ensure_quantizers_initialized(model: nn.Module, data: Iterable, max_batches: int, log=print) -> int:
    """Calibrate the quantizers that never saw data, on the first ``max_batches`` training batches.

    LSQ steps and PACT clips must exist (with their final shapes) before the optimizer
    captures them. Quantizers already initialised keep their grids. Returns the batches used.
    """
    quantizers = [m for m in model.modules() if isinstance(m, Quantizer) and m.enabled]
    pending = [q for q in quantizers if not bool(q.initialized)]
    if not pending:
        return 0
    keep = {id(q): {k: v.clone() for k, v in q.state_dict().items()} for q in quantizers if bool(q.initialized)}
    _set_epoch(data, 0)
    n = calibrate(model, data, max_batches=max_batches)
    for q in quantizers:
        if id(q) in keep:
            q.load_state_dict(keep[id(q)])
    log(f"initialised {len(pending)} quantizer(s) that were not calibrated, on {n} training batch(es)")
    return n


def enable_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in the backward: Hugging Face's activation checkpointing
    (``gradient_checkpointing_enable`` before transformers 5.x), non-reentrant."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise RecipeError("qat.gradient_checkpointing needs a model that can checkpoint its blocks (a Hugging Face "
                          f"model); {type(model).__name__} cannot")


class _Run:
    def __init__(self, qmodel, train_data, eval_data, teacher, cfg: FinetuneConfig, checkpoint_dir, resume, log,
                 on_step, dist: D.DistInfo, objective: Objective):
        self.model, self.train_data, self.eval_data, self.teacher = qmodel, train_data, eval_data, teacher
        self.cfg, self.resume, self.on_step, self.dist = cfg, resume, on_step, dist
        self.objective = objective
        self.units = 0  # the objective's units (samples, tokens) trained on, over all ranks
        self.dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.main = dist.is_main
        self.log = log if self.main else (lambda *a, **k: None)
        self.writer = None
        self.last_saved: int | None = None

    # ----- setup ------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        try:
            self.steps_per_epoch = len(self.train_data)
        except TypeError:
            raise TypeError("train_data must have a length (batches per epoch), e.g. a TensorLoader or "
                            "DataLoader") from None
        if self.steps_per_epoch < 1:
            raise ValueError("train_data yields no batches")
        self.total = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps is not None:
            self.total = min(self.total, cfg.max_steps)
        if cfg.max_tokens is not None:
            if self.objective.unit != "tokens":
                raise RecipeError(f"qat.max_tokens: a budget in tokens needs a language model; this run counts "
                                  f"{self.objective.unit} (use max_steps)")
            per_step = self.objective.units(first_inputs(self.objective, self.train_data))
            self.total = min(self.total, max(1, math.ceil(cfg.max_tokens / per_step)))
        self.schedule = LRSchedule.from_config(cfg, self.steps_per_epoch, self.total)
        if cfg.freeze_bn_steps is not None:
            self.freeze_at = cfg.freeze_bn_steps
        elif cfg.freeze_bn_epochs is not None:
            self.freeze_at = int(round(cfg.freeze_bn_epochs * self.steps_per_epoch))
        else:
            self.freeze_at = None

        seed_everything(cfg.seed)
        self.device = D.device_for(self.dist, self.model)
        self.model.to(self.device)
        if self.teacher is not None:
            if self.teacher is self.model:
                raise TeacherMismatchError("the teacher must be the full-precision model, not the model being "
                                           "fine-tuned")
            self.teacher.to(self.device).eval()  # its outputs run under no_grad; it never trains
        released = release_frozen_weights(self.model)
        if released:
            self.log(f"fine-tuning re-quantizes the weights of {len(released)} bias-corrected layer(s) at every step "
                     f"(their frozen codes were released; bias correction is a post-training transform): "
                     f"{', '.join(released[:4])}{' ...' if len(released) > 4 else ''}")
        ensure_quantizers_initialized(self.model, self.train_data, cfg.calib_batches, self.log)
        if cfg.gradient_checkpointing:
            enable_checkpointing(self.model)

        self.step, self.history = 0, []
        self.stats = {"epoch": [0.0, 0.0, 0.0], "window": [0.0, 0.0, 0.0]}  # loss sum, correct, count
        loaded = None
        if self.resume:
            if self.dir is None:
                raise CheckpointError("resume=True needs a checkpoint_dir to resume from")
            loaded = load_training_state(self.dir)
            if loaded is None:
                self.log(f"no checkpoint in {self.dir}: starting from scratch")
        if loaded is not None:
            tensors, meta = loaded
            where = str(checkpoint_paths(self.dir)[0])
            check_compatible(meta, self.model, cfg.to_dict(), BOOKKEEPING, where)
            if meta.get("steps_per_epoch") != self.steps_per_epoch:
                raise CheckpointError(f"{where} was written with {meta.get('steps_per_epoch')} batches per epoch, "
                                      f"this training data has {self.steps_per_epoch}; resume with the same data "
                                      "and batch size")
            load_into(self.model, model_tensors(tensors))
        self.fsdp = self.dist.enabled and cfg.distributed == "fsdp"
        if self.fsdp:  # the optimizer holds the shards (lowbit.qat.fsdp)
            self.net = F.shard(self.model, self.dist, self.device)
        self.trained = self.net if self.fsdp else self.model  # the module whose parameters the optimizer updates
        self.optimizer = build_optimizer(self.trained, cfg)
        if loaded is not None:
            load = (lambda state: F.load_optimizer_state(self.net, self.optimizer, state)) if self.fsdp else None
            optimizer_from_flat(self.optimizer, tensors, meta["optimizer"], load=load)
            self.step, self.history = int(meta["step"]), list(meta.get("history", []))
            self.units = int(meta.get("units", 0))
            self.stats = meta.get("stats", self.stats)
            self.last_saved = self.step
            set_rng_state(meta["rng"])
            self._truncate_metrics(self.step)
            self.log(f"resumed from {where} at step {self.step}/{self.total} (epoch {meta['epoch'] + 1})")
            if meta.get("world_size", 1) != self.dist.world_size:
                self.log(f"note: the checkpoint was written by {meta.get('world_size', 1)} process(es), this run has "
                         f"{self.dist.world_size}: results match an uninterrupted run up to float rounding only")
        elif self.dir is not None and self.main:
            self.dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.dir / METRICS_FILE, "")
        if not self.fsdp:
            self.net = D.wrap(self.model, self.dist, self.device)
        D.check_same_everywhere({"config": cfg.to_dict(), "model": fingerprint(self.model),
                                 "batches_per_epoch": self.steps_per_epoch, "step": self.step}, self.dist)
        if self.dir is not None and self.main and cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # deferred: needs the optional tensorboard package
                self.writer = SummaryWriter(str(self.dir / "tensorboard"))
            except ImportError:
                self.writer = None

    # ----- bookkeeping ------------------------------------------------------------------
    def _truncate_metrics(self, step: int) -> None:
        """Drop log lines written after the checkpoint we resume from (they will be written again)."""
        if self.dir is None or not self.main:
            return
        path = self.dir / METRICS_FILE
        if path.is_file():
            keep = []
            for ln in path.read_text().splitlines():
                try:
                    if json.loads(ln)["step"] <= step:
                        keep.append(ln)
                except (ValueError, KeyError, TypeError):
                    pass  # a line cut short by the interruption
            write_text_atomic(path, "".join(ln + "\n" for ln in keep))

    def record(self, rec: dict) -> None:
        if self.dir is None or not self.main:
            return
        with open(self.dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
        if self.writer is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self.writer.add_scalar(f"{rec['kind']}/{k}", v, rec["step"])
            self.writer.flush()

    def _pull(self) -> None:
        """Under FSDP, gather the trained weights into the caller's plain model (every rank)."""
        if self.fsdp:
            F.pull(self.net, self.model)

    def save(self, epoch: int) -> None:
        if self.dir is None:
            return
        self._pull()
        optimizer_state = F.optimizer_state(self.net, self.optimizer) if self.fsdp else None  # collective
        if self.main:
            meta = {"step": self.step, "epoch": epoch, "total_steps": self.total,
                    "steps_per_epoch": self.steps_per_epoch, "config": self.cfg.to_dict(),
                    "schedule": self.schedule.state_dict(self.step), "rng": rng_state(),
                    "fingerprint": fingerprint(self.model), "history": self.history, "stats": self.stats,
                    "world_size": self.dist.world_size, "units": self.units}
            save_training_state(self.dir, self.model, self.optimizer, meta, optimizer_state=optimizer_state)
        self.last_saved = self.step

    def _global(self, key: str) -> tuple[float, float]:
        loss_sum, correct, n = D.all_reduce_sum(self.stats[key], self.dist, self.device)
        self.stats[key] = [0.0, 0.0, 0.0]
        return (loss_sum / n, 100.0 * correct / n) if n else (math.nan, math.nan)

    def _bn_mode(self) -> None:
        """Training mode, with batch norm in eval mode once the freeze point is reached."""
        self.net.train()
        if self.freeze_at is not None and self.step >= self.freeze_at:
            for m in self.trained.modules():
                if isinstance(m, BATCH_NORMS):
                    m.eval()

    # ----- one step ---------------------------------------------------------------------
    def _autocast(self):
        """bf16 autocast on the training device when ``cfg.autocast`` (a no-op context otherwise)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.autocast)

    def train_step(self, batch, epoch: int, index: int) -> dict:
        x, y = self.objective.split(batch)
        n_global, batch_units = x.shape[0], self.objective.units(x)
        x = D.shard(x, self.dist).to(self.device)
        y = D.shard(y, self.dist).to(self.device) if y is not None else None
        lr = self.schedule(self.step)
        set_lr(self.optimizer, lr)
        n_local = x.shape[0]
        if n_local == 0:  # fewer samples than ranks: no rank trains on this batch
            self.step += 1
            return {"loss": math.nan, "acc": math.nan, "lr": lr, "skipped": True}
        self.optimizer.zero_grad(set_to_none=True)
        value, correct, count = torch.zeros((), device=self.device), 0.0, 0
        scale = n_local * self.dist.world_size / n_global  # the gradient of the global-batch mean (distributed)
        chunks = min(self.cfg.grad_accum_steps, n_local)
        xs_all = torch.tensor_split(x, chunks)
        ys_all = torch.tensor_split(y, chunks) if y is not None else [None] * chunks
        for i, (xs, ys) in enumerate(zip(xs_all, ys_all)):
            with self._autocast(), D.gradient_sync(self.net, i == chunks - 1):
                loss, c, n = self.objective.loss(self.net, self.teacher, xs, ys, self.cfg, self.step == 0)
                weight = xs.shape[0] / n_local  # micro-batch means add up to the batch mean
                (loss * (weight * scale)).backward()  # a NaN loss too: every rank reaches the same all-reduce
            value, correct, count = value + loss.detach() * weight, correct + c, count + n
        if D.any_rank(not bool(torch.isfinite(value)), self.dist, self.device):
            self._fail(f"the loss became {value.item()} ", epoch, index, lr)
        if self.fsdp:
            F.average_replicated_grads(self.net, self.dist.world_size)
        if self.cfg.grad_clip is not None:
            if self.fsdp:
                F.clip_grad_norm(self.net.parameters(), self.cfg.grad_clip)
            else:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        clamp_quantizer_parameters(self.trained)
        self.step += 1
        self.units += batch_units
        for key in ("epoch", "window"):
            s = self.stats[key]
            s[0] += value.item() * count
            s[1] += correct
            s[2] += count
        return {"loss": value.item(), "acc": 100.0 * correct / count, "lr": lr}

    def _fail(self, what: str, epoch: int, index: int, lr: float):
        saved = (f"the last good checkpoint ({checkpoint_paths(self.dir)[0]}, step {self.last_saved}) is kept"
                 if self.dir is not None and self.last_saved is not None else "no checkpoint was written")
        raise NonFiniteError(f"{what}at step {self.step + 1} (epoch {epoch + 1}, batch {index + 1}); training "
                             f"stopped and {saved}. Lower the learning rate (now {lr:.3g}) or set grad_clip")

    # ----- the loop ---------------------------------------------------------------------
    def run(self) -> dict:
        cfg, start = self.cfg, time.time()
        self.units_at_start = self.units
        first_epoch, skip = divmod(self.step, self.steps_per_epoch)
        epoch = first_epoch
        for epoch in range(first_epoch, cfg.epochs):
            if self.step >= self.total:
                break
            _set_epoch(self.train_data, epoch)
            self._bn_mode()
            bar = progress(self.train_data, f"qat epoch {epoch + 1}/{cfg.epochs}",
                           enabled=cfg.progress if self.main else False)
            for index, batch in enumerate(bar):
                if epoch == first_epoch and index < skip:
                    continue  # already trained on before the interruption (iterated to keep the data order)
                if self.step >= self.total:
                    break
                if self.freeze_at is not None and self.step == self.freeze_at:
                    D.broadcast_buffers(self.trained, self.dist)  # every rank freezes rank 0's statistics
                    self._bn_mode()
                info = self.train_step(batch, epoch, index)
                rate = f"{self.units_per_second(start):.0f} {self.objective.unit}/s"
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{info['loss']:.4f}", acc=f"{info['acc']:.1f}", lr=f"{info['lr']:.3g}",
                                    speed=rate)
                if cfg.log_every and self.step % cfg.log_every == 0:
                    loss, acc = self._global("window")
                    unit = self.objective.unit
                    self.record({"kind": "step", "step": self.step, "epoch": epoch + 1, "loss": loss, "acc": acc,
                                 "lr": info["lr"], unit: self.units,
                                 f"{unit}_per_second": round(self.units_per_second(start), 1)})
                    self.log(f"step {self.step}/{self.total}: loss {loss:.4f}, {self.objective.acc_name} "
                             f"{acc:.2f}%, lr {info['lr']:.3g}, {rate}")
                at_end = self.step >= self.total or index == self.steps_per_epoch - 1
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and not at_end:
                    self.save(epoch)
                if self.on_step is not None:
                    self.on_step({"step": self.step, "epoch": epoch, "batch": index, "model": self.model, **info})
            if self.step >= self.total and cfg.bn_reestimate_batches:
                self.reestimate_bn(epoch)
            self.end_epoch(epoch, start)
        self.finish()
        last = self.history[-1] if self.history else {}
        return {"history": self.history, "metrics": last, "steps": self.step, "total_steps": self.total,
                self.objective.unit: self.units,
                "seconds": round(time.time() - start, 3), "config": cfg.to_dict(),
                "checkpoint": str(checkpoint_paths(self.dir)[0]) if self.dir is not None else None,
                "rank": self.dist.rank, "world_size": self.dist.world_size}

    def units_per_second(self, start: float) -> float:
        """Throughput of this run (since it started or resumed) in the objective's units."""
        return (self.units - self.units_at_start) / max(time.time() - start, 1e-9)

    def reestimate_bn(self, epoch: int) -> None:
        """Batch-norm statistics from the final weights (:mod:`lowbit.qat.batchnorm`). Every rank
        runs the same whole batches of the epoch's order, so all ranks get the same statistics."""
        _set_epoch(self.train_data, epoch)
        used = reestimate_batchnorm(self.model, (self.objective.split(b)[0] for b in self.train_data),
                                    self.cfg.bn_reestimate_batches)
        self._bn_mode()
        if used:
            self.log(f"re-estimated batch-norm statistics on {used} training batches")

    def end_epoch(self, epoch: int, start: float) -> None:
        loss, acc = self._global("epoch")
        rec = {"kind": "epoch", "step": self.step, "epoch": epoch + 1, "train_loss": loss, "train_acc": acc,
               "lr": self.schedule(max(0, self.step - 1)), "seconds": round(time.time() - start, 3)}
        self._pull()
        if self.eval_data is not None and self.main:
            rec.update(self.objective.evaluate(self.model, self.eval_data, self.teacher))
            self._bn_mode()
        # after the evaluation, which refreshes dynamic weight grids on rank 0: all ranks take rank 0's
        D.broadcast_buffers(self.model, self.dist)
        self.history.append(rec)
        self.record(rec)
        self.log(f"qat epoch {epoch + 1}/{self.cfg.epochs}: train loss {loss:.4f}, {self.objective.acc_name} "
                 f"{acc:.2f}%{self.objective.describe(rec)} (lr {rec['lr']:.3g}, {rec['seconds']:.0f}s)")
        self.save(epoch)

    def finish(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self._pull()
        self.model.eval()  # leaves every dynamic weight grid (SAWB, min-max) matching the final weights
        self.model.train()
        if self.last_saved != self.step:
            self.save(max(0, (self.step - 1) // self.steps_per_epoch))


def finetune(qmodel: nn.Module, train_data: Iterable, *, eval_data: Iterable | None = None,
             teacher: nn.Module | None = None, config: FinetuneConfig | dict | None = None,
             checkpoint_dir=None, resume: bool = False, log: Callable[[str], None] = print,
             on_step: Callable[[dict], None] | None = None, objective: Objective | None = None) -> dict:
    """Quantization-aware fine-tuning of ``qmodel`` (from :func:`lowbit.quantize`) in place.

    ``train_data``: ``(input, target)`` batches with a length (a seeded
    :class:`~lowbit.data.TensorLoader` gives reproducible order, needed for exact resume).
    ``eval_data``: evaluated after each epoch. ``teacher``: the full-precision model, for
    distillation (``config.distill_weight``, ``config.temperature``). ``config``: a
    :class:`FinetuneConfig`, a dict (a recipe's ``qat:`` section), or None for the ``qat:``
    section of the recipe ``qmodel`` was prepared with. ``checkpoint_dir``: where
    ``last.safetensors``/``last.json`` and ``metrics.jsonl`` go. ``resume``: continue from the
    checkpoint there. ``on_step``: called after every step with a dict (step, epoch, batch,
    loss, acc, lr, model). ``objective``: how batches are read and scored
    (:mod:`lowbit.qat.objective`); default: the one registered for this kind of model (next-token
    distillation for a causal language model, :mod:`lowbit.llm.objective`), else classification.

    Layers whose integer weight codes bias correction froze (``ptq-w4a4-aciq``) would not train:
    their codes are released first and their weights re-quantized at every step
    (:func:`lowbit.prepare.release_frozen_weights`, logged).

    Under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) every rank passes the same, global loader
    (not a ``DistributedSampler``): each batch is split across the ranks here.

    Returns ``{"history": [per-epoch records], "metrics": last record, "steps", ...}``.
    Raises :class:`~lowbit.qat.state.NonFiniteError` if the loss becomes NaN/Inf (the last
    good checkpoint is kept), :class:`~lowbit.errors.CheckpointError` when resuming from a
    checkpoint of another model, recipe or settings, and
    :class:`~lowbit.qat.distill.TeacherMismatchError` when the teacher's outputs do not
    match the student's.
    """
    cfg = resolve_config(config, qmodel)
    dist = D.setup()
    was_training = qmodel.training
    quantizers = [m for m in qmodel.modules() if isinstance(m, Quantizer)]
    try:
        for q in quantizers:
            q.fused = cfg.compile_quantizers
        run = _Run(qmodel, train_data, eval_data, teacher, cfg, checkpoint_dir, resume, log, on_step, dist,
                   objective_for(qmodel, objective))
        run.setup()
        result = run.run()
    finally:
        qmodel.train(was_training)
        for q in quantizers:
            q.fused = False
        D.teardown(dist)
    return result
