"""Compiled fake-quant (``fused=True``, fine-tuning's ``compile_quantizers``): the same forward and
``x`` gradient bit for bit, the step and zero-point gradients up to float summation order, a
fine-tuning run that follows the eager one, and the eager op with a warning where compiling fails.

The compiled cases are slow (each kernel variant compiles in seconds on a CPU): CI's second stage."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit.quant import grid, make_quantizer
from lowbit.quant.base import Quantizer
from lowbit.qat import FinetuneConfig, finetune

torch.set_num_threads(1)

CASES = [  # (method, options, input shape): every grid layout and gradient the quantizers use
    ("lsq", dict(bits=4, role="weight", granularity="channel"), (48, 40)),                  # per-channel step
    ("lsq", dict(bits=8, role="activation"), (6, 10, 40)),                                  # per-tensor step
    ("lsq", dict(bits=4, role="activation", asymmetric=True), (16, 40)),                    # learned zero point
    ("pact", dict(bits=2, role="activation"), (4, 3, 6, 6)),                                # clip gradient
    ("sawb", dict(bits=2, role="weight", granularity="channel"), (8, 4, 3, 3)),             # half-integer zero point
    ("minmax", dict(bits=8, role="activation", round_mode="half_up"), (16, 40)),            # no step gradient
]


def _run(q: Quantizer, x0: torch.Tensor, fused: bool):
    q.fused = fused
    x = x0.clone().requires_grad_()
    for p in q.parameters():
        p.grad = None
    y = q(x)
    y.backward(torch.randn(x0.shape, generator=torch.Generator().manual_seed(1)))
    return y.detach(), x.grad, [p.grad.clone() for p in q.parameters()]


def _quantizer(method, options, shape):
    q = make_quantizer(method, **options)
    x0 = 2 * torch.randn(shape, generator=torch.Generator().manual_seed(0))
    q.init_from(x0)
    return q.train(), x0


@pytest.mark.slow
@pytest.mark.parametrize("method,options,shape", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_compiled_fake_quant_matches_the_eager_op(method, options, shape):
    q, x0 = _quantizer(method, options, shape)
    y0, gx0, gp0 = _run(q, x0, fused=False)
    y1, gx1, gp1 = _run(q, x0, fused=True)
    assert torch.equal(y0, y1)      # the same grid values
    assert torch.equal(gx0, gx1)    # the same straight-through gradient
    for a, b in zip(gp0, gp1, strict=True):  # steps, zero points: sums in another order
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6 * float(a.abs().max()) + 1e-9)
    assert grid._FUSED.get("kernels") is not None  # it really ran compiled


@pytest.mark.slow
def test_fine_tuning_with_compiled_quantizers_follows_the_eager_run():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 3))
    data = [(torch.randn(16, 12, generator=torch.Generator().manual_seed(i)), torch.arange(16) % 3)
            for i in range(6)]
    runs = []
    for compiled in (False, True):
        q = lowbit.quantize(net, "lsq-w4a4", calib_data=[x for x, _ in data[:2]])
        cfg = FinetuneConfig(epochs=1, lr=0.01, schedule="constant", compile_quantizers=compiled, tensorboard=False)
        result = finetune(q, data, config=cfg, log=lambda s: None)
        runs.append((q, result["metrics"]["train_loss"]))
    (eager, loss0), (compiled, loss1) = runs
    assert loss1 == pytest.approx(loss0, rel=1e-5)
    for (name, a), (_, b) in zip(eager.state_dict().items(), compiled.state_dict().items(), strict=True):
        if a.is_floating_point():
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=name)
    assert not any(m.fused for m in compiled.modules() if isinstance(m, Quantizer))  # reset after the run


def test_a_failed_compile_warns_once_and_runs_the_eager_op(monkeypatch):
    def cannot_build(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(grid, "_FUSED", {})
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: cannot_build)
    q, x0 = _quantizer(*CASES[0])
    y0, gx0, gp0 = _run(q, x0, fused=False)
    with pytest.warns(RuntimeWarning, match="compiled fake-quant is unavailable.*no C\\+\\+ compiler"):
        y1, gx1, gp1 = _run(q, x0, fused=True)
    assert torch.equal(y0, y1) and torch.equal(gx0, gx1) and torch.equal(gp0[0], gp1[0])
    assert grid._FUSED["kernels"] is None  # not tried again
