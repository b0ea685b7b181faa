"""Reproducible full-precision training of the reference models (the FP baselines).

Recipe: SGD with Nesterov momentum 0.9, cosine learning-rate decay to zero with one
epoch of linear warm-up, weight decay on conv/linear weights only, random 2-pixel
translation + horizontal flip. Seeded: the same arguments give the same weights on CPU.
"""

from __future__ import annotations

import math
import platform
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from lowbit.data.datasets import make_loader
from lowbit.evaluate import evaluate


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 256
    lr: float = 0.2
    weight_decay: float = 5e-4
    momentum: float = 0.9
    warmup_epochs: float = 1.0
    augment: bool = True
    seed: int = 0
    channels_last: bool = True

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"invalid training config {self}: epochs/batch_size >= 1, lr > 0, weight_decay >= 0")


def cosine_warmup(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine from 1 to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay conv/linear weights (ndim > 1); leave biases and batch-norm parameters alone."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    other = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]


def train_fp(model: nn.Module, dataset: str, cfg: TrainConfig, *, data_dir=None, log=print) -> dict:
    """Train ``model`` in place on ``dataset``'s train split (files in ``data_dir``, default: the
    system location); returns a metadata dict."""
    torch.manual_seed(cfg.seed)
    train = make_loader(dataset, "train", cfg.batch_size, shuffle=True, augment=cfg.augment, seed=cfg.seed,
                        data_dir=data_dir)
    test = make_loader(dataset, "test", 1000, data_dir=data_dir)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    total, warm = cfg.epochs * len(train), int(cfg.warmup_epochs * len(train))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_warmup(s, total, warm))
    start = time.time()
    for epoch in range(cfg.epochs):
        model.train()
        train.set_epoch(epoch)
        loss_sum = n = 0
        for x, y in train:
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * y.numel()
            n += y.numel()
        log(f"epoch {epoch + 1}/{cfg.epochs} train loss {loss_sum / n:.4f} ({time.time() - start:.0f}s)")
    model = model.to(memory_format=torch.contiguous_format)
    metrics = evaluate(model, test)
    log(f"test top-1 {metrics['top1']:.2f}%")
    return {"dataset": dataset, "config": asdict(cfg), "test_top1": metrics["top1"], "test_top5": metrics["top5"],
            "test_loss": metrics["loss"], "train_seconds": round(time.time() - start, 1),
            "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
            "torch": torch.__version__}
