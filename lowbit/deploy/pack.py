"""Dense bit packing of integer weight codes.

Every quantized weight is stored as its *offset code* ``u = q - qmin`` (``0 <= u < 2^b``) in a
little-endian bit stream: element ``i`` of a layer occupies stream bits ``[o_i, o_i + b_i)``
with ``o_i = b_0 + ... + b_(i-1)``, least significant bit first, and stream bit ``k`` is bit
``k % 8`` of byte ``k // 8``. So

- 2-bit codes are four per byte (element ``4j`` in bits 0-1 of byte ``j``), 4-bit codes two
  per byte (low nibble first), 1-bit codes eight per byte;
- 3-, 5-, 6-, 7-bit codes and per-channel widths (bit allocation) are packed densely with no
  padding between elements or channels: channel ``c`` (the tensor's first axis, in order)
  holds ``numel / C`` elements of ``b_c`` bits each; a 0-bit channel takes no space;
- a layer's stream is padded with zero bits to a whole byte, so it is exactly
  ``ceil(sum_i b_i / 8)`` bytes.

Uniform 8-bit signed weights are not bit-packed: the exporter stores them as ``int8`` codes.
"""

from __future__ import annotations

import numpy as np
import torch

MAX_BITS = 16


def packed_nbytes(widths: torch.Tensor | int, per_channel: int | None = None) -> int:
    """Bytes of a stream of ``per_channel`` elements per channel at ``widths`` (a tensor) bits,
    or of ``per_channel`` elements at one width ``widths`` (an int)."""
    if isinstance(widths, int):
        total = widths * int(per_channel)
    else:
        total = int(widths.to(torch.int64).sum()) * int(per_channel)
    return (total + 7) // 8


def _element_widths(widths, n: int, channels: int | None) -> np.ndarray:
    if isinstance(widths, (int, np.integer)):
        return np.full(n, int(widths), dtype=np.int64)
    w = np.asarray(torch.as_tensor(widths).to(torch.int64).cpu(), dtype=np.int64).reshape(-1)
    if channels is None:
        channels = w.size
    if w.size != channels or n % max(channels, 1):
        raise ValueError(f"{w.size} channel widths do not divide {n} elements")
    return np.repeat(w, n // channels) if channels else np.zeros(0, dtype=np.int64)


def pack_bits(codes: torch.Tensor, widths) -> torch.Tensor:
    """Pack non-negative integer ``codes`` (any shape; first axis = channels when ``widths`` is a
    per-channel tensor) into a ``uint8`` tensor of ``ceil(sum(widths) / 8)`` bytes."""
    u = np.asarray(codes.detach().to(torch.int64).cpu()).reshape(-1)
    channels = None if isinstance(widths, (int, np.integer)) else (codes.shape[0] if codes.dim() else 1)
    w = _element_widths(widths, u.size, channels)
    if w.size and (w.min() < 0 or w.max() > MAX_BITS):
        raise ValueError(f"bit widths must lie in 0..{MAX_BITS}")
    if u.size and (u.min() < 0 or np.any(u >= (np.int64(1) << w))):
        bad = int(np.argmax((u < 0) | (u >= (np.int64(1) << w))))
        raise ValueError(f"code {int(u[bad])} at element {bad} does not fit in {int(w[bad])} bits")
    if not u.size:
        return torch.zeros(0, dtype=torch.uint8)
    if np.all(w == w[0]) and w[0] in (1, 2, 4, 8):  # fast path: whole elements per byte
        b = int(w[0])
        per = 8 // b
        pad = (-u.size) % per
        v = np.concatenate([u, np.zeros(pad, dtype=np.int64)]).reshape(-1, per)
        shifts = (np.arange(per, dtype=np.int64) * b)[None, :]
        return torch.from_numpy((v << shifts).sum(1).astype(np.uint8))
    bits = ((u[:, None] >> np.arange(MAX_BITS, dtype=np.int64)[None, :]) & 1).astype(np.uint8)
    keep = np.arange(MAX_BITS)[None, :] < w[:, None]
    stream = bits[keep]  # row-major: element by element, LSB first
    return torch.from_numpy(np.packbits(stream, bitorder="little"))


def unpack_bits(packed: torch.Tensor, widths, shape) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``int64`` offset codes of ``shape`` from the byte stream."""
    shape = tuple(int(s) for s in shape)
    n = int(np.prod(shape)) if shape else 1
    channels = None if isinstance(widths, (int, np.integer)) else (shape[0] if shape else 1)
    w = _element_widths(widths, n, channels)
    need = (int(w.sum()) + 7) // 8
    data = np.asarray(packed.detach().cpu(), dtype=np.uint8).reshape(-1)
    if data.size != need:
        raise ValueError(f"packed stream holds {data.size} bytes, expected {need} for {n} elements")
    if not n or not w.any():  # nothing stored: every code is 0
        return torch.zeros(shape, dtype=torch.int64)
    if np.all(w == w[0]) and w[0] in (1, 2, 4, 8):
        b = int(w[0])
        per = 8 // b
        v = (data.astype(np.int64)[:, None] >> (np.arange(per, dtype=np.int64) * b)[None, :]) & ((1 << b) - 1)
        return torch.from_numpy(v.reshape(-1)[:n].copy()).reshape(shape)
    stream = np.unpackbits(data, bitorder="little").astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(w)[:-1]])
    j = np.arange(MAX_BITS, dtype=np.int64)[None, :]
    idx = np.minimum(offsets[:, None] + j, stream.size - 1)
    take = j < w[:, None]
    u = ((stream[idx] * take) << j).sum(1)
    return torch.from_numpy(u).reshape(shape)
