"""Distributed fine-tuning: 2 processes under torchrun (gloo, CPU) against one process.

The test launches this file with ``python -m torch.distributed.run --nproc_per_node=2``;
run as a script, it is the worker (see ``worker``).

Why the comparison has a tolerance and is not bit-exact: each rank computes the gradient of
the mean loss over its half batch, DDP sums the two in an all-reduce and divides by 2, while
one process sums all 63 samples in one reduction. Both are the gradient of the same global
mean loss, but float addition is not associative, so the results differ in the last bits
(~1e-7 relative) and those differences grow a little over the steps (and could flip an
occasional rounding decision of a quantizer). The model has no batch norm on purpose: with
DDP, batch norm normalises each rank's half batch with that half's statistics, which is a
different computation from normalising the global batch, not a rounding difference.
The two ranks, on the other hand, must agree exactly with each other.
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
from torch import nn
from torch.nn import functional as F

torch.set_num_threads(1)

RECIPE = {"weights": {"method": "lsq", "bits": 4},
          "activations": {"method": "pact", "bits": 4},
          "layers": {"@first": {"activations": {"method": "lsq", "bits": 8}},
                     "conv2": {"weights": {"method": "sawb", "bits": 4, "granularity": "channel"}}}}
CONFIG = dict(epochs=2, lr=0.05, momentum=0.9, schedule="cosine", checkpoint_every=3, log_every=2, seed=1)


class NoBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16 * 16, 10)

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(torch.flatten(x, 1))


def digits_tensors() -> dict[str, torch.Tensor]:
    """The images the test uses (the parent passes them to the workers: no scikit-learn import there)."""
    from lowbit.data import load_split

    (tx, ty), (cx, cy) = load_split("digits", "train"), load_split("digits", "calib")
    return {"train_x": tx[:252], "train_y": ty[:252], "calib_x": cx, "calib_y": cy}


def loaders(data: dict[str, torch.Tensor]):
    """Train (63 images a batch: the ranks get 32 and 31, exercising the weighting of uneven
    shards), validation and calibration loaders, built as ``make_loader("digits", ...)`` builds them."""
    from lowbit.data import DATASETS, TensorLoader

    info = DATASETS["digits"]
    kw = dict(mean=info.mean, std=info.std, pad=1, flip=False)
    return (TensorLoader(data["train_x"], data["train_y"], 63, shuffle=True, seed=5, **kw),
            TensorLoader(data["calib_x"], data["calib_y"], 90, **kw),
            TensorLoader(data["calib_x"], data["calib_y"], 64, **kw))


def build(data):
    import lowbit

    torch.manual_seed(0)
    return lowbit.quantize(NoBN(), RECIPE, calib_data=loaders(data)[2], calib_batches=2)


def worker(out: Path) -> None:
    """One rank: fine-tune, record every file this process writes under the checkpoint dir."""
    import builtins
    import io

    from safetensors.torch import save_file

    from lowbit.qat import FinetuneConfig, finetune

    rank = int(os.environ["RANK"])
    ckpt = out / "ckpt"
    writes: list[str] = []
    real_open, real_replace = builtins.open, os.replace

    def spy_open(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+") and str(file).startswith(str(ckpt)):
            writes.append(f"open {Path(file).name}")
        return real_open(file, mode, *a, **k)

    def spy_replace(src, dst, *a, **k):
        if str(dst).startswith(str(ckpt)):
            writes.append(f"replace {Path(dst).name}")
        return real_replace(src, dst, *a, **k)

    from safetensors.torch import load_file

    data = load_file(str(out / "data.safetensors"))
    builtins.open = io.open = spy_open
    os.replace = spy_replace
    q = build(data)
    train, val, _ = loaders(data)
    result = finetune(q, train, eval_data=val, config=FinetuneConfig(**CONFIG), checkpoint_dir=ckpt,
                      log=lambda s: None)
    builtins.open = io.open = real_open
    os.replace = real_replace
    save_file({k: v.contiguous() for k, v in q.state_dict().items()}, str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps({"writes": writes, "result": {
        "steps": result["steps"], "rank": result["rank"], "world_size": result["world_size"],
        "history": result["history"]}}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_one_process(tmp_path):
    from safetensors.torch import load_file, save_file

    from lowbit.qat import FinetuneConfig, finetune

    data = digits_tensors()
    save_file(data, str(tmp_path / "data.safetensors"))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", __file__, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    info = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [i["result"]["rank"] for i in info] == [0, 1] and info[0]["result"]["world_size"] == 2
    assert info[0]["result"]["steps"] == 8
    # only rank 0 wrote files: checkpoints (at steps 3, 4 = epoch end, 6 and 8) and the metrics log
    assert info[1]["writes"] == []
    assert info[0]["writes"].count("replace last.safetensors") == 4
    assert info[0]["writes"].count("replace last.json") == 4
    written = {p.name for p in (tmp_path / "ckpt").iterdir()} - {"tensorboard"}  # rank 0's, when installed
    assert sorted(written) == ["last.json", "last.safetensors", "metrics.jsonl"]
    records = [json.loads(ln) for ln in (tmp_path / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in records] == [("step", 2), ("step", 4), ("epoch", 4), ("step", 6),
                                                          ("step", 8), ("epoch", 8)]  # once each, not per rank
    assert "val_top1" in info[0]["result"]["history"][-1]  # rank 0 evaluated

    r0, r1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    for k in r0:  # the ranks agree exactly: weights, LSQ steps, PACT clips, SAWB grids
        assert torch.equal(r0[k], r1[k]), k

    q = build(data)
    train, val, _ = loaders(data)
    single = finetune(q, train, eval_data=val, config=FinetuneConfig(**CONFIG), log=lambda s: None)
    ref = q.state_dict()
    start = build(data).state_dict()
    moved = max((ref[k].float() - start[k].float()).abs().max().item() for k in ref if ref[k].numel())
    assert moved > 1e-2  # training changed the model, so the comparison means something
    for k in ref:
        assert torch.allclose(r0[k].float(), ref[k].float(), rtol=1e-4, atol=1e-5), \
            (k, (r0[k].float() - ref[k].float()).abs().max().item())
    ddp_hist, one_hist = info[0]["result"]["history"], single["history"]
    for a, b in zip(ddp_hist, one_hist):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["train_acc"] == pytest.approx(b["train_acc"], abs=1e-9)  # accuracy summed over both ranks


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
