"""Fine-tuning a quantized causal LM through lowbit.finetune: the per-token distillation loss,
budgets in tokens, gradient accumulation and checkpointing, bf16 autocast, exact resume."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

pytest.importorskip("transformers")

import lowbit  # noqa: E402
from lowbit.data.text import TokenWindows  # noqa: E402
from lowbit.errors import CheckpointError, RecipeError  # noqa: E402
from lowbit.llm.objective import CausalLM  # noqa: E402
from lowbit.qat import FinetuneConfig, TeacherMismatchError, finetune  # noqa: E402
from tiny_lm import VOCAB, tiny_lm, token_batch  # noqa: E402

RECIPE = {"weights": {"method": "lsq", "bits": 4, "granularity": "channel", "init": "mse"},
          "activations": {"method": "lsq", "bits": 8, "init": "mse"},
          "kv_cache": {"method": "lsq", "bits": 4, "init": "mse"}}
CONFIG = dict(epochs=1, optimizer="adamw", lr=2e-3, weight_decay=0.0, quantizer_lr_mult=0.5, warmup_steps=2,
              distill_weight=0.75, temperature=2.0, log_every=2, seed=3)


def corpus(n=6000, seed=0):
    """A learnable token stream: a noisy repetition of one random phrase."""
    gen = torch.Generator().manual_seed(seed)
    phrase = torch.randint(0, VOCAB, (37,), generator=gen)
    tokens = phrase.repeat(n // 37 + 1)[:n]
    noise = torch.rand(n, generator=gen) < 0.1
    return torch.where(noise, torch.randint(0, VOCAB, (n,), generator=gen), tokens)


def setup(recipe=RECIPE):
    teacher = tiny_lm(initializer_range=0.3)  # peaked next-token distributions, which 4 bits disturb
    q = lowbit.quantize(teacher, recipe, calib_data=[token_batch()])
    return q, teacher, TokenWindows(corpus(), 24, 6, seed=1)


def quiet(_):
    pass


def test_loss_is_per_token_distillation_by_hand():
    q, teacher, train = setup()
    ids = next(iter(train))
    cfg = FinetuneConfig(distill_weight=0.75, temperature=2.0)
    loss, agree, count = CausalLM().loss(q, teacher, ids, None, cfg, True)
    s = q(ids).logits[:, :-1].reshape(-1, VOCAB)
    t = teacher(ids).logits[:, :-1].reshape(-1, VOCAB)
    y = ids[:, 1:].reshape(-1)
    p_t = F.softmax(t / 2, -1)
    kl = (p_t * (F.log_softmax(t / 2, -1) - F.log_softmax(s / 2, -1))).sum(-1).mean()
    expected = 0.25 * F.cross_entropy(s, y) + 0.75 * 4 * kl
    assert count == 6 * 23 and agree == float((s.argmax(-1) == t.argmax(-1)).sum())
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_finetuning_reduces_kl_to_the_teacher():
    q, teacher, train = setup()
    held_out = torch.stack([corpus(seed=5)[i:i + 24] for i in range(0, 480, 24)])
    before = lowbit.llm.measure(q, held_out, teacher=teacher)
    cfg = FinetuneConfig(**{**CONFIG, "lr": 1e-3, "distill_weight": 1.0, "temperature": 1.0})
    result = finetune(q, train, teacher=teacher, eval_data=held_out, config=cfg, log=quiet)
    after = result["metrics"]
    assert result["tokens"] == len(train) * 6 * 24
    assert after["val_kl"] < 0.85 * before["kl"]
    assert after["val_agreement"] > before["agreement"] + 2


def test_budget_in_tokens():
    q, teacher, train = setup()
    result = finetune(q, train, teacher=teacher, config=FinetuneConfig(**CONFIG, max_tokens=1000), log=quiet)
    assert result["steps"] == math.ceil(1000 / (6 * 24)) and result["tokens"] == result["steps"] * 6 * 24


def test_budget_in_tokens_needs_a_language_model():
    from lowbit.data import make_loader
    from lowbit.zoo import create_model

    q = lowbit.quantize(create_model("mlp", in_size=8), "ptq-w8a8", calib_data=make_loader("digits", "calib", 64))
    with pytest.raises(RecipeError, match="max_tokens.*needs a language model"):
        finetune(q, make_loader("digits", "train", 64), config=FinetuneConfig(max_tokens=100), log=quiet)


def states_after(steps=3, **changes):
    q, teacher, train = setup()
    finetune(q, train, teacher=teacher, config=FinetuneConfig(**{**CONFIG, "max_steps": steps, **changes}),
             log=quiet)
    return q.state_dict()


def assert_close_states(a, b, **tol):
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), msg=k, **tol)


def test_gradient_accumulation_and_checkpointing_keep_the_update():
    plain = states_after()
    assert_close_states(states_after(grad_accum_steps=3), plain, rtol=1e-4, atol=1e-5)
    assert_close_states(states_after(gradient_checkpointing=True), plain, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_runs_the_step_in_bf16():
    losses = {}
    for autocast in (False, True):
        q, teacher, train = setup()
        steps = []
        finetune(q, train, teacher=teacher, config=FinetuneConfig(**{**CONFIG, "log_every": 1, "max_steps": 2},
                                                                  autocast=autocast),
                 on_step=lambda info: steps.append(info["loss"]), log=quiet)
        losses[autocast] = steps
    assert all(math.isfinite(v) for v in losses[True])
    assert losses[True][0] != losses[False][0]  # bf16 arithmetic ran
    assert losses[True][0] == pytest.approx(losses[False][0], rel=0.05)  # and computed the same loss


def test_interrupted_run_resumes_to_identical_weights(tmp_path):
    cfg = FinetuneConfig(**CONFIG, grad_accum_steps=2, checkpoint_every=3, max_steps=12)
    q, teacher, train = setup()
    full = finetune(q, train, teacher=teacher, config=cfg, checkpoint_dir=tmp_path / "a", log=quiet)

    def crash(info):
        if info["step"] == 7:
            raise KeyboardInterrupt

    q2, teacher2, train2 = setup()
    with pytest.raises(KeyboardInterrupt):
        finetune(q2, train2, teacher=teacher2, config=cfg, checkpoint_dir=tmp_path / "b", on_step=crash, log=quiet)
    q3, teacher3, train3 = setup()
    resumed = finetune(q3, train3, teacher=teacher3, config=cfg, checkpoint_dir=tmp_path / "b", resume=True,
                       log=quiet)
    assert resumed["steps"] == full["steps"] and resumed["tokens"] == full["tokens"]
    for k, v in q.state_dict().items():
        assert torch.equal(v, q3.state_dict()[k]), k
    keep = lambda rows: [{k: v for k, v in r.items() if k != "seconds" and not k.endswith("_per_second")}
                         for r in rows]
    lines = lambda d: [ln for ln in (d / "metrics.jsonl").read_text().splitlines()]
    import json
    assert keep(map(json.loads, lines(tmp_path / "a"))) == keep(map(json.loads, lines(tmp_path / "b")))


def test_resume_with_another_recipe_is_refused(tmp_path):
    cfg = FinetuneConfig(**CONFIG, max_steps=2)
    q, teacher, train = setup()
    finetune(q, train, teacher=teacher, config=cfg, checkpoint_dir=tmp_path, log=quiet)
    other = {**RECIPE, "kv_cache": {"method": "lsq", "bits": 8, "init": "mse"}}
    q2, teacher2, train2 = setup(other)
    with pytest.raises(CheckpointError, match="another recipe: kv_cache.bits: checkpoint 4 vs now 8"):
        finetune(q2, train2, teacher=teacher2, config=cfg, checkpoint_dir=tmp_path, resume=True, log=quiet)


def test_teacher_of_another_vocabulary_is_refused():
    q, _, train = setup()
    with pytest.raises(TeacherMismatchError, match="same number of classes"):
        finetune(q, train, teacher=tiny_lm(vocab_size=80), config=FinetuneConfig(**CONFIG, max_steps=1), log=quiet)


def test_batches_that_are_not_token_windows_are_refused():
    q, teacher, _ = setup()
    with pytest.raises(TypeError, match=r"\[batch, tokens\] integer windows"):
        finetune(q, [torch.randn(2, 8)], teacher=teacher, config=FinetuneConfig(**CONFIG), log=quiet)


def test_a_large_vocabulary_is_measured_in_smaller_batches_with_the_same_numbers(monkeypatch):
    from lowbit.llm import evaluate

    q, teacher, _ = setup()
    held_out = torch.stack([corpus(seed=5)[i:i + 24] for i in range(0, 240, 24)])
    whole = lowbit.llm.measure(q, held_out, teacher=teacher)
    monkeypatch.setattr(evaluate, "LOGITS_BUDGET", 3 * 24 * VOCAB)  # as if the vocabulary were large: 3 windows a batch
    assert evaluate.windows_per_batch(q, 24, 8) == 3
    split = lowbit.llm.measure(q, held_out, teacher=teacher)
    assert split.keys() == whole.keys()
    for key in whole:
        assert math.isclose(split[key], whole[key], rel_tol=1e-6)
