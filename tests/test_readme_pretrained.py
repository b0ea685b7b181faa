"""The README's "Pretrained models from the ecosystem" examples run as written, on small local weights: a
torchvision-layout MobileNetV2 state dict and a tiny BERT folder with its own tokenizer, made here."""

import pytest
import torch

from test_readme import blocks

transformers = pytest.importorskip("transformers")
SECTION = "Pretrained models from the ecosystem"
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "lists", "are", "mutable", "sequences", "a", "tuple", "is",
         "an", "immutable", "sequence", "the", "with", "statement", "wraps", "block", "in", "context", "manager", "."]


def write_local_weights(folder):
    from lowbit.zoo import create_model

    torch.manual_seed(0)
    torch.save(create_model("mobilenetv2", in_channels=3, num_classes=1000).state_dict(), folder / "mobilenet_v2.pth")
    bert = folder / "all-MiniLM-L6-v2"
    bert.mkdir()
    (bert / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(bert / "vocab.txt")).save_pretrained(bert)
    config = transformers.BertConfig(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=64)
    transformers.BertModel(config).save_pretrained(bert)


def test_readme_pretrained_examples_run_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_local_weights(tmp_path)
    code = blocks("python", SECTION)
    assert len(code) == 2
    namespace: dict = {}
    for i, block in enumerate(code):
        exec(compile(block, f"README.md ({SECTION}, block {i + 1})", "exec"), namespace)
    x = namespace["calib"][0][:2]
    with torch.no_grad():
        assert (namespace["engine"].predict(x) == namespace["qmodel"](x).argmax(1)).all()
    agreement = eval(capsys.readouterr().out.strip().splitlines()[-1])
    assert agreement["cosine_mean"] > 0.99 and set(agreement) == {"cosine_mean", "cosine_min", "same_neighbour"}
