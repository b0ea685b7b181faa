"""English sentences from the offline Python documentation, with the corpus's fixed document splits.

Sentence-embedding models are measured on held-out sentences: :func:`sentences` takes the prose
paragraphs of the ``python-docs`` corpus (:mod:`lowbit.data.text`; documents never cross splits),
cuts them into sentences and keeps those of 40 to 250 characters that start with a capital letter
and end with a full stop, then draws ``count`` of them with a fixed seed. Markup lines (directives,
tables, code, headings) are skipped. ``calib`` sentences calibrate and choose settings; ``test``
sentences are reported.

:func:`encode` turns sentences into the keyword batches a Hugging Face tokenizer returns.
"""

from __future__ import annotations

import re

import torch

from lowbit.data.text import documents
from lowbit.errors import DataError

PROSE = re.compile(r"^[A-Z][^*=`:|<>]{30,}$")  # a paragraph of plain prose, no reST markup
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentences(split: str, count: int, *, seed: int = 0, corpus: str = "python-docs") -> list[str]:
    """``count`` sentences of ``split`` (``train``, ``calib`` or ``test``), drawn with ``seed`` (module docstring).

    Raises :class:`~lowbit.errors.DataError` when the corpus is missing or holds fewer sentences.
    """
    pool = []
    for _, text in documents(corpus, split):
        for paragraph in text.split("\n\n"):
            paragraph = " ".join(paragraph.split())
            if not PROSE.match(paragraph):
                continue
            pool += [s for s in SENTENCE_END.split(paragraph) if 40 <= len(s) <= 250 and s[0].isupper()
                     and s.endswith(".")]
    if len(pool) < count:
        raise DataError(f"the {split} split of {corpus} holds {len(pool)} sentences, fewer than the {count} asked for")
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:count].tolist()
    return [pool[i] for i in order]


def encode(tokenizer, texts: list[str], *, batch_size: int = 32, max_length: int = 128) -> list[dict]:
    """Keyword batches (``input_ids``, ``attention_mask``, ...) of ``texts``, padded per batch, truncated at
    ``max_length`` tokens, in order."""
    return [dict(tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                           return_tensors="pt")) for i in range(0, len(texts), batch_size)]
