"""Full-precision training of the in-house language model (the zoo's ``bytellama``) from scratch.

A float baseline, like :mod:`lowbit.train` for the image models: AdamW (betas 0.9/0.95, weight
decay on matrices only), linear warm-up then cosine decay to ``final_lr``, gradient clipping,
next-token cross-entropy on shuffled non-overlapping windows of the train split of the corpora.
Every ``eval_every`` steps it measures perplexity on fixed windows of the calib split; at the end
on fixed windows of each corpus's test split (documents it never trained on). Seeded: the same
arguments give the same weights on CPU.
"""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

from lowbit.data.text import TokenWindows, eval_windows, load_text, tokenize
from lowbit.llm.evaluate import logits_of, perplexity
from lowbit.train import cosine_warmup, param_groups


@dataclass
class PretrainConfig:
    steps: int = 2000
    batch_size: int = 16
    length: int = 256
    lr: float = 3e-3
    final_lr: float = 3e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    corpora: tuple[str, ...] = ("shakespeare", "python-docs")
    eval_every: int = 250
    eval_windows: int = 32
    seed: int = 0

    def __post_init__(self):
        if min(self.steps, self.batch_size, self.eval_windows) < 1 or self.length < 2 or self.lr <= 0:
            raise ValueError(f"invalid pretraining config {self}: steps, batch_size, eval_windows >= 1, "
                             "length >= 2, lr > 0")


def pretrain(model: nn.Module, tokenizer, cfg: PretrainConfig, *, log=print, on_eval=None) -> dict:
    """Train ``model`` in place; returns metadata (tokens, seconds, calib and test perplexities).
    ``on_eval(step, model, meta)`` is called after each evaluation (e.g. to save the model so far)."""
    torch.manual_seed(cfg.seed)
    train = TokenWindows(tokenize(tokenizer, load_text(list(cfg.corpora), "train")), cfg.length, cfg.batch_size,
                         seed=cfg.seed)
    calib = eval_windows(tokenize(tokenizer, load_text(list(cfg.corpora), "calib")), cfg.length, cfg.eval_windows)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
    floor = cfg.final_lr / cfg.lr

    def rate(s: int) -> float:  # warm-up, then cosine from 1 to final_lr / lr
        shape = cosine_warmup(s, cfg.steps, cfg.warmup_steps)
        return shape if s < cfg.warmup_steps else floor + (1 - floor) * shape

    sched = torch.optim.lr_scheduler.LambdaLR(opt, rate)
    start, step, epoch, loss_sum, loss_steps, history = time.time(), 0, 0, 0.0, 0, []
    model.train()
    while step < cfg.steps:
        train.set_epoch(epoch)
        for ids in train:
            logits = logits_of(model, ids)[:, :-1]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            step += 1
            loss_sum, loss_steps = loss_sum + loss.item(), loss_steps + 1
            if step % cfg.eval_every == 0 or step == cfg.steps:
                ppl = perplexity(model, calib)
                rec = {"step": step, "train_loss": loss_sum / loss_steps, "calib_perplexity": ppl,
                       "seconds": round(time.time() - start, 1)}
                history.append(rec)
                loss_sum, loss_steps = 0.0, 0
                log(f"step {step}/{cfg.steps}: train loss {rec['train_loss']:.4f}, calib perplexity {ppl:.3f} "
                    f"({rec['seconds']:.0f} s, {step * cfg.batch_size * cfg.length / rec['seconds']:.0f} tokens/s)")
                if on_eval is not None:
                    on_eval(step, model, {"history": history})
            if step >= cfg.steps:
                break
        epoch += 1
    model.eval()
    test = {c: perplexity(model, eval_windows(tokenize(tokenizer, load_text(c, "test")), cfg.length, 64))
            for c in cfg.corpora}
    log("test perplexity (64 windows of %d tokens each): %s" % (cfg.length, ", ".join(f"{c} {p:.3f}"
                                                                                     for c, p in test.items())))
    return {"config": {**asdict(cfg), "corpora": list(cfg.corpora)}, "tokens": step * cfg.batch_size * cfg.length,
            "train_seconds": round(time.time() - start, 1), "history": history,
            "test_perplexity": test, "test_windows": {"count": 64, "length": cfg.length, "split": "test"},
            "parameters": sum(p.numel() for p in model.parameters()),
            "machine": f"{platform.machine()} {torch.get_num_threads()} thread(s)", "torch": torch.__version__}
