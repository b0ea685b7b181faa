"""``lowbit llm``: language models (quantize, finetune, eval, generate, export; train the in-house model).

    lowbit llm train --steps 2000 --out runs/bytellama.safetensors
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
from pathlib import Path

from lowbit.errors import LowbitError


def _command() -> str:
    return "lowbit " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def cmd_train(args) -> None:
    from lowbit.checkpoint import save_checkpoint
    from lowbit.llm.pretrain import PretrainConfig, pretrain
    from lowbit.zoo.language import bytellama_path, create_bytellama
    from lowbit.data.text import ByteTokenizer

    if args.into_zoo == (args.out is not None):
        raise LowbitError("give exactly one of --out PATH and --into-zoo (replaces the shipped bytellama)")
    out = bytellama_path() if args.into_zoo else Path(args.out)
    cfg = PretrainConfig(steps=args.steps, batch_size=args.batch_size, length=args.length, lr=args.lr,
                         seed=args.seed, corpora=tuple(args.corpora.split(",")))
    import torch
    torch.manual_seed(cfg.seed)
    model = create_bytellama()
    meta = {"model": "bytellama", "command": _command(), "date": datetime.date.today().isoformat()}

    def save_so_far(step, model, info):
        save_checkpoint(model, out, {**meta, "partial": True, "step": step, **info})

    result = pretrain(model, ByteTokenizer(), cfg, on_eval=save_so_far)
    save_checkpoint(model, out, {**meta, **result})
    print(f"saved {out}")


def register(subparsers) -> None:
    """Add ``lowbit llm ...`` to the ``lowbit`` parser."""
    llm = subparsers.add_parser("llm", help="language models: SiLQ quantization of Hugging Face causal LMs "
                                "(weights, activations, KV cache)")
    sub = llm.add_subparsers(dest="llm_command", required=True, metavar="LLM_COMMAND")

    sp = sub.add_parser("train", help="train the in-house byte-level Llama (the zoo's bytellama) from scratch")
    sp.add_argument("--steps", type=int, default=2000, help="optimizer steps (default 2000)")
    sp.add_argument("--batch-size", type=int, default=16, help="windows per step (default 16)")
    sp.add_argument("--length", type=int, default=256, help="tokens (bytes) per window (default 256)")
    sp.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    sp.add_argument("--corpora", default="shakespeare,python-docs", help="comma-separated corpora (train split)")
    sp.add_argument("--seed", type=int, default=0, help="seed of initialisation and data order (default 0)")
    sp.add_argument("--out", help="checkpoint path (.safetensors; a JSON sidecar is written beside it)")
    sp.add_argument("--into-zoo", action="store_true", help="replace the shipped bytellama (for maintainers)")
    sp.set_defaults(func=cmd_train)
