"""The peer in the language-model table: torchao's QAT on the same model, text, windows and budget.

Run in its own environment, where torchao 0.18 sits beside torch 2.13.0 (torchao is no lowbit
dependency); ``make torchao-venv`` builds it:

    PYTHONPATH=. .venv-torchao/bin/python benchmarks/torchao_peer.py --model smollm2-135m --steps 100

torchao's config: ``Int8DynamicActivationIntxWeightConfig(weight_dtype=int4, PerAxis(0), symmetric,
activations int8 per token, dynamic, asymmetric)`` through ``QATConfig`` (prepare: fake-quantized
Linear layers; convert: torchao's quantized tensors), on every Linear but ``lm_head``; the embedding
and lm_head stay float and no KV cache is quantized (torchao's QAT has none). Training: lowbit's own
loop (:func:`lowbit.finetune`, the same next-token KL to the float model, temperature 1, data order,
batch and steps as the SiLQ rows), AdamW at a constant 1e-5 (the setting the project brief measured
torchao with). Rows ``torchao-ptq`` (fake-quantized, before training), ``torchao-qat`` (after) and
``torchao-converted`` (after ``convert``) go to ``docs/results/llm.json``; benchmarks/llm.py renders them.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llm import SEED, TEXT, measured, save_row, section  # noqa: E402
from results_page import write_section  # noqa: E402

from lowbit.llm.pipeline import TextSetup, finetune_lm, load_model  # noqa: E402
from lowbit.qat.config import FinetuneConfig  # noqa: E402


def base_config():
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, MappingType, PerAxis

    return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerAxis(0),
                                                 weight_mapping_type=MappingType.SYMMETRIC,
                                                 act_mapping_type=MappingType.ASYMMETRIC)


def decoder_linears(module: torch.nn.Module, fqn: str) -> bool:
    return isinstance(module, torch.nn.Linear) and not fqn.endswith("lm_head")


def main() -> None:
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-5)
    args = ap.parse_args()
    torch.manual_seed(SEED)
    text = TextSetup(**{**TEXT[args.model].__dict__, "length": args.length})
    model, tokenizer = load_model(args.model)
    student = copy.deepcopy(model)
    start = time.perf_counter()
    quantize_(student, QATConfig(base_config(), step="prepare"), filter_fn=decoder_linears)
    base = {"model": args.model, "width": "w4a8", "batch": args.batch_size}
    save_row(f"{args.model}/torchao-ptq", {**base, "method": "torchao-ptq", "steps": 0, "tokens": 0,
                                           "minutes": round((time.perf_counter() - start) / 60, 1),
                                           **measured(student, tokenizer, text, model)})
    cfg = FinetuneConfig(epochs=1, batch_size=args.batch_size, optimizer="adamw", lr=args.lr, schedule="constant",
                         weight_decay=0.0, distill_weight=1.0, temperature=1.0, max_steps=args.steps,
                         log_every=max(1, args.steps // 10), seed=SEED, progress=False)
    start = time.perf_counter()
    result = finetune_lm(student, model, tokenizer, text, config=cfg, log=lambda s: print(s, flush=True))
    minutes = round((time.perf_counter() - start) / 60, 1)
    trained = {**base, "steps": result["steps"], "tokens": result["tokens"], "lr": args.lr, "minutes": minutes}
    save_row(f"{args.model}/torchao-qat/{args.steps}", {**trained, "method": "torchao-qat",
                                                        **measured(student, tokenizer, text, model)})
    quantize_(student, QATConfig(base_config(), step="convert"), filter_fn=decoder_linears)
    weight = student.get_submodule("model.layers.0.mlp.down_proj").weight  # what convert made of a Linear
    save_row(f"{args.model}/torchao-converted/{args.steps}", {**trained, "method": "torchao-converted",
                                                              "converted_weight": type(weight).__name__,
                                                              **measured(student, tokenizer, text, model)})
    from llm import load_rows
    write_section("llm", "Language models: SiLQ quantization-aware training", section(load_rows()), SEED)


if __name__ == "__main__":
    main()
