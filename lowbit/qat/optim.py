"""Parameter groups and the optimizer of the fine-tuning loop.

Groups (each carries a ``name`` and an ``lr_mult`` the schedule multiplies in):

- ``weights``: conv/linear weights (``ndim > 1``), decayed with ``weight_decay`` (the FP
  trainer's rule, :func:`lowbit.train.param_groups`);
- ``no_decay``: biases and batch-norm scales/shifts;
- ``quant_lsq`` (and other learned steps): LSQ steps, ``lr * quantizer_lr_mult``, decay
  ``quantizer_weight_decay`` (0 by default: ALGORITHMS.md 4.6, decay must not touch ``s``);
- ``quant_pact``: PACT clips ``alpha``, ``lr * quantizer_lr_mult``, L2 = the quantizer's own
  ``weight_decay`` (the paper's lambda_alpha; ALGORITHMS.md 1.4), one group per distinct value.

Quantizer parameters are found by module (the parameters a :class:`~lowbit.quant.base.Quantizer`
owns directly), never by shape: per-channel or per-group steps have ``ndim >= 1``.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.qat.config import FinetuneConfig
from lowbit.quant.base import Quantizer
from lowbit.quant.lsq import MIN_STEP
from lowbit.quant.pact import MIN_ALPHA


def quantizer_parameters(model: nn.Module) -> list[tuple[str, Quantizer, str, nn.Parameter]]:
    """``(module name, quantizer, parameter name, parameter)`` of every learned quantizer parameter."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, Quantizer):
            for pname, p in m.named_parameters(recurse=False):
                if p.requires_grad:
                    out.append((name, m, pname, p))
    return out


def param_groups(model: nn.Module, cfg: FinetuneConfig) -> list[dict]:
    """The optimizer's parameter groups (see the module docstring); empty groups are left out."""
    quant = quantizer_parameters(model)
    quant_ids = {id(p) for *_, p in quant}
    weights, no_decay = [], []
    seen = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in quant_ids or id(p) in seen:
            continue
        seen.add(id(p))
        (weights if p.ndim > 1 else no_decay).append(p)
    groups = [{"name": "weights", "params": weights, "weight_decay": cfg.weight_decay, "lr_mult": 1.0},
              {"name": "no_decay", "params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0}]
    by_key: dict[tuple[str, float], list] = {}
    for _, q, pname, p in quant:
        if id(p) in seen:
            continue
        seen.add(id(p))
        if q.method == "pact" and pname == "alpha":
            wd = cfg.pact_weight_decay if cfg.pact_weight_decay is not None else float(q.weight_decay)
            key = ("quant_pact", wd)
        else:
            key = (f"quant_{q.method}", cfg.quantizer_weight_decay)
        by_key.setdefault(key, []).append(p)
    for (gname, wd), params in by_key.items():
        same = [k for k in by_key if k[0] == gname]
        label = gname if len(same) == 1 else f"{gname}_wd{wd:g}"
        groups.append({"name": label, "params": params, "weight_decay": wd, "lr_mult": cfg.quantizer_lr_mult})
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)


@torch.no_grad()
def clamp_quantizer_parameters(model: nn.Module) -> None:
    """Keep learned steps and clips positive after an update (ALGORITHMS.md 1.6, 4.6)."""
    for _, q, pname, p in quantizer_parameters(model):
        if q.method == "pact" and pname == "alpha":
            p.clamp_(min=MIN_ALPHA)
        elif q.method == "lsq" and pname == "scale":
            p.clamp_(min=MIN_STEP)
        elif q.method == "lsq" and pname == "zero_point":
            p.clamp_(min=q.qmin, max=q.qmax)
