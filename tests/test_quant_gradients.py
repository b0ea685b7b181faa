"""Gradients of the fake-quant op and of the learned quantizers (LSQ, PACT), checked against
the papers' formulas computed independently (numpy, float64) and against finite differences.

What the finite differences can and cannot check: the forward ``(clamp(round(x/s + z)) - z) * s``
is piecewise linear in ``s`` with the codes held fixed, so on inputs chosen away from rounding
and clipping boundaries a central difference measures ``sum g * (q - z)`` exactly. For clipped
elements that *is* the LSQ/PACT step gradient (``qmin - z`` / ``qmax - z``). For in-range elements
LSQ's ``round(x/s) - x/s`` is the derivative of ``s * r(x/s)`` under the straight-through estimator
(``dr/du = 1``): ``r + s * d(x/s)/ds``; the first part is what the finite difference of the real
forward sees, the second part is ``s`` times the derivative of the smooth ``x/s``, which we also
take by finite difference. So we check ``lsq_grad == FD(forward) + s * FD(sum_inside g * x/s)``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lowbit.quant import PACTQuantizer, SAWBQuantizer, fake_quant, int_range, make_quantizer


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _away_from_boundaries(pre: torch.Tensor, qmin: int, qmax: int, margin: float = 0.05) -> torch.Tensor:
    """Mask of unrounded codes at least ``margin`` from a rounding tie and from the clip limits."""
    frac = pre - pre.floor()
    return ((frac - 0.5).abs() > margin) & ((pre - qmin).abs() > margin) & ((pre - qmax).abs() > margin)


def _lsq_local_np(x, s, z, qmin, qmax):
    """LSQ Eq. 3 written with numpy, independently of the library."""
    pre = x / s + z
    out = np.where(pre <= qmin, qmin - z, np.where(pre >= qmax, qmax - z, np.round(pre) - pre))
    return out


# ----- x gradient (straight-through estimator) -------------------------------------------

@pytest.mark.parametrize("scale_grad", [None, "lsq", "clip"])
def test_x_gradient_one_inside_zero_clipped(scale_grad):
    qmin, qmax = int_range(4, True)
    s, z = torch.tensor(0.5), torch.tensor(0.0)
    # pre = x/s: far below, exactly qmin, inside ..., exactly qmax, far above
    pre = torch.tensor([-20.0, -8.0, -7.99, -3.3, 0.0, 0.49, 2.5, 6.99, 7.0, 7.01, 30.0])
    x = (pre * s).requires_grad_(True)
    y = fake_quant(x, s.clone().requires_grad_(scale_grad is not None), z, qmin, qmax, scale_grad=scale_grad)
    up = torch.arange(1.0, 12.0)
    y.backward(up)
    inside = torch.tensor([0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0], dtype=torch.float32)
    assert torch.equal(x.grad, up * inside)


def test_x_gradient_pass_through():
    s, z = torch.tensor(0.5), torch.tensor(0.0)
    x = torch.tensor([-20.0, -4.0, -1.2, 0.0, 3.5, 9.0]).requires_grad_(True)
    y = fake_quant(x, s, z, -8, 7, pass_through=True)
    up = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    y.backward(up)
    assert torch.equal(x.grad, up)


def test_no_step_gradient_without_scale_grad():
    s = torch.tensor(0.5, requires_grad=True)
    x = torch.randn(10)
    fake_quant(x, s, torch.tensor(0.0), -8, 7).sum().backward()
    assert s.grad is None


# ----- step gradient: formulas ------------------------------------------------------------

@pytest.mark.parametrize("bits,signed,zp", [(2, True, 0.0), (4, True, 0.0), (4, False, 0.0), (3, False, 2.0),
                                             (8, True, -5.0)])
def test_lsq_step_gradient_equals_eq3(bits, signed, zp):
    qmin, qmax = int_range(bits, signed)
    g = _gen(bits)
    s0 = 0.37
    x = torch.randn(500, generator=g, dtype=torch.float64) * s0 * (qmax - qmin) * 0.6
    up = torch.randn(500, generator=g, dtype=torch.float64)
    s = torch.tensor(s0, dtype=torch.float64, requires_grad=True)
    z = torch.tensor(zp, dtype=torch.float64)
    gs = 0.31
    fake_quant(x, s, z, qmin, qmax, scale_grad="lsq", grad_scale=gs).backward(up)
    local = _lsq_local_np(x.numpy(), s0, zp, qmin, qmax)
    pre = x.numpy() / s0 + zp
    assert (pre <= qmin).sum() > 5 and (pre >= qmax).sum() > 5 and ((pre > qmin) & (pre < qmax)).sum() > 50
    expect = gs * float((up.numpy() * local).sum())
    assert float(s.grad) == pytest.approx(expect, rel=1e-12, abs=1e-12)


def test_lsq_step_gradient_signed_uses_minus_qn_and_qp():
    # LSQ v3 signed: Q_N = 2^(b-1), Q_P = 2^(b-1) - 1; a far-clipped element contributes -Q_N or +Q_P
    for bits in (2, 3, 4, 8):
        qmin, qmax = int_range(bits, True)
        s = torch.tensor(0.1, requires_grad=True)
        fake_quant(torch.tensor([-1e3]), s, torch.tensor(0.0), qmin, qmax, scale_grad="lsq").sum().backward()
        assert float(s.grad) == -(2 ** (bits - 1))
        s.grad = None
        fake_quant(torch.tensor([1e3]), s, torch.tensor(0.0), qmin, qmax, scale_grad="lsq").sum().backward()
        assert float(s.grad) == 2 ** (bits - 1) - 1


def test_clip_step_gradient_only_clipped_terms():
    qmin, qmax = int_range(4, True)
    g = _gen(1)
    x = torch.randn(400, generator=g, dtype=torch.float64) * 3
    up = torch.randn(400, generator=g, dtype=torch.float64)
    s = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    fake_quant(x, s, torch.tensor(0.0, dtype=torch.float64), qmin, qmax, scale_grad="clip", grad_scale=2.0).backward(up)
    pre = x / 0.3
    expect = 2.0 * float((up * torch.where(pre <= qmin, float(qmin), torch.where(pre >= qmax, float(qmax),
                                                                                   torch.zeros_like(pre)))).sum())
    assert float(s.grad) == pytest.approx(expect, rel=1e-12)
    assert float(s.grad) != 0.0


def test_per_channel_step_gradient_summed_per_channel():
    qmin, qmax = int_range(3, True)
    g = _gen(2)
    x = torch.randn(3, 50, generator=g, dtype=torch.float64) * 1.5
    up = torch.randn(3, 50, generator=g, dtype=torch.float64)
    steps = [0.2, 0.45, 0.9]
    s = torch.tensor(steps, dtype=torch.float64, requires_grad=True)
    fake_quant(x, s.reshape(3, 1), torch.zeros(3, 1, dtype=torch.float64), qmin, qmax, scale_grad="lsq").backward(up)
    for c in range(3):
        local = _lsq_local_np(x[c].numpy(), steps[c], 0.0, qmin, qmax)
        assert float(s.grad[c]) == pytest.approx(float((up[c].numpy() * local).sum()), rel=1e-12)


# ----- step gradient: finite differences --------------------------------------------------

def _fd(f, s0: float, h: float) -> float:
    return (f(s0 + h) - f(s0 - h)) / (2 * h)


@pytest.mark.parametrize("bits,signed,zp", [(4, True, 0.0), (3, False, 1.0), (2, True, 0.0)])
def test_step_gradients_vs_finite_differences(bits, signed, zp):
    qmin, qmax = int_range(bits, signed)
    g = _gen(10 + bits)
    s0 = 0.25
    z = torch.tensor(zp, dtype=torch.float64)
    x = torch.randn(3000, generator=g, dtype=torch.float64) * s0 * (qmax - qmin) * 0.5
    keep = _away_from_boundaries(x / s0 + zp, qmin, qmax)
    x = x[keep]
    up = torch.randn(x.numel(), generator=g, dtype=torch.float64)
    pre = x / s0 + zp
    clipped = (pre <= qmin) | (pre >= qmax)
    inside = ~clipped
    assert clipped.sum() > 20 and inside.sum() > 200

    def fwd(s, mask=None):
        y = fake_quant(x, torch.tensor(s, dtype=torch.float64), z, qmin, qmax)
        return float((up * y)[mask].sum()) if mask is not None else float((up * y).sum())

    h = 1e-7
    fd_total, fd_clipped = _fd(fwd, s0, h), _fd(lambda s: fwd(s, clipped), s0, h)
    # with codes fixed the forward is linear in s: the FD is sum g * (q - z)
    q = torch.clamp(torch.round(pre), qmin, qmax)
    assert fd_total == pytest.approx(float((up * (q - zp)).sum()), rel=1e-6, abs=1e-6)

    s = torch.tensor(s0, dtype=torch.float64, requires_grad=True)
    fake_quant(x, s, z, qmin, qmax, scale_grad="clip").backward(up)
    assert float(s.grad) == pytest.approx(fd_clipped, rel=1e-6, abs=1e-6)

    s = torch.tensor(s0, dtype=torch.float64, requires_grad=True)
    fake_quant(x, s, z, qmin, qmax, scale_grad="lsq").backward(up)
    fd_smooth = _fd(lambda t: float((up * x / t)[inside].sum()), s0, h)
    assert float(s.grad) == pytest.approx(fd_total + s0 * fd_smooth, rel=1e-6, abs=1e-6)


def test_step_gradient_sign_reduces_mse():
    # one gradient step on the quantization MSE with the LSQ gradient lowers the MSE from a too-small step
    g = _gen(3)
    x = torch.randn(20000, generator=g, dtype=torch.float64)
    s = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)  # 4-bit signed clips at 0.35: far too small
    loss = (fake_quant(x, s, torch.tensor(0.0, dtype=torch.float64), -8, 7, scale_grad="lsq") - x).pow(2).mean()
    loss.backward()
    assert float(s.grad) < 0
    with torch.no_grad():
        s2 = s - 0.01 * s.grad.sign()
        loss2 = (fake_quant(x, s2, torch.tensor(0.0, dtype=torch.float64), -8, 7) - x).pow(2).mean()
    assert float(loss2) < float(loss.detach())


# ----- PACT -------------------------------------------------------------------------------

def _pact(bits=4, alpha=2.0, signed=False, gradient="pact"):
    q = PACTQuantizer(bits, signed, init=alpha, gradient=gradient)
    q.finalize()
    return q


def test_pact_alpha_gradient_is_sum_where_x_ge_alpha():
    q = _pact(4, 2.0)
    g = _gen(4)
    # x == alpha exactly is left out: whether x/(alpha/15) reaches 15 depends on the float rounding
    # of alpha/15 (see the report); elements just either side of alpha are included.
    x = torch.cat([torch.tensor([2.0 * (1 + 1e-5), 2.0 * (1 - 1e-5), 5.0, -1.0, 0.0, 1.999]),
                   torch.randn(200, generator=g) * 2])
    up = torch.randn(x.numel(), generator=g)
    x.requires_grad_(True)
    q.train()
    q(x).backward(up)
    expect = float(up[x.detach() >= 2.0].sum())
    assert float(q.alpha.grad) == pytest.approx(expect, rel=1e-5, abs=1e-5)
    # count form: with upstream 1 the gradient is the number of clipped elements
    q.alpha.grad = None
    q(x).sum().backward()
    assert float(q.alpha.grad) == pytest.approx(float((x.detach() >= 2.0).sum()), abs=1e-4)
    # x gradient: 1 on 0 < x < alpha, 0 elsewhere
    inside = ((x.detach() > 0) & (x.detach() < 2.0)).float()
    x.grad = None
    q(x).backward(up)
    assert torch.equal(x.grad, up * inside)


def test_pact_alpha_gradient_sums_over_batch_and_channels():
    q = _pact(3, 1.0)
    x = torch.full((4, 3, 5, 5), 0.3)
    x[:, :, 0, 0] = 7.0  # 12 clipped elements
    q.train()
    q(x).sum().backward()
    assert float(q.alpha.grad) == pytest.approx(12.0, abs=1e-5)


def test_pact_plus_adds_in_range_term():
    bits, alpha = 3, 1.6
    n = 2**bits - 1
    q = _pact(bits, alpha, gradient="pact+")
    g = _gen(5)
    x = torch.rand(300, generator=g) * 2.4 - 0.3
    up = torch.randn(300, generator=g)
    q.train()
    q(x).backward(up)
    xd = x.double().numpy()
    s = alpha / n
    z = xd / s
    above, inside = xd >= alpha, (xd > 0) & (xd < alpha)
    expect = up.double().numpy()[above].sum() + (up.double().numpy() * (np.round(z) - z) / n)[inside].sum()
    assert float(q.alpha.grad) == pytest.approx(float(expect), rel=1e-4, abs=1e-4)
    # and differs from the paper's gradient
    assert abs(float(q.alpha.grad) - up.numpy()[above].sum()) > 1e-3


def test_pact_two_sided_alpha_gradient():
    q = _pact(4, 1.0, signed=True)
    assert (q.qmin, q.qmax) == (-7, 7)
    x = torch.tensor([-3.0, -1.0001, -0.5, 0.2, 0.99, 1.0001, 4.0])
    up = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0])
    q.train()
    q(x).backward(up)
    # d clip(x, -a, a) / da = -1 where x <= -a, +1 where x >= a
    assert float(q.alpha.grad) == pytest.approx(-(1 + 2) + (32 + 64), abs=1e-4)


def test_pact_alpha_learns_to_reduce_clipping():
    g = _gen(6)
    x = torch.rand(4096, generator=g) * 4.0  # uniform on [0, 4]
    q = _pact(4, 1.0)
    q.train()
    opt = torch.optim.SGD([q.alpha], lr=1e-4)
    a0 = q.alpha.item()
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = (q(x) - x).pow(2).sum()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert q.alpha.item() > a0 + 0.5
    assert losses[-1] < 0.5 * losses[0]


# ----- LSQ --------------------------------------------------------------------------------

def test_lsq_weight_step_gradient_with_grad_scale():
    g = _gen(7)
    w = torch.randn(16, 8, generator=g)
    q = make_quantizer("lsq", bits=4, role="weight")
    q.init_from(w)
    assert (q.qmin, q.qmax) == (-8, 7)
    up = torch.randn(16, 8, generator=g)
    q.train()
    q(w).backward(up)
    s0 = float(q.get_scale().detach())
    local = _lsq_local_np(w.double().numpy(), s0, 0.0, -8, 7)
    gscale = 1.0 / math.sqrt(w.numel() * 7)
    assert float(q.scale.grad) == pytest.approx(gscale * float((up.double().numpy() * local).sum()), rel=1e-4)


def test_lsq_grad_scale_values():
    w = torch.randn(6, 4, 3, 3)
    qw = make_quantizer("lsq", bits=4, role="weight")
    qw.init_from(w)
    assert qw.grad_scale(w) == pytest.approx(1 / math.sqrt(w.numel() * 7), rel=1e-12)
    qc = make_quantizer("lsq", bits=3, role="weight", granularity="channel")
    qc.init_from(w)
    assert qc.grad_scale(w) == pytest.approx(1 / math.sqrt(4 * 3 * 3 * 3), rel=1e-12)
    qg = make_quantizer("lsq", bits=2, role="weight", granularity="group:12")
    qg.init_from(w)
    assert qg.get_scale().shape == (6, 3)
    assert qg.grad_scale(w) == pytest.approx(1 / math.sqrt(12 * 1), rel=1e-12)
    a = torch.rand(32, 5, 4, 4)
    qa = make_quantizer("lsq", bits=4, role="activation")
    qa.init_from(a)
    assert qa.qmax == 15
    assert qa.grad_scale(a) == pytest.approx(1 / math.sqrt(5 * 4 * 4 * 15), rel=1e-12)  # per-sample features
    qn = make_quantizer("lsq", bits=4, role="activation", n_features="numel")
    qn.init_from(a)
    assert qn.grad_scale(a) == pytest.approx(1 / math.sqrt(a.numel() * 15), rel=1e-12)


def test_lsq_activation_step_gradient_uses_per_sample_features():
    g = _gen(8)
    a = torch.rand(8, 3, 2, 2, generator=g) * 3
    q = make_quantizer("lsq", bits=2, role="activation")
    q.init_from(a)
    q.train()
    up = torch.randn_like(a)
    q(a).backward(up)
    s0 = float(q.get_scale().detach())
    local = _lsq_local_np(a.double().numpy(), s0, 0.0, 0, 3)
    expect = float((up.double().numpy() * local).sum()) / math.sqrt(3 * 2 * 2 * 3)
    assert float(q.scale.grad) == pytest.approx(expect, rel=1e-4)


def test_lsq_per_channel_step_gradients():
    g = _gen(9)
    w = torch.randn(3, 10, generator=g) * torch.tensor([[0.1], [1.0], [3.0]])
    q = make_quantizer("lsq", bits=3, role="weight", granularity="channel")
    q.init_from(w)
    up = torch.randn(3, 10, generator=g)
    q.train()
    q(w).backward(up)
    assert q.scale.grad.shape == (3,)
    for c in range(3):
        s0 = float(q.get_scale().detach()[c])
        local = _lsq_local_np(w[c].double().numpy(), s0, 0.0, -4, 3)
        expect = float((up[c].double().numpy() * local).sum()) / math.sqrt(10 * 3)
        assert float(q.scale.grad[c]) == pytest.approx(expect, rel=1e-4, abs=1e-7)


def test_lsq_trains_step_and_weights_on_a_tiny_problem():
    torch.manual_seed(0)
    g = _gen(11)
    x = torch.randn(256, 32, generator=g)
    w_true = torch.randn(8, 32, generator=g) * 0.5
    y = x @ w_true.t()
    w = torch.nn.Parameter(w_true * 0.6 + 0.05 * torch.randn(8, 32, generator=g))  # "pretrained", off target
    q = make_quantizer("lsq", bits=3, role="weight")
    q.init_from(w.detach())
    s_init = float(q.get_scale().detach())
    q.train()
    opt = torch.optim.SGD([w, q.scale], lr=0.05, momentum=0.9)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = (x @ q(w).t() - y).pow(2).mean()
        loss.backward()
        assert q.scale.grad is not None and torch.isfinite(q.scale.grad).all()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
    assert abs(float(q.get_scale().detach()) - s_init) > 0.02 * s_init
    # the learned grid is still the exact grid
    assert torch.equal(q(w), q.dequantize(q.quantize_int(w)))


# ----- non-learned quantizers: STE only ---------------------------------------------------

def test_sawb_pass_through_and_clip_grad():
    g = _gen(12)
    w = torch.randn(64, 16, generator=g)
    for clip_grad in (False, True):
        q = SAWBQuantizer(2, clip_grad=clip_grad)
        q.train()
        wp = w.clone().requires_grad_(True)
        up = torch.randn_like(w)
        q(wp).backward(up)
        alpha = float(q.scale) * (q.qmax - float(q.zero_point))  # top level of the even grid
        if clip_grad:  # "SAWB": zero where |w| > alpha
            expect = up * (w.abs() < alpha)
            assert (w.abs() > alpha).sum() > 0
            assert torch.equal(wp.grad, expect)
        else:  # "SAWB+": straight through everywhere
            assert torch.equal(wp.grad, up)
        assert not q.scale.requires_grad


@pytest.mark.parametrize("method", ["minmax", "percentile", "faq", "aciq"])
def test_fixed_step_quantizers_ste(method):
    g = _gen(13)
    x = torch.randn(1000, generator=g)
    q = make_quantizer(method, bits=3, role="activation", signed=True)
    q.init_from(x * 0.3)  # calibrate on a narrower tensor so that x gets clipped
    q.eval()
    xp = x.clone().requires_grad_(True)
    q(xp).sum().backward()
    pre = x / q.scale + q.zero_point
    inside = ((pre > q.qmin) & (pre < q.qmax)).float()
    assert 0 < inside.sum() < x.numel()
    assert torch.equal(xp.grad, inside)
