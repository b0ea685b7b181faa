"""The integer grid under every quantizer (lowbit/quant/grid.py): ranges, rounding, granularity,
the exact ``(q - z) * s`` identity of the fake-quant forward, and the power-of-two helper.

Gradients of ``fake_quant`` are in tests/test_quant_gradients.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.quant import Granularity, fake_quant, int_range, make_granularity, pow2ceil, quantize_int
from lowbit.quant.grid import check_bits, round_


# ----- integer ranges ---------------------------------------------------------------------

@pytest.mark.parametrize("bits", range(1, 17))
def test_int_range_unsigned_and_signed(bits):
    assert int_range(bits, signed=False) == (0, 2**bits - 1)
    assert int_range(bits, signed=True) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    lo, hi = int_range(bits, signed=True)
    assert hi - lo + 1 == 2**bits  # two's complement: exactly 2^b codes
    lo, hi = int_range(bits, signed=False)
    assert hi - lo + 1 == 2**bits


@pytest.mark.parametrize("bits", range(2, 17))
def test_int_range_restricted(bits):
    lo, hi = int_range(bits, signed=True, restricted=True)
    assert (lo, hi) == (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)
    assert lo == -hi and hi - lo + 1 == 2**bits - 1
    # restricted has no effect on unsigned grids
    assert int_range(bits, signed=False, restricted=True) == (0, 2**bits - 1)


def test_int_range_known_values():
    assert int_range(2, True) == (-2, 1)
    assert int_range(4, True) == (-8, 7)
    assert int_range(4, True, True) == (-7, 7)
    assert int_range(8, False) == (0, 255)
    assert int_range(8, True) == (-128, 127)
    assert int_range(1, True) == (-1, 0)
    assert int_range(16, True) == (-32768, 32767)


def test_restricted_one_bit_rejected():
    with pytest.raises(ValueError, match="restricted"):
        int_range(1, True, restricted=True)


@pytest.mark.parametrize("bad", [0, 17, -1, 4.0, True, False, "4", None, 2.5])
def test_bits_outside_1_16_rejected(bad):
    with pytest.raises(ValueError, match="bits"):
        int_range(bad, True)
    with pytest.raises(ValueError, match="bits"):
        int_range(bad, False)
    with pytest.raises(ValueError, match=repr(bad).replace("(", r"\(").replace(")", r"\)")):
        check_bits(bad)


@pytest.mark.parametrize("bits", [1, 2, 8, 16])
def test_check_bits_accepts_ints(bits):
    assert check_bits(bits) == bits


# ----- rounding ---------------------------------------------------------------------------

TIES = torch.tensor([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, 0.49, 0.51, -0.51, 7.0])


def test_round_half_even_on_ties():
    expect = torch.tensor([0.0, 2.0, 2.0, 4.0, -0.0, -2.0, -2.0, 0.0, 1.0, -1.0, 7.0])
    assert torch.equal(round_(TIES, "half_even"), expect)


def test_round_half_up_on_ties():
    # floor(x + 0.5): ties go towards +inf
    expect = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0, -1.0, -2.0, 0.0, 1.0, -1.0, 7.0])
    assert torch.equal(round_(TIES, "half_up"), expect)


def test_round_modes_agree_off_ties():
    x = torch.linspace(-10.3, 10.3, 2001)
    x = x[(x - x.floor() - 0.5).abs() > 1e-3]
    assert torch.equal(round_(x, "half_even"), round_(x, "half_up"))


def test_round_mode_unknown_rejected():
    with pytest.raises(ValueError, match="nearest"):
        round_(TIES, "nearest")


@pytest.mark.parametrize("mode,expect", [("half_even", [0, 2, 2, -0, -2, -2]), ("half_up", [1, 2, 3, 0, -1, -2])])
def test_round_mode_reaches_grid(mode, expect):
    # through quantize_int and fake_quant, with a step that makes x/s the ties exactly
    s = torch.tensor(0.25)
    z = torch.tensor(0.0)
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5]) * s
    q = quantize_int(x, s, z, -8, 7, round_mode=mode)
    assert q.dtype == torch.int32
    assert q.tolist() == expect
    y = fake_quant(x, s, z, -8, 7, round_mode=mode)
    assert torch.equal(y, torch.tensor(expect, dtype=torch.float32) * s)


# ----- the grid itself --------------------------------------------------------------------

def test_fake_quant_known_values():
    s, z = torch.tensor(0.5), torch.tensor(0.0)
    x = torch.tensor([-10.0, -4.0, -3.9, -0.2, 0.26, 1.1, 3.4, 3.5, 3.76, 9.0])
    # signed 4 bit: codes in [-8, 7] -> values in [-4, 3.5]
    y = fake_quant(x, s, z, -8, 7)
    assert torch.equal(y, torch.tensor([-4.0, -4.0, -4.0, 0.0, 0.5, 1.0, 3.5, 3.5, 3.5, 3.5]))
    assert quantize_int(x, s, z, -8, 7).tolist() == [-8, -8, -8, 0, 1, 2, 7, 7, 7, 7]


def test_zero_point_shifts_codes_not_values():
    # round(x/s + z) == round(x/s) + z for integer z away from ties (the module docstring's caveat)
    s = torch.tensor(0.1)
    x = torch.linspace(-0.5, 1.0, 31) + 0.013
    q0 = quantize_int(x, s, torch.tensor(0.0), -100, 100)
    q3 = quantize_int(x, s, torch.tensor(3.0), -100, 100)
    assert torch.equal(q3, q0 + 3)
    y0 = fake_quant(x, s, torch.tensor(0.0), -100, 100)
    y3 = fake_quant(x, s, torch.tensor(3.0), -100, 100)
    assert torch.allclose(y0, y3, atol=1e-6)


def test_half_integer_zero_point_gives_even_levels():
    # SAWB's even level set: z = (2^b - 1)/2, q in [0, 2^b - 1], s = 2 alpha / (2^b - 1)
    alpha = 1.7
    n = 3
    s, z = torch.tensor(2 * alpha / n), torch.tensor(n / 2)
    x = torch.linspace(-3, 3, 1001)
    y = fake_quant(x, s, z, 0, n)
    levels = torch.unique(y)
    assert torch.allclose(levels, torch.tensor([-alpha, -alpha / 3, alpha / 3, alpha]), rtol=1e-6, atol=0)
    assert not (y == 0).any()


@settings(max_examples=30, deadline=None)
@given(bits=st.integers(1, 12), signed=st.booleans(), shape=st.lists(st.integers(1, 7), min_size=1, max_size=4),
       log_step=st.floats(-6, 3), zp=st.integers(-3, 3), seed=st.integers(0, 2**31 - 1),
       mode=st.sampled_from(["half_even", "half_up"]))
def test_grid_exact_identity_property(bits, signed, shape, log_step, zp, seed, mode):
    """fake_quant(x) == (quantize_int(x) - z) * s bit for bit; codes in range; <= 2^b levels; idempotent."""
    g = torch.Generator().manual_seed(seed)
    qmin, qmax = int_range(bits, signed)
    s = torch.tensor(2.0**log_step)
    z = torch.tensor(float(max(qmin, min(qmax, zp))))
    x = torch.randn(*shape, generator=g) * s * (qmax - qmin + 1) * 0.7
    q = quantize_int(x, s, z, qmin, qmax, round_mode=mode)
    assert q.dtype == torch.int32 and q.shape == x.shape
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    y = fake_quant(x, s, z, qmin, qmax, round_mode=mode)
    assert torch.equal(y, (q.float() - z) * s)
    assert torch.unique(y).numel() <= 2**bits
    assert torch.equal(fake_quant(y, s, z, qmin, qmax, round_mode=mode), y)
    # every output is a grid point inside [ (qmin - z) s, (qmax - z) s ]
    assert float(y.min()) >= float((qmin - z) * s) and float(y.max()) <= float((qmax - z) * s)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dense_input_hits_every_code(bits):
    for signed in (False, True):
        qmin, qmax = int_range(bits, signed)
        s, z = torch.tensor(0.03), torch.tensor(0.0)
        x = torch.linspace((qmin - 2) * 0.03, (qmax + 2) * 0.03, 20 * 2**bits)
        q = quantize_int(x, s, z, qmin, qmax)
        assert torch.unique(q).tolist() == list(range(qmin, qmax + 1))
        assert torch.unique(fake_quant(x, s, z, qmin, qmax)).numel() == 2**bits


def test_fake_quant_rejects_unknown_scale_grad():
    with pytest.raises(ValueError, match="scale_grad"):
        fake_quant(torch.zeros(3), torch.tensor(1.0), torch.tensor(0.0), 0, 3, scale_grad="pact")


def test_fake_quant_per_channel_broadcast():
    x = torch.tensor([[0.3, 0.9, -2.0], [0.3, 0.9, -2.0]])
    s = torch.tensor([[0.5], [0.25]])
    z = torch.zeros(2, 1)
    y = fake_quant(x, s, z, -4, 3)
    assert torch.equal(y, torch.tensor([[0.5, 1.0, -2.0], [0.25, 0.75, -1.0]]))


# ----- granularity ------------------------------------------------------------------------

def test_granularity_tensor_and_channel_shapes():
    x = torch.randn(4, 6, 3, 3)
    g = Granularity()
    assert g.param_shape(x) == () and g.reduce_dims(x) == (0, 1, 2, 3)
    gc0, gc1 = Granularity("channel", axis=0), Granularity("channel", axis=1)
    assert gc0.param_shape(x) == (4,) and gc0.reduce_dims(x) == (1, 2, 3)
    assert gc1.param_shape(x) == (6,) and gc1.reduce_dims(x) == (0, 2, 3)
    p = torch.arange(6.0)
    assert gc1.expand(p, x).shape == (1, 6, 1, 1)
    assert torch.equal(gc1.reduce(x, "amax"), x.amax(dim=(0, 2, 3)))
    assert torch.equal(Granularity("channel", axis=-1).reduce(x, "amin"), x.amin(dim=(0, 1, 2)))


def test_granularity_group_view_and_reduce():
    w = torch.arange(2 * 4 * 2 * 2, dtype=torch.float32).reshape(2, 4, 2, 2)  # 16 per output channel
    g = Granularity("group", group_size=8)
    v = g.view(w)
    assert v.shape == (2, 2, 8)
    assert g.param_shape(w) == (2, 2)
    assert torch.equal(v.reshape(w.shape), w)
    # group (c, k) is the k-th run of 8 consecutive elements of output channel c
    flat = w.reshape(2, -1)
    assert torch.equal(g.reduce(v, "amax"), torch.stack([flat[:, :8].amax(1), flat[:, 8:].amax(1)], 1))
    assert g.expand(torch.ones(2, 2), v).shape == (2, 2, 1)


def test_granularity_errors():
    with pytest.raises(ValueError, match="granularity"):
        Granularity("row")
    with pytest.raises(ValueError, match="group_size"):
        Granularity("group")
    with pytest.raises(ValueError, match="group_size"):
        Granularity("group", group_size=0)
    with pytest.raises(ValueError, match="does not divide"):
        Granularity("group", group_size=5).view(torch.zeros(2, 8))


def test_make_granularity_specs():
    assert make_granularity("tensor", "weight") == Granularity()
    assert make_granularity(None, "activation") == Granularity()
    assert make_granularity("channel", "weight") == Granularity("channel", axis=0)
    assert make_granularity("channel", "activation") == Granularity("channel", axis=1)
    assert make_granularity("group:8", "weight") == Granularity("group", group_size=8)
    with pytest.raises(ValueError, match="weights only"):
        make_granularity("group:8", "activation")
    with pytest.raises(ValueError, match="group:SIZE"):
        make_granularity("group:x", "weight")
    with pytest.raises(ValueError, match="'rows'"):
        make_granularity("rows", "weight")


# ----- power of two -----------------------------------------------------------------------

def test_pow2ceil_values():
    x = torch.tensor([1.0, 0.5, 0.51, 0.49, 3.0, 4.0, 4.0001, 1e-3, 2.0**-20, 1000.0])
    expect = torch.tensor([1.0, 0.5, 1.0, 0.5, 4.0, 4.0, 8.0, 2.0**-9, 2.0**-20, 1024.0])
    assert torch.equal(pow2ceil(x), expect)


@settings(max_examples=30, deadline=None)
@given(v=st.floats(1e-6, 1e6, allow_nan=False))
def test_pow2ceil_property(v):
    p = float(pow2ceil(torch.tensor(v, dtype=torch.float64)))
    assert p >= v and p / 2 < v
    assert math.log2(p) == round(math.log2(p))
    assert p == 2.0 ** math.ceil(np.log2(v))
