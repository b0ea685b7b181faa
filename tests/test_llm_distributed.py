"""SiLQ fine-tuning of the in-house language model with 2 processes under torchrun (gloo, CPU):
DDP and FSDP2 against one process, the FSDP checkpoint against the single-process format, and
ranks that disagree on the run.

The test launches this file once with ``python -m torch.distributed.run --nproc_per_node=2``; the
worker runs three fine-tunings in one process group (DDP, FSDP2, then one where rank 1 has another
learning rate). Tolerances as in tests/test_qat_distributed.py: the ranks' gradients are averaged
by an all-reduce (DDP) or a reduce-scatter (FSDP2) instead of one sum, so results agree to float
rounding, not bit for bit; the ranks must agree exactly with each other. The optimizer is SGD, not the
recipes' AdamW: Adam divides each gradient by its own running magnitude, so a gradient that is zero up
to rounding (a byte the batch barely uses) gets a full-size step whose sign is the rounding's, and
the comparison would measure that instead of the distributed machinery. The two launched runs take
about a minute on the 2-core CI machine: they are in the slow stage.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

RECIPE = "silq-w4a8kv8"
CONFIG = dict(epochs=1, batch_size=5, optimizer="sgd", lr=0.05, quantizer_lr_mult=0.1, weight_decay=0.0,
              warmup_steps=1, distill_weight=0.75, temperature=1.0, grad_clip=1.0, max_steps=4, checkpoint_every=2,
              log_every=2, seed=1, max_tokens=None)


def in_house_model():
    from lowbit.zoo.language import load_language_model

    return load_language_model("bytellama")[0]


def data() -> torch.Tensor:
    from lowbit.data.text import ByteTokenizer, load_text, tokenize

    return tokenize(ByteTokenizer(), load_text("stdlib", "calib"))[:5 * 64 * 4]  # 4 batches of 5 windows of 64


def prepared():
    import lowbit

    model = in_house_model()
    tokens = data()
    q = lowbit.quantize(model, RECIPE, calib_data=[tokens[:4 * 64].reshape(4, 64)])
    return q, model, tokens


def run(q, teacher, tokens, ckpt, **changes):
    from lowbit.data.text import TokenWindows
    from lowbit.qat import FinetuneConfig, finetune

    cfg = FinetuneConfig(**{**CONFIG, **changes})
    return finetune(q, TokenWindows(tokens, 64, cfg.batch_size, seed=2), teacher=teacher, config=cfg,
                    checkpoint_dir=ckpt, log=lambda s: None)


def worker(out: Path) -> None:
    import torch.distributed as dist

    from lowbit.checkpoint import write_safetensors
    from lowbit.errors import DistributedError

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    report = {}
    for mode in ("ddp", "fsdp"):
        q, teacher, tokens = prepared()
        result = run(q, teacher, tokens, out / mode, distributed=mode)
        write_safetensors(q.state_dict(), out / f"{mode}-rank{rank}.safetensors")
        report[mode] = {"steps": result["steps"], "tokens": result["tokens"], "history": result["history"]}
    q, teacher, tokens = prepared()
    try:
        run(q, teacher, tokens, None, lr=1e-3 if rank == 0 else 2e-3)
        report["mismatch"] = "no error"
    except DistributedError as exc:
        report["mismatch"] = str(exc)
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    from lowbit.zoo.language import bytellama_path

    if not bytellama_path().is_file():
        pytest.skip("the in-house model is not shipped")
    out = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", __file__, str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    torch.set_num_threads(1)
    q, teacher, tokens = prepared()
    ckpt = tmp_path_factory.mktemp("single")
    result = run(q, teacher, tokens, ckpt)
    return q.state_dict(), result, ckpt


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(launched, single, mode):
    from lowbit.checkpoint import read_safetensors

    out, reports = launched
    ref, result, _ = single
    r0, r1 = (read_safetensors(out / f"{mode}-rank{r}.safetensors")[0] for r in range(2))
    for k in r0:  # the ranks agree exactly: weights, steps, cache steps
        assert torch.equal(r0[k], r1[k]), k
    start = prepared()[0].state_dict()
    moved = max((ref[k].float() - start[k].float()).abs().max().item() for k in ref if ref[k].numel())
    assert moved > 1e-3  # training changed the model, so the comparison means something
    for k in ref:
        torch.testing.assert_close(r0[k].float(), ref[k].float(), rtol=1e-4, atol=1e-5, msg=k)
    assert reports[0][mode]["steps"] == result["steps"] == 4 and reports[0][mode]["tokens"] == result["tokens"]
    assert reports[0][mode]["history"][0]["train_loss"] == pytest.approx(result["history"][0]["train_loss"], rel=1e-4)


@pytest.mark.slow
def test_fsdp_checkpoint_is_the_single_process_format(launched, single):
    """The gathered FSDP checkpoint holds the same tensors (model and AdamW state, by parameter index)
    as the single-process one, so either resumes the other."""
    from lowbit.qat.state import load_training_state

    out, _ = launched
    fsdp_tensors, fsdp_meta = load_training_state(out / "fsdp")
    one_tensors, one_meta = load_training_state(single[2])
    assert set(fsdp_tensors) == set(one_tensors) and fsdp_meta["step"] == one_meta["step"] == 4
    assert fsdp_meta["world_size"] == 2
    for k in one_tensors:
        torch.testing.assert_close(fsdp_tensors[k].float(), one_tensors[k].float(), rtol=1e-3, atol=1e-5, msg=k)


@pytest.mark.slow
def test_ranks_that_disagree_stop_with_a_clear_error(launched):
    _, reports = launched
    for report in reports:
        assert "rank(s) [1] run with other settings" in report["mismatch"]


def test_inconsistent_torchrun_environment(monkeypatch):
    from lowbit.errors import DistributedError
    from lowbit.qat import distributed as D

    monkeypatch.setenv("WORLD_SIZE", "2")
    for k in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(DistributedError, match="RANK, MASTER_ADDR, MASTER_PORT is not set; launch with torchrun"):
        D.setup()
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(DistributedError, match="RANK 2, WORLD_SIZE 2"):
        D.setup()


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
