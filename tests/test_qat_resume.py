"""Checkpoint and resume of the fine-tuning loop: an interrupted run (exception or SIGKILL)
ends bit-identical to an uninterrupted one; mismatched checkpoints and NaN losses fail clearly."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import lowbit
from lowbit.data import make_loader
from lowbit.errors import CheckpointError
from lowbit.qat import FinetuneConfig, NonFiniteError, finetune
from lowbit.qat.state import load_training_state, model_tensors, save_training_state

torch.set_num_threads(1)
RECIPE = {"weights": {"method": "lsq", "bits": 4},
          "activations": {"method": "pact", "bits": 4},
          "layers": {"@first": {"activations": {"method": "lsq", "bits": 8}}}}


class Tiny(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, width, 3, stride=2, padding=1)
        self.drop = nn.Dropout(0.2)  # draws from torch's global RNG: resume must restore it
        self.fc = nn.Linear(width * 16, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return self.fc(self.drop(torch.flatten(F.relu(self.conv2(x)), 1)))


def train_loader():
    # augmentation draws from the loader's own per-epoch generator: resume must replay it
    return make_loader("digits", "train", 64, shuffle=True, augment=True, seed=3, limit=448)  # 7 batches


def build(recipe=RECIPE, width=16):
    torch.manual_seed(0)
    float_model = Tiny(width)
    teacher = Tiny(width).eval()
    q = lowbit.quantize(float_model, recipe, calib_data=make_loader("digits", "calib", 64), calib_batches=2)
    return q, teacher


CONFIG = dict(epochs=3, lr=0.02, nesterov=True, warmup_steps=3, schedule="cosine", checkpoint_every=4,
              grad_clip=5.0, freeze_bn_steps=15, log_every=2, distill_weight=0.5, temperature=2.0, seed=7)


class Crash(Exception):
    pass


def crash_at(step):
    def hook(info):
        if info["step"] == step:
            raise Crash(step)
    return hook


def quiet(_):
    pass


def strip_seconds(records):
    return [{k: v for k, v in r.items() if k != "seconds" and not k.endswith("_per_second")} for r in records]


def assert_same_state(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("optimizer, stop", [("sgd", 10), ("adamw", 17)])
def test_interrupted_run_resumes_to_identical_weights(tmp_path, optimizer, stop):
    cfg = FinetuneConfig(optimizer=optimizer, **CONFIG)
    eval_data = make_loader("digits", "calib", 90)
    qa, teacher = build()
    full = finetune(qa, train_loader(), eval_data=eval_data, teacher=teacher, config=cfg,
                    checkpoint_dir=tmp_path / "a", log=quiet)
    assert full["steps"] == 21

    qb, teacher_b = build()
    with pytest.raises(Crash):
        finetune(qb, train_loader(), eval_data=eval_data, teacher=teacher_b, config=cfg,
                 checkpoint_dir=tmp_path / "b", log=quiet, on_step=crash_at(stop))
    saved = json.loads((tmp_path / "b" / "last.json").read_text())
    assert saved["step"] == stop - stop % 4 and saved["step"] % 7 != 0  # a mid-epoch checkpoint
    assert any(not torch.equal(v, qa.state_dict()[k]) for k, v in qb.state_dict().items())

    qc, teacher_c = build()  # a fresh process would rebuild the model like this
    lines, steps = [], []
    resumed = finetune(qc, train_loader(), eval_data=eval_data, teacher=teacher_c, config=cfg.replace(log_every=2),
                       checkpoint_dir=tmp_path / "b", resume=True, log=lines.append,
                       on_step=lambda i: steps.append(i["step"]))
    assert any("resumed from" in ln and f"step {saved['step']}/21" in ln for ln in lines)
    assert steps == list(range(saved["step"] + 1, 22))
    assert_same_state(qa, qc)  # every weight, bias, BN statistic, LSQ step, PACT alpha
    assert strip_seconds(resumed["history"]) == strip_seconds(full["history"])
    log_a = [json.loads(ln) for ln in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    log_b = [json.loads(ln) for ln in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert strip_seconds(log_a) == strip_seconds(log_b)  # lines after the checkpoint were not doubled
    ta, _ = load_training_state(tmp_path / "a")
    tb, _ = load_training_state(tmp_path / "b")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)  # optimizer state too


KILL_SCRIPT = """
import sys, time, torch
sys.path.insert(0, {tests!r})
from test_qat_resume import build, train_loader, CONFIG
from lowbit.qat import FinetuneConfig, finetune
torch.set_num_threads(1)
q, teacher = build()
def slow(info):
    if info["step"] >= 2:
        time.sleep(0.5)  # give the parent time to kill us mid-run
finetune(q, train_loader(), teacher=teacher, config=FinetuneConfig(**dict(CONFIG, checkpoint_every=2)),
         checkpoint_dir={ckpt!r}, log=lambda s: None, on_step=slow)
print("FINISHED")
"""


def test_sigkilled_run_resumes_to_identical_weights(tmp_path):
    ckpt = tmp_path / "killed"
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT.format(tests=str(Path(__file__).parent), ckpt=str(ckpt)))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300  # generous: a loaded CI machine imports torch and builds slowly
        while time.time() < deadline:
            side = ckpt / "last.json"
            if side.is_file():
                try:
                    if json.loads(side.read_text())["step"] >= 4:
                        break
                except (ValueError, KeyError):
                    pass
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = proc.stdout.read().decode()
    assert proc.returncode == -signal.SIGKILL and "FINISHED" not in out
    killed_at = json.loads((ckpt / "last.json").read_text())["step"]
    assert 4 <= killed_at < 21
    assert (ckpt / "last.safetensors").is_file()

    cfg = FinetuneConfig(**dict(CONFIG, checkpoint_every=2))
    qa, teacher = build()
    finetune(qa, train_loader(), teacher=teacher, config=cfg, log=quiet)
    qb, teacher_b = build()
    result = finetune(qb, train_loader(), teacher=teacher_b, config=cfg, checkpoint_dir=ckpt, resume=True, log=quiet)
    assert result["steps"] == 21
    assert_same_state(qa, qb)


# ----- mismatches ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck")
    q, _ = build()
    finetune(q, train_loader(), config=FinetuneConfig(epochs=1, lr=0.01, max_steps=3), checkpoint_dir=d, log=quiet)
    return d


def test_resume_with_another_architecture_names_the_tensor(checkpointed):
    q, _ = build(width=24)
    with pytest.raises(CheckpointError, match="architecture") as exc:
        finetune(q, train_loader(), config=FinetuneConfig(epochs=1, lr=0.01, max_steps=3), checkpoint_dir=checkpointed,
                 resume=True, log=quiet)
    assert "conv2.weight" in str(exc.value) and "[16, 8, 3, 3]" in str(exc.value) and "[24, 8, 3, 3]" in str(exc.value)


def test_resume_with_another_recipe_names_the_setting(checkpointed):
    other = json.loads(json.dumps(RECIPE))
    other["weights"]["bits"] = 2
    q, _ = build(other)
    with pytest.raises(CheckpointError, match="recipe") as exc:
        finetune(q, train_loader(), config=FinetuneConfig(epochs=1, lr=0.01, max_steps=3), checkpoint_dir=checkpointed,
                 resume=True, log=quiet)
    assert "weights.bits: checkpoint 4 vs now 2" in str(exc.value)


def test_resume_with_other_settings_names_them_but_allows_bookkeeping(checkpointed, tmp_path):
    q, _ = build()
    with pytest.raises(CheckpointError, match="lr: checkpoint 0.01 vs now 0.05"):
        finetune(q, train_loader(), config=FinetuneConfig(epochs=1, lr=0.05, max_steps=3), checkpoint_dir=checkpointed,
                 resume=True, log=quiet)
    steps = []
    r = finetune(q, train_loader(), config=FinetuneConfig(epochs=1, lr=0.01, max_steps=3, checkpoint_every=1),
                 checkpoint_dir=checkpointed, resume=True, log=quiet, on_step=steps.append)
    assert r["steps"] == 3 and steps == []  # already finished: nothing more to do


def test_resume_with_other_training_data_length_says_so(checkpointed):
    q, _ = build()
    other = make_loader("digits", "train", 32, shuffle=True, augment=True, seed=3, limit=448)
    with pytest.raises(CheckpointError, match="7 batches per epoch, this training data has 14"):
        finetune(q, other, config=FinetuneConfig(epochs=1, lr=0.01, max_steps=3), checkpoint_dir=checkpointed,
                 resume=True, log=quiet)


def test_resume_without_a_checkpoint_starts_fresh(tmp_path):
    lines = []
    q, _ = build()
    r = finetune(q, train_loader(), config=FinetuneConfig(epochs=1, lr=0.01, max_steps=2), checkpoint_dir=tmp_path,
                 resume=True, log=lines.append)
    assert r["steps"] == 2 and any("starting from scratch" in ln for ln in lines)
    assert json.loads((tmp_path / "last.json").read_text())["step"] == 2
    with pytest.raises(CheckpointError, match="checkpoint_dir"):
        finetune(q, train_loader(), config=FinetuneConfig(epochs=1), resume=True, log=quiet)
    (tmp_path / "last.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a lowbit training checkpoint"):
        finetune(q, train_loader(), config=FinetuneConfig(epochs=1, lr=0.01, max_steps=2), checkpoint_dir=tmp_path,
                 resume=True, log=quiet)


# ----- NaN / Inf ----------------------------------------------------------------------------
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    q, _ = build()
    poison = {"on": False}
    q.fc.register_forward_hook(lambda m, i, out: out * math.nan if poison["on"] else out)
    snap = {}

    def on_step(info):
        if info["step"] == 4:
            snap.update({k: v.clone() for k, v in q.state_dict().items()})
            poison["on"] = True  # the 5th step's loss is NaN

    cfg = FinetuneConfig(epochs=2, lr=0.01, checkpoint_every=2)
    with pytest.raises(NonFiniteError) as exc:
        finetune(q, train_loader(), config=cfg, checkpoint_dir=tmp_path, log=quiet, on_step=on_step)
    msg = str(exc.value)
    assert "loss became nan at step 5 (epoch 1, batch 5)" in msg and "step 4" in msg and "last.safetensors" in msg
    tensors, meta = load_training_state(tmp_path)
    assert meta["step"] == 4
    saved = model_tensors(tensors)
    assert all(torch.equal(saved[k], snap[k]) for k in snap)
    # the NaN step never reached the optimizer (its forward did update batch-norm statistics)
    assert all(torch.equal(p, snap[k]) for k, p in q.named_parameters())


def test_diverging_lr_is_caught_and_no_bad_checkpoint_is_written(tmp_path):
    q, _ = build({"weights": {"method": "minmax", "bits": 8}, "activations": None})
    cfg = FinetuneConfig(epochs=2, lr=1e30, momentum=0.0, schedule="constant", checkpoint_every=1)
    with pytest.raises(NonFiniteError, match=r"step \d+") as exc:
        finetune(q, train_loader(), config=cfg, checkpoint_dir=tmp_path, log=quiet)
    tensors, meta = load_training_state(tmp_path)
    assert all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point())
    failed = int(str(exc.value).split("step ")[1].split()[0].rstrip(":"))
    assert meta["step"] < failed


def test_save_refuses_non_finite_tensors_and_keeps_the_old_file(tmp_path):
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    save_training_state(tmp_path, model, opt, {"step": 1})
    good = (tmp_path / "last.safetensors").read_bytes()
    with torch.no_grad():
        model.weight[0, 0] = math.inf
    with pytest.raises(NonFiniteError, match="step 2.*weight"):
        save_training_state(tmp_path, model, opt, {"step": 2})
    assert (tmp_path / "last.safetensors").read_bytes() == good
    assert json.loads((tmp_path / "last.json").read_text())["step"] == 1
