"""``lowbit llm``: language models, thin over :mod:`lowbit.llm.pipeline`.

    lowbit llm quantize --model bytellama --recipe ptq-w4a8kv8 --out runs/ptq        # calibrate, evaluate, save
    lowbit llm finetune --model bytellama --recipe silq-w4a8kv8 --checkpoint-dir runs/silq [--resume]
    lowbit llm eval     --model bytellama [--quantized runs/silq]                     # perplexity, KL, agreement
    lowbit llm generate --model bytellama --quantized runs/silq --prompt "ROMEO."
    lowbit llm export   --model bytellama --quantized runs/silq --out runs/silq-export   # packed deployment folder
    lowbit llm generate --model bytellama --export runs/silq-export --packed --prompt "ROMEO."
    lowbit llm train    --out runs/bytellama.safetensors                              # the in-house model

``--model`` is a zoo language model (bytellama, smollm2-135m, gemma3-270m) or a local Hugging Face folder.
Under ``torchrun``, ``finetune`` trains on every rank (DDP, or FSDP2 with the recipe's
``qat: {distributed: fsdp}``); rank 0 evaluates, prints and saves.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import shlex
import sys
from pathlib import Path

import torch

import lowbit
from lowbit.checkpoint import save_checkpoint
from lowbit.data.text import ByteTokenizer
from lowbit.errors import LowbitError
from lowbit.llm.generate import generate_text
from lowbit.llm.pipeline import TextSetup, evaluate_lm, finetune_lm, load_model, quantize_lm, windows
from lowbit.llm.pretrain import PretrainConfig, pretrain
from lowbit.qat.config import FinetuneConfig
from lowbit.recipe import load_recipe
from lowbit.zoo.language import bytellama_path, create_bytellama


def _command() -> str:
    return "lowbit " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _text(args):
    return TextSetup(corpora=tuple(args.corpora.split(",")), length=args.length, calib_windows=args.calib_windows,
                     eval_windows=args.eval_windows, data=getattr(args, "data", "corpus"))


def _models(args):
    """The float model and tokenizer, and the model to run: the ``--quantized`` checkpoint or the ``--export``
    folder (its packed int4/int8 layers with ``--packed``), else the float one."""
    model, tokenizer = load_model(args.model, args.weights)
    if args.quantized and args.export:
        raise LowbitError("give at most one of --quantized and --export")
    if args.packed and not args.export:
        raise LowbitError("--packed runs an export folder: give --export DIR")
    if args.export:
        return model, tokenizer, lowbit.load_export(args.export, model=model, packed="int4" if args.packed else None)
    run = lowbit.load(args.quantized, model=copy.deepcopy(model)) if args.quantized else model
    return model, tokenizer, run


def _report(name: str, metrics: dict) -> str:
    extra = f", KL {metrics['kl']:.4f}, agreement {metrics['agreement']:.2f}%" if "kl" in metrics else ""
    return f"{name}: perplexity {metrics['perplexity']:.3f}{extra}"


def _windows_note(text) -> str:
    return (f"{text.eval_windows} fixed windows of {text.length} tokens of the test split of "
            f"{', '.join(text.corpora)}")


def cmd_quantize(args) -> None:
    model, tokenizer = load_model(args.model, args.weights)
    text = _text(args)
    qmodel = quantize_lm(model, tokenizer, args.recipe, text)
    print(lowbit.summary(qmodel))
    if args.evaluate:
        print(_windows_note(text))
        print(_report("float", evaluate_lm(model, tokenizer, text)))
        print(_report("quantized", evaluate_lm(qmodel, tokenizer, text, teacher=model)))
    if args.out:
        lowbit.save(qmodel, args.out, model_name=args.model, extra={"command": _command()})
        print(f"saved {args.out} (reload with lowbit.load or --quantized)")


def cmd_finetune(args) -> None:
    recipe = load_recipe(args.recipe)
    cfg = FinetuneConfig.from_recipe(recipe, lr=args.lr, batch_size=args.batch_size, max_steps=args.max_steps,
                                     max_tokens=args.max_tokens, seed=args.seed, progress=args.progress,
                                     compile_quantizers=args.compile_quantizers)
    model, tokenizer = load_model(args.model, args.weights)
    text = _text(args)
    name = recipe.sections.get("name") or Path(str(args.recipe)).stem
    folder = Path(args.checkpoint_dir or Path("lowbit-llm") / f"{args.model}-{name}")
    qmodel = quantize_lm(model, tokenizer, recipe, text)
    result = finetune_lm(qmodel, model, tokenizer, text, config=cfg, checkpoint_dir=folder, resume=args.resume)
    if result["rank"] != 0:
        return
    metrics = evaluate_lm(qmodel, tokenizer, text, teacher=model)
    print(_windows_note(text))
    print(_report("fine-tuned", metrics))
    lowbit.save(qmodel, folder, model_name=args.model,
                extra={"command": _command(), "recipe_name": name, "qat": cfg.to_dict(), "steps": result["steps"],
                       "tokens": result["tokens"], "test": metrics})
    print(f"saved {folder} ({result['steps']} steps, {result['tokens']:,} tokens; reload with --quantized)")


def cmd_eval(args) -> None:
    model, tokenizer, run = _models(args)
    text = _text(args)
    metrics = evaluate_lm(run, tokenizer, text, teacher=model if run is not model else None, split=args.split)
    print(f"{text.eval_windows} fixed windows of {text.length} tokens of the {args.split} split of "
          f"{', '.join(text.corpora)}")
    label = ("packed export" if args.packed else "export") if args.export else \
        "quantized" if args.quantized else "float"
    print(_report(label, metrics))
    if args.json:
        print(json.dumps(metrics, sort_keys=True))


def cmd_generate(args) -> None:
    _, tokenizer, run = _models(args)
    out = generate_text(run, tokenizer, args.prompt, args.max_new_tokens, sample=args.sample, seed=args.seed)
    print(out["prompt"] + out["text"])
    print(f"[{out['new_tokens']} tokens, {out['tokens_per_second']:.1f} tokens/s]", file=sys.stderr)


def cmd_export(args) -> None:
    model, tokenizer = load_model(args.model, args.weights)
    text = _text(args)
    if args.quantized:
        qmodel = lowbit.load(args.quantized, model=copy.deepcopy(model))
    else:
        qmodel = quantize_lm(model, tokenizer, args.recipe, text)
    folder = lowbit.export(qmodel, args.out)
    manifest = json.loads((folder / "manifest.json").read_text())
    size = (folder / "model.safetensors").stat().st_size
    fp32 = sum(t.numel() * 4 for t in model.state_dict().values())
    print(f"wrote {folder}: model.safetensors {size:,} bytes ({manifest['sizes']['weight_bytes']:,} bytes of "
          f"integer weights), fp32 state dict {fp32:,} bytes ({fp32 / size:.2f}x larger)")
    if args.verify:
        ids = windows(tokenizer, text, "calib", 1)
        with torch.no_grad():
            expected = qmodel.eval()(ids).logits
            got = lowbit.load_export(folder, model=model)(ids).logits
        same = torch.equal(expected, got)
        print(f"reloaded export vs quantized model on one calib window: "
              f"{'bit-identical logits' if same else f'max |logit difference| {(expected - got).abs().max():.3g}'}")
        if not same:
            raise LowbitError(f"{folder}: the reloaded export differs from the quantized model")


def cmd_train(args) -> None:
    if args.into_zoo == (args.out is not None):
        raise LowbitError("give exactly one of --out PATH and --into-zoo (replaces the shipped bytellama)")
    out = bytellama_path() if args.into_zoo else Path(args.out)
    cfg = PretrainConfig(steps=args.steps, batch_size=args.batch_size, length=args.length, lr=args.lr,
                         seed=args.seed, corpora=tuple(args.corpora.split(",")))
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

    def model_args(sp, quantized: bool = False):
        sp.add_argument("--model", default="bytellama", help="zoo language model (bytellama, smollm2-135m, "
                        "gemma3-270m) or a local Hugging Face folder (default: bytellama)")
        sp.add_argument("--weights", help="bytellama weights to load instead of the shipped ones")
        if quantized:
            sp.add_argument("--quantized", help="a folder saved by `lowbit llm quantize/finetune` (default: the "
                            "float model)")
            sp.add_argument("--export", help="a folder written by `lowbit llm export` (lowbit.export) to run "
                            "instead, loaded into --model's architecture")
            sp.add_argument("--packed", action="store_true", help="with --export: run the packed int4/int8 CPU "
                            "kernels (lowbit.load_export(..., packed='int4')) instead of the fake-quant layers")

    def text_args(sp):
        sp.add_argument("--corpora", default="shakespeare", help="comma-separated corpora: shakespeare, "
                        "python-docs, stdlib (default: shakespeare)")
        sp.add_argument("--length", type=int, default=256, help="tokens per window (default 256)")
        sp.add_argument("--calib-windows", type=int, default=8, help="calib-split windows to calibrate on (default 8)")
        sp.add_argument("--eval-windows", type=int, default=16, help="fixed windows to evaluate on (default 16)")

    sp = sub.add_parser("quantize", help="calibrate a recipe on the calib split, evaluate on the test split, save")
    model_args(sp)
    text_args(sp)
    sp.add_argument("--recipe", default="ptq-w4a8kv8", help="recipe YAML path or shipped name (default ptq-w4a8kv8)")
    sp.add_argument("--evaluate", action=argparse.BooleanOptionalAction, default=True,
                    help="measure float and quantized perplexity on the test split (default: on)")
    sp.add_argument("--out", help="folder to save the quantized model in")
    sp.set_defaults(func=cmd_quantize)

    sp = sub.add_parser("finetune", help="SiLQ: quantize, fine-tune with next-token distillation from the float "
                        "model (resumable; torchrun for DDP/FSDP2), evaluate, save")
    model_args(sp)
    text_args(sp)
    sp.add_argument("--recipe", default="silq-w4a8kv8", help="recipe with a qat: section (default silq-w4a8kv8)")
    sp.add_argument("--data", choices=("corpus", "teacher"), default="corpus",
                    help="fine-tune on the train split of --corpora (default) or on text the float model generates")
    sp.add_argument("--max-tokens", type=int, help="token budget (overrides the recipe's)")
    sp.add_argument("--max-steps", type=int, help="stop after this many steps")
    sp.add_argument("--lr", type=float, help="override the recipe's learning rate (weights)")
    sp.add_argument("--batch-size", type=int, help="windows per step (overrides the recipe's)")
    sp.add_argument("--seed", type=int, help="override the recipe's seed")
    sp.add_argument("--checkpoint-dir", help="checkpoints, metrics.jsonl and the fine-tuned model "
                    "(default lowbit-llm/MODEL-RECIPE)")
    sp.add_argument("--resume", action="store_true", help="continue from the checkpoint in --checkpoint-dir")
    sp.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                    help="progress bar (default: when stderr is a terminal)")
    sp.add_argument("--compile-quantizers", action=argparse.BooleanOptionalAction, default=None,
                    help="fake-quant compiled by torch.compile (qat.compile_quantizers; same values, a faster step "
                         "after tens of seconds of compiling)")
    sp.set_defaults(func=cmd_finetune)

    sp = sub.add_parser("eval", help="perplexity (and KL, agreement against the float model) on fixed windows")
    model_args(sp, quantized=True)
    text_args(sp)
    sp.add_argument("--split", choices=("test", "calib"), default="test", help="held-out split (default test)")
    sp.add_argument("--json", action="store_true", help="also print the metrics as one JSON line")
    sp.set_defaults(func=cmd_eval)

    sp = sub.add_parser("generate", help="continue a prompt; prints tokens/s")
    model_args(sp, quantized=True)
    sp.add_argument("--prompt", required=True, help="text to continue")
    sp.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    sp.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    sp.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    sp.set_defaults(func=cmd_generate)

    sp = sub.add_parser("export", help="write a quantized model as a deployment folder: packed integer weights, "
                        "activation and KV-cache steps (lowbit.export)")
    model_args(sp)
    text_args(sp)
    sp.add_argument("--quantized", help="a folder saved by `lowbit llm quantize/finetune` to export (default: "
                    "quantize --model with --recipe, calibrated on the calib split)")
    sp.add_argument("--recipe", default="ptq-w4a8kv8", help="recipe YAML path or shipped name when --quantized is "
                    "not given (default ptq-w4a8kv8)")
    sp.add_argument("--out", required=True, help="the export folder to write")
    sp.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                    help="reload the folder and check its logits equal the quantized model's on one calib window "
                    "(default: on)")
    sp.set_defaults(func=cmd_export)

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
