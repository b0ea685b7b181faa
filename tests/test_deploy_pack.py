"""Bit packing of weight codes: round trips for every width 1-8 and mixed per-channel widths, exact sizes,
and the documented byte layout."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.deploy.pack import pack_bits, packed_nbytes, unpack_bits


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), shape=st.lists(st.integers(1, 9), min_size=1, max_size=4), seed=st.integers(0, 2**31))
def test_uniform_width_round_trip_and_exact_size(bits, shape, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, shape, generator=g)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == (codes.numel() * bits + 7) // 8 == packed_nbytes(bits, codes.numel())
    assert torch.equal(unpack_bits(packed, bits, codes.shape), codes)


@settings(max_examples=60, deadline=None)
@given(widths=st.lists(st.integers(0, 8), min_size=1, max_size=12), per=st.integers(1, 11), seed=st.integers(0, 2**31))
def test_mixed_per_channel_widths_round_trip(widths, per, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.tensor(widths)
    codes = torch.stack([torch.randint(0, 2**b, (per,), generator=g) for b in widths])
    packed = pack_bits(codes, w)
    assert packed.numel() == (per * sum(widths) + 7) // 8 == packed_nbytes(w, per)
    assert torch.equal(unpack_bits(packed, w, codes.shape), codes)


def test_layout_is_little_endian_dense():
    # 2-bit: four per byte, first element in the lowest bits; 4-bit: low nibble first
    assert pack_bits(torch.tensor([1, 2, 3, 0]), 2).tolist() == [1 | 2 << 2 | 3 << 4]
    assert pack_bits(torch.tensor([1, 15, 7]), 4).tolist() == [0xF1, 0x07]
    # 3-bit: a continuous bit stream across byte boundaries
    stream = pack_bits(torch.tensor([5, 3, 6]), 3)
    bits = np.unpackbits(stream.numpy(), bitorder="little")[:9]
    assert bits.tolist() == [1, 0, 1, 1, 1, 0, 0, 1, 1]
    # mixed widths: channel 0 at 1 bit, channel 1 at 0 bits (no space), channel 2 at 3 bits
    codes = torch.tensor([[1, 0], [0, 0], [5, 2]])
    assert pack_bits(codes, torch.tensor([1, 0, 3])).tolist() == [0b01010101]  # 1,0 | 101 | 010 (LSB first)


def test_codes_that_do_not_fit_are_refused():
    with pytest.raises(ValueError, match="does not fit in 2 bits"):
        pack_bits(torch.tensor([0, 4]), 2)
    with pytest.raises(ValueError, match="expected"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 4, (4,))
