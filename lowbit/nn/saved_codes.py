"""Keep the input a quantized layer saves for its backward as integer codes instead of float32.

A quantized convolution or linear layer computes ``y = layer(x_hat, w_hat)`` with ``x_hat = c * s``: ``c = q - z`` is
an integer (a multiple of 1/2 for SAWB's half-integer zero point) and ``s`` the step (lowbit.quant.grid). Autograd
keeps ``x_hat`` until the backward, for the weight gradient: 4 bytes per element, the largest share of a fine-tuning
step's memory beside the float activations the model saves anyway. Inside :func:`saved_as_codes`, a saved-tensor hook
stores that tensor as ``k = round(m x_hat / s)`` (``m = 1``, or 2 for half-integer codes) in the narrowest integer
type that holds the grid's code range (int8, uint8, else int16), or keeps the int8/uint8 codes the fake-quant
already produced (grids without a zero point; no extra pass), and the backward gets back ``k * (s / m)``. That is
``x_hat`` bit for bit: ``c`` is exact in float32 and ``c * s`` repeats the product that produced ``x_hat``; so values
and gradients are unchanged (tests/test_saved_codes.py checks the gradients against a run without the hook). Cost:
two fast passes over the input in the backward per layer, and three in the forward where the fake-quant gave no
codes.

Our choice of mechanism (autograd's saved-tensor hooks rather than a hand-written convolution backward): the layer's
own backward runs unchanged. Tensors other than ``x_hat`` pass through the hook untouched. Not used inside activation
checkpointing (which manages the same saved tensors itself) nor for tensors other than float32.
"""

from __future__ import annotations

import contextlib

import torch

from lowbit.quant.grid import code_dtype


def saved_as_codes(x_hat: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin, qmax,
                   codes: torch.Tensor | None = None):
    """A context in which autograd saves ``x_hat`` (fake-quantized with the expanded ``scale``/``zero_point`` on the
    integer range ``[qmin, qmax]``, ints or per-channel tensors) as integer codes; a no-op context where that cannot
    pay or cannot be exact (no gradient recorded, not float32, a code range wider than int16). ``codes``: the codes
    the fake-quant already produced (``x_hat = codes * scale``, no zero point), kept as they are instead of being
    recomputed."""
    if not torch.is_grad_enabled() or x_hat.dtype != torch.float32 or scale.dtype != torch.float32:
        return contextlib.nullcontext()
    step = scale.detach().clone()  # a step the optimizer or a later forward changes in place stays as it was
    key = (x_hat.data_ptr(), x_hat.shape, x_hat.stride(), x_hat.dtype)  # not x_hat itself: autograd keeps the hooks
    if codes is not None and codes.shape == x_hat.shape:
        return torch.autograd.graph.saved_tensors_hooks(_packer(key, lambda t: codes, step, 1), _unpack)
    z_low, z_high = (float(zero_point.min()), float(zero_point.max())) if zero_point.numel() else (0.0, 0.0)
    halves = 2 if not torch.equal(zero_point, zero_point.round()) else 1
    low = (float(torch.as_tensor(qmin).min()) - z_high) * halves
    high = (float(torch.as_tensor(qmax).max()) - z_low) * halves
    dtype = code_dtype(low, high)
    if dtype is None:
        return contextlib.nullcontext()

    def encode(t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.round(t / step * halves if halves != 1 else t / step).to(dtype)

    return torch.autograd.graph.saved_tensors_hooks(_packer(key, encode, step, halves), _unpack)


def _packer(key: tuple, encode, step: torch.Tensor, halves: int):
    """The pack hook: the tensor of ``key`` (data pointer, shape, strides, dtype) as ``(encode(t), step, halves)``;
    any other saved tensor as it is."""
    def pack(t: torch.Tensor):
        if (t.data_ptr(), t.shape, t.stride(), t.dtype) != key:
            return t
        return encode(t), step, halves
    return pack


def _unpack(packed):
    """``codes * step`` (``codes * (step / 2)`` for half-integer codes): the integer codes convert to float exactly,
    and halving the step is exact, so this is the product that made ``x_hat``. Converted first and multiplied in
    place: two vectorized passes, about twice as fast as one mixed-type multiplication on a CPU."""
    if isinstance(packed, torch.Tensor):
        return packed
    codes, step, halves = packed
    return codes.to(step.dtype).mul_(step * (1.0 / halves) if halves != 1 else step)
