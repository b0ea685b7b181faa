"""Integer reference engine: runs an exported CNN with integer tensors only.

This is the proof that a lowbit model runs on integer hardware. Built from an export folder
(or a quantized model, through the same export code), it executes the exported graph with
``int32``/``int64`` tensors: integer inputs and weights, integer accumulation,
requantisation by an integer multiplier and a right shift, ReLU, residual additions, max and
average pooling and the classifier, all in the integer domain. Float appears only at the two
boundaries: quantizing the input image (exactly the ``clamp(round(x / s + z))`` of the first
layer's input quantizer) and, optionally, multiplying the integer logits by their step.

Values
------
Every tensor of the graph is held in one of two integer representations:

* **codes** on a layer's input grid: ``q`` with real value ``(q - z) * s`` (``s``, ``z`` per
  tensor or per channel). A tensor whose every consumer (looking through ReLU, max-pooling,
  flatten) is a quantized layer with one and the same input grid is produced directly on that
  grid: this is the usual conv -> ReLU -> conv chain, and it is exactly what the fake-quant
  model computes at that point.
* **wide**: ``int64`` ``Q`` with real value ``Q * 2^-E``, one exponent ``E`` for the model,
  chosen so that 256 times the largest clip of any activation grid takes about 2^50
  (``2^-E`` is then about 2^-34 of an 8-bit step). Wide holds what the fake-quant model keeps
  in float: the output of a conv that feeds a residual addition, the residual sum itself (its
  consumers - the next block's convs and the identity shortcut - need it at different
  grids or unquantized), the input of average pooling. A consumer with a grid requantises
  from wide, with one exact rounding (:func:`requantize` multiplies a 62-bit value by a 31-bit
  multiplier without overflow). The logits leave as ``int32`` (wide shifted down by 19 bits).
  Values beyond ``2^62`` (int32 for the logits) saturate and are counted in
  :attr:`IntegerEngine.stats` (``saturated``); none do on the zoo models.

Layers
------
For a conv/linear with weight codes ``q_w`` (grid ``s_w``, ``z_w`` per output channel ``o``)
and input codes ``q_x`` (``s_x``, integer ``z_x``), the real output is

    y_o = s_w,o s_x sum_k (q_w - z_w,o)(q_x - z_x) + b_o
        = s_w,o s_x [ sum_k (q_w - zi_o)(q_x - z_x)  -  zf_o sum_k (q_x - z_x)  +  b_o / (s_w,o s_x) ]

with ``zi = round(z_w)`` and the fractional part ``zf = z_w - zi`` (non-zero after weight bias
correction; -0.5 for SAWB's even level set). The engine computes

    A_o = sum_k (q_w - zi_o)(q_x - z_x)                       int32 (int64 when its bound needs it)
    S   = sum_k (q_x - z_x)   (a ones-kernel conv, only if some zf != 0)
    T_o = A_o * M0_o  +  Bt_o  -  S * ZM0_o                   int64
    out = round(T_o / 2^n_o) + z_out  (clamped to the output grid; wide: kept in int64)

The real multiplier ``M_o = s_w,o s_x / s_out`` is written ``M0_o 2^-n_o`` with ``M0_o`` in
``[2^30, 2^31)`` as gemmlowp's ``QuantizeMultiplier`` does (``frexp``);
``ZM0_o = round(zf_o M0_o)`` carries the zero-point correction in the same fixed-point frame.
The bias term ``Bt_o`` is, by default, the float32 bias exactly in that frame,
``round(b_o / (s_w,o s_x) * M0_o)``; with ``bias="int32"`` (or an export written with
``float_bias=False``) it is ``B_o * M0_o`` with the exported int32 bias
``B_o = round_half_even(b_o / (s_w,o s_x))``, what a runtime adding only the int32 bias computes.
The rounding is one exact integer rounding of ``T / 2^n`` (half to even, or half up when the
consumer's quantizer rounds half up), not gemmlowp's two roundings
(``SaturatingRoundingDoublingHighMul`` then ``RoundingDivideByPOT``). ``n_o`` is lowered (and
``M0_o`` shortened) only where the worst case of ``T`` would not fit ``int64``. Where ``M_o`` is
a power of two (FAQ's power-of-two steps with batch norm folded before quantization) and no
correction term is needed, the multiply disappears: ``out = round((A 2^16 + Bt) / 2^(k+16))``,
shifts only (or a left shift); :meth:`IntegerEngine.describe` lists which layers run that way.

Per-channel input steps (ACIQ with ``granularity: channel``) give no single accumulator
scale. The engine then folds the per-(output, input channel) multiplier into int64 weights,
``W_o,i,k = q_w M0_o,i - round(z_w,o M_o,i 2^n_o)`` with ``M_o,i = s_w,o s_x,i / s_out``, and
accumulates ``sum W (q_x - z_x,i)`` in int64 (equivalently: an int32 partial sum per input
channel, each scaled by its own multiplier); the bias enters as ``round(b_o / s_out 2^n_o)`` (or
``B_o`` times the multiplier of the largest input step, the step it was exported in).

Residual additions add two wide values (int64); average pooling sums its window exactly in
int64 and requantises with ``M = s_in / (count * s_out)``; max pooling and ReLU (``max(q, z)``)
act on codes or wide values directly; flatten/reshape only reshape. A clamp to constant bounds
``[lo, hi]`` (ReLU6) clamps codes to the codes of its bounds, ``clamp(q, Q(lo), Q(hi))`` with
``Q(v) = clamp(round(v / s + z), qmin, qmax)`` computed as the quantizer computes it: rounding is
monotone, so ``Q(clamp(x, lo, hi)) = clamp(Q(x), Q(lo), Q(hi))`` exactly (on wide values the bounds
are ``round(lo 2^E)``, ``round(hi 2^E)``). Zero padding pads codes with their zero point (the code
of 0.0) and wide values with 0.

Exactness
---------
Bit-exact, i.e. the exact integer result of the stated integer operation: every
accumulation, the zero-point correction sum ``S``, max pooling, ReLU, the residual sum,
the pooling sums, every multiply-and-rounding-shift (ties to even or up, as the consumer's
quantizer), and the input quantization (the same float expression the fake-quant model
evaluates, so the first layer's codes are identical).

Approximated, against the real-valued quantized network: each real multiplier (31 significant
bits: relative error below ``2^-31``; at most 2^-23 of a code on an 8-bit grid), the bias in
the fixed-point frame (the same precision; with ``bias="int32"`` the bias is off by up to 0.5
accumulator units, ``0.5 M`` output codes - on W4A4 ResNet-20 that alone changes about 3 % of
top-1 predictions), and the wide representation (one rounding to ``2^-E`` each time a value
enters it). The fake-quant model has its own float32 rounding (about 2^-24 relative per
operation), so the two agree code for code except where a value lies within these tiny margins
of a rounding boundary; such a one-code difference can then spread through later layers. On
the Fashion-MNIST test set the top-1 predictions agree on >= 99.9 % of images
(``benchmarks/export_engine.py``). Through 50+ layers (MobileNetV2, EfficientNet-Lite0) the
spread is wide enough that the float32 fake-quant model disagrees with its own float64 evaluation
on a few predictions in a thousand; the engine agrees with the float64 evaluation more often than
the float32 model does (on 10,000 Fashion-MNIST images through the transferred models: 99.94-99.96 %
against 99.46-99.88 %; ``benchmarks/imagenet_deploy.py``; ``verify_export(..., float64=True)``).

Not supported (a clear :class:`~lowbit.deploy.errors.ExportError` naming the layer and op):
layers exported in float (weights or input), group-wise weight steps, fractional activation
zero points, average pooling with ``ceil_mode`` or with padding excluded from the count, and
every operation :mod:`lowbit.deploy.graph` does not know.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from lowbit.deploy.build import build_export
from lowbit.deploy.errors import ExportError
from lowbit.deploy.format import Exported
from lowbit.deploy.graph import LAYER_OPS, Node
from lowbit.deploy.layers import GridData, LayerData
from lowbit.deploy.read import read_export

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
WIDE_LIMIT = 2**62      # wide values are int64 below this magnitude
WIDE_BITS = 50          # a wide value of 256x the largest activation clip takes about 2^50
LOGIT_DROP = WIDE_BITS - 31  # int32 logits: 2^-(E - 19)
MULTIPLIER_BITS = 31
MAX_SHIFT = 62
WIDE_HEADROOM_BITS = 8
FINE_BITS = 16  # fractional bits of an exact bias on the pure-shift path


# ----- fixed-point arithmetic -------------------------------------------------------------
def quantize_multiplier(m: float, bits: int = MULTIPLIER_BITS) -> tuple[int, int]:
    """``(M0, n)`` with ``m ~= M0 * 2^-n`` and ``2^(bits-1) <= |M0| < 2^bits`` (gemmlowp's
    ``QuantizeMultiplier``: ``frexp``, round the mantissa to ``bits`` bits). ``m = 0`` gives ``(0, 0)``;
    ``n`` is at most 62 (tiny multipliers lose low bits) and at least 0 (large ones shift left)."""
    if m == 0.0 or not math.isfinite(m):
        if not math.isfinite(m):
            raise ExportError(f"requantization multiplier {m} is not finite")
        return 0, 0
    if abs(m) >= 2.0**MAX_SHIFT:
        raise ExportError(f"requantization multiplier {m:g} does not fit int64: the steps of consecutive grids are "
                          "inconsistent")
    f, e = math.frexp(abs(m))          # |m| = f 2^e, f in [0.5, 1)
    q = round(f * (1 << bits))
    if q == 1 << bits:
        q //= 2
        e += 1
    n = bits - e
    if n > MAX_SHIFT:
        q = _round_div(q, 1 << (n - MAX_SHIFT))
        n = MAX_SHIFT
    elif n < 0:
        q <<= -n
        n = 0
    return (q if m > 0 else -q), n


def _round_div(a: int, b: int) -> int:
    """round_half_even(a / b) for Python ints, b > 0."""
    q, r = divmod(a, b)
    if 2 * r > b or (2 * r == b and q % 2):
        q += 1
    return q


def rounding_shift(x: torch.Tensor, n: torch.Tensor | int, mode: str = "half_even") -> torch.Tensor:
    """``round(x / 2^n)`` for int64 ``|x| < 2^62`` and shifts ``0 <= n <= 62`` (broadcast), exactly, ties to
    even or up.

    With ``h = 2^(n-1)``: ties up is ``floor((x + h) / 2^n)``; ties to even is
    ``floor((x + h - 1 + b) / 2^n)`` with ``b`` the parity of ``floor(x / 2^n)``, since writing
    ``x = q 2^n + r`` the added ``r + h - 1 + b`` reaches ``2^n`` exactly when ``r > h``, or ``r = h``
    and ``q`` is odd. Shifts of 0 add nothing. Eight tensor operations, no temporaries of the
    rounding decision: the engine calls this once per layer and per requantization.
    """
    n = torch.as_tensor(n, dtype=torch.int64, device=x.device)
    positive = n > 0
    if not bool(positive.any()):
        return x
    half = torch.bitwise_right_shift(torch.bitwise_left_shift(torch.ones_like(n), n), 1)  # 2^(n-1); 0 where n = 0
    if mode == "half_up":
        return torch.bitwise_right_shift(x + half, n)
    add = half - 1 + torch.bitwise_and(torch.bitwise_right_shift(x, n), 1)
    if not bool(positive.all()):
        add = torch.where(positive, add, 0)
    return torch.bitwise_right_shift(x + add, n)


def requantize(t: torch.Tensor, m0: torch.Tensor, n: torch.Tensor, mode: str = "half_even") -> torch.Tensor:
    """``round(t * m0 / 2^n)``, exactly, for int64 ``|t| < 2^62``, ``|m0| < 2^31``, ``0 <= n <= 62`` (broadcast),
    whenever the result fits ``|.| < 2^62``.

    The 93-bit product is never formed: ``t = th 2^31 + tl`` gives ``t m0 = T 2^31 + Bl`` with
    ``T = th m0 + floor(tl m0 / 2^31)`` and ``0 <= Bl < 2^31``, and the rounding of ``(T + Bl 2^-31) / 2^(n-31)``
    is decided from ``T``'s low bits and ``Bl`` (a 64-bit emulation of a 128-bit multiply-shift).
    """
    t = t.to(torch.int64)
    m0 = torch.as_tensor(m0, dtype=torch.int64)
    n = torch.as_tensor(n, dtype=torch.int64)
    if bool((t.abs() < 2**31).all()):
        return rounding_shift(t * m0, n, mode)
    th = torch.bitwise_right_shift(t, 31)
    tl = t - torch.bitwise_left_shift(th, 31)                   # [0, 2^31)
    b = tl * m0
    bh = torch.bitwise_right_shift(b, 31)
    bl = b - torch.bitwise_left_shift(bh, 31)                   # [0, 2^31)
    T = th * m0 + bh                                            # t m0 = T 2^31 + bl
    big = n >= 31
    m = (n - 31).clamp_min(0)
    # n >= 31: q = floor(T / 2^m), remainder r + bl / 2^31 against half = 2^(m-1)
    q = torch.bitwise_right_shift(T, m)
    r = T - torch.bitwise_left_shift(q, m)
    half = torch.where(m > 0, torch.bitwise_left_shift(torch.ones_like(m), (m - 1).clamp_min(0)), torch.zeros_like(m))
    if mode == "half_up":
        up_big = torch.where(m > 0, r >= half, bl >= 2**30)
    else:
        odd = torch.bitwise_and(q, 1) == 1
        up_big = torch.where(m > 0, (r > half) | ((r == half) & ((bl > 0) | odd)),
                             (bl > 2**30) | ((bl == 2**30) & odd))
    out_big = q + up_big.to(torch.int64)
    # n < 31: T 2^(31-n) + bl / 2^n
    k = (31 - n).clamp(0, 31)
    small = torch.bitwise_left_shift(T, k) + rounding_shift(bl, n.clamp(0, 30), mode)
    if mode != "half_up":  # a tie in bl / 2^n resolved against the parity of the whole result
        nn_ = n.clamp(0, 30)
        hb = torch.where(nn_ > 0, torch.bitwise_left_shift(torch.ones_like(nn_), (nn_ - 1).clamp_min(0)),
                         torch.zeros_like(nn_))
        frac = bl - torch.bitwise_left_shift(torch.bitwise_right_shift(bl, nn_), nn_)
        whole = torch.bitwise_left_shift(T, k) + torch.bitwise_right_shift(bl, nn_)
        tie = (nn_ > 0) & (frac == hb)
        small = torch.where(tie, whole + (torch.bitwise_and(whole, 1) == 1).to(torch.int64), small)
    return torch.where(big, out_big, small)


def _multipliers(m: torch.Tensor, bound: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element :func:`quantize_multiplier` of float64 ``m``; where ``bound`` (the largest
    ``|result|`` in output units) would make ``result * 2^n`` overflow int64, ``n`` is lowered."""
    flat = m.reshape(-1).tolist()
    lim = bound.reshape(-1).tolist() if bound is not None else [0.0] * len(flat)
    if len(lim) == 1 and len(flat) > 1:
        lim = lim * len(flat)
    m0, ns = [], []
    for v, b in zip(flat, lim):
        q, n = quantize_multiplier(v)
        if not math.isfinite(b):
            raise ExportError(f"a layer's output bound {b} is not finite: its grids or bias are out of range")
        if b > 0:
            n_max = MAX_SHIFT - 1 - max(0, math.ceil(math.log2(b + 1)))
            if n > n_max:
                q, n = _round_div(q, 1 << (n - n_max)) if q > 0 else -_round_div(-q, 1 << (n - n_max)), max(n_max, 0)
        m0.append(q)
        ns.append(n)
    return torch.tensor(m0, dtype=torch.int64).reshape(m.shape), torch.tensor(ns, dtype=torch.int64).reshape(m.shape)


# ----- value representations --------------------------------------------------------------
@dataclass
class Rep:
    """How a tensor is held: ``codes`` on a grid, or ``wide`` (``int32 Q * 2^-E``)."""

    kind: str                       # codes / wide
    scale: torch.Tensor             # float64 [] or [C]
    zero: torch.Tensor              # int64 [] or [C]
    qmin: torch.Tensor              # int64 [] or [C]
    qmax: torch.Tensor
    round_mode: str = "half_even"
    exponent: int | None = None     # wide only

    @cached_property
    def key(self) -> tuple:
        """Identifies the representation (reps are never mutated, so it is computed once: every
        layer of every call compares keys, and for a per-channel grid this is a list of floats)."""
        if self.kind == "wide":
            return ("wide", self.exponent)
        return ("codes", self.round_mode, *(tuple(t.reshape(-1).tolist()) for t in
                                           (self.scale, self.zero, self.qmin, self.qmax)))

    @property
    def per_channel(self) -> bool:
        return any(t.dim() > 0 for t in (self.scale, self.zero, self.qmin, self.qmax))

    def describe(self) -> str:
        if self.kind == "wide":
            return f"wide int64 x 2^-{self.exponent}"
        return f"codes [{int(self.qmin.min())}, {int(self.qmax.max())}]" + (" per channel" if self.per_channel else "")

    @staticmethod
    def wide(exponent: int) -> Rep:
        return Rep("wide", torch.tensor(2.0 ** -exponent, dtype=torch.float64), torch.tensor(0),
                   torch.tensor(-WIDE_LIMIT + 1), torch.tensor(WIDE_LIMIT - 1), "half_even", exponent)

    @staticmethod
    def from_grid(g: GridData, where: str) -> Rep:
        if g.kind == "group":
            raise ExportError(f"{where}: group-wise activation steps are not supported by the integer engine")
        z = g.zero_point.double()
        if not torch.equal(z, torch.round(z)):
            raise ExportError(f"{where}: its activation zero point is fractional; the integer engine needs integer "
                              "activation zero points")
        lo, hi = g.qrange_tensors()
        return Rep("codes", g.scale.double(), z.to(torch.int64), lo, hi, g.round_mode)


def _bc(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """A per-channel parameter ([C]) shaped to broadcast along dim 1 of an ``ndim`` tensor."""
    if t.dim() == 0:
        return t
    return t.reshape([1, -1] + [1] * (ndim - 2))


# ----- the engine -------------------------------------------------------------------------
@dataclass
class IntegerOutput:
    """Integer logits ``values`` (int32) with real value ``values * scale`` (``scale = 2^-exponent``)."""

    values: torch.Tensor
    exponent: int

    @property
    def scale(self) -> float:
        return 2.0 ** -self.exponent

    def dequantize(self) -> torch.Tensor:
        return self.values.double().mul(self.scale).float()


class _LayerKernel:
    """One conv/linear: integer weights, bias and requantisation to its output representation."""

    def __init__(self, layer: LayerData, node: Node, in_rep: Rep, out_rep: Rep, bias_mode: str = "exact"):
        self.layer, self.node, self.in_rep, self.out_rep = layer, node, in_rep, out_rep
        # "exact": the bias as an integer in the requantisation frame, from the exported float bias;
        # "int32": the exported int32 bias in accumulator units (at most 0.5 units off)
        self.fine_bias = layer.bias is not None and (
            (bias_mode == "exact" and layer.bias_exact) or layer.bias_int32 is None)
        where = f"layer {layer.name!r} ({layer.kind})"
        g = layer.weight_grid
        if g.kind == "group":
            raise ExportError(f"{where}: group-wise weight steps are not supported by the integer engine")
        co = layer.out_channels
        s_w = g.scale.double().expand(co) if g.scale.dim() == 0 else g.scale.double()
        z_w = g.zero_point.double().expand(co) if g.zero_point.dim() == 0 else g.zero_point.double()
        q_w = layer.weight_codes.to(torch.int64)
        wshape = [-1] + [1] * (q_w.dim() - 1)
        s_out = out_rep.scale.expand(co) if out_rep.scale.dim() == 0 else out_rep.scale
        if s_out.numel() != co:
            raise ExportError(f"{where}: its output has {co} channels but the next grid has {s_out.numel()}")
        fan_in = q_w[0].numel()
        x_abs = float((torch.maximum(in_rep.qmax - in_rep.zero, in_rep.zero - in_rep.qmin)).max())
        self.round_mode = out_rep.round_mode
        self.pure_shift = False
        self.folded = in_rep.per_channel and in_rep.scale.dim() > 0
        bias = layer.bias.double() if layer.bias is not None else torch.zeros(co, dtype=torch.float64)
        if not self.folded:
            s_x = float(in_rep.scale)
            m = s_w * s_x / s_out                                       # real multiplier per output channel
            zi = torch.round(z_w)
            zf = z_w - zi
            w = q_w - zi.to(torch.int64).reshape(wshape)
            w_abs = float(w.abs().max()) if w.numel() else 0.0
            acc_bound = fan_in * w_abs * x_abs
            self.acc_dtype = torch.int32 if acc_bound < INT32_MAX else torch.int64
            if layer.bias_int32 is not None:
                B = layer.bias_int32.to(torch.int64)
            else:  # bias beyond int32 in accumulator units (stored float): an int64 bias
                B = torch.round(bias / (s_w * s_x)).to(torch.int64)
            out_bound = (acc_bound + B.abs().double() + fan_in * x_abs * zf.abs()) * m.abs()
            self.m0, self.n = _multipliers(m, out_bound)
            self.has_corr = bool((zf != 0).any())
            self.zm0 = torch.round(zf * self.m0.double()).to(torch.int64) if self.has_corr else None
            self.bias = B
            acc_units = bias / (s_w * s_x)                             # the bias in accumulator units, float64
            self.bias_term = (torch.round(acc_units * self.m0.double()) if self.fine_bias
                              else B.double() * self.m0.double()).to(torch.int64)
            self.weight = w.to(self.acc_dtype)
            if self.has_corr:
                groups = int(layer.attrs.get("groups", 1)) if layer.kind == "conv" else 1
                shape = [1 if groups == 1 else co] + list(q_w.shape[1:])
                self.ones = torch.ones(shape, dtype=self.acc_dtype)
            # a pure shift: M = +-2^k and no correction term
            if not self.has_corr and bool((self.m0 != 0).all()):
                mant = self.m0.abs()
                if bool(((mant & (mant - 1)) == 0).all()):
                    k = torch.log2(mant.double()).round().to(torch.int64)
                    self.sign = torch.sign(self.m0)
                    self.pure_shift = True
                    # (acc + b) >> shift; an exact bias keeps FINE_BITS fractional bits:
                    # ((acc << F) + b_F) >> (shift + F)
                    f = FINE_BITS if self.fine_bias else 0
                    self.shift = self.n - k + f
                    self.shift_frac = f
                    self.shift_bias = (torch.round(acc_units * self.sign.double() * 2.0**f) if self.fine_bias
                                       else B * self.sign).to(torch.int64)
        else:  # per-channel input steps: multipliers folded into int64 weights
            groups = int(layer.attrs.get("groups", 1)) if layer.kind == "conv" else 1
            s_x = in_rep.scale                                          # [Cin]
            cin_g = q_w.shape[1]
            idx = (torch.arange(co)[:, None] // (co // groups)) * cin_g + torch.arange(cin_g)[None, :]  # [co, cin_g]
            m = s_w[:, None] * s_x[idx] / s_out[:, None]               # [co, cin_g]
            s_xref = float(s_x.abs().max())
            if layer.bias_int32 is not None:
                B = layer.bias_int32.to(torch.int64)
            else:
                B = torch.round(bias / (s_w * s_xref)).to(torch.int64)
            m_ref = s_w * s_xref / s_out
            self.bias = B
            per_in = fan_in // max(cin_g, 1)
            w_abs = (q_w.abs().double() + z_w.abs().reshape(wshape)).reshape(co, cin_g, -1).amax(-1)  # [co, cin_g]
            out_bound = (per_in * x_abs * (w_abs * m.abs()).sum(1)) + B.abs().double() * m_ref.abs()
            m_max = m.abs().amax(1)
            _, n = _multipliers(m_max, out_bound)
            two_n = torch.pow(2.0, n.double())
            m0 = torch.round(m * two_n[:, None]).to(torch.int64)       # [co, cin_g]
            zm = torch.round(z_w[:, None] * m * two_n[:, None]).to(torch.int64)
            w = q_w.reshape(co, cin_g, -1) * m0[:, :, None] - zm[:, :, None]
            self.weight = w.reshape(q_w.shape)
            self.acc_dtype = torch.int64
            self.n = n
            self.bias_term = (torch.round(bias / s_out * two_n).to(torch.int64) if self.fine_bias
                              else B * torch.round(m_ref * two_n).to(torch.int64))
            self.has_corr = bool((z_w != 0).any())
        if layer.kind == "conv":
            a = layer.attrs
            self.conv = {1: F.conv1d, 2: F.conv2d}[int(a.get("dims", 2))]
            self.conv_kw = {"stride": a["stride"], "padding": a["padding"], "dilation": a["dilation"],
                            "groups": a["groups"]}

    def _apply(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.layer.kind == "linear":
            if x.dim() != 2:
                raise ExportError(f"layer {self.layer.name!r} (linear): the integer engine takes [N, features] inputs, "
                                  f"got shape {tuple(x.shape)}")
            return F.linear(x, w)
        return self.conv(x, w, **self.conv_kw)

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        z = _bc(self.in_rep.zero, q.dim())
        xc = (q.to(torch.int64) - z).to(self.acc_dtype)
        acc = self._apply(xc, self.weight).to(torch.int64)
        if self.folded:
            total = acc + _bc(self.bias_term, acc.dim())
            out = rounding_shift(total, _bc(self.n, acc.dim()), self.round_mode)
        elif self.pure_shift:
            total = torch.bitwise_left_shift(acc * _bc(self.sign, acc.dim()), self.shift_frac) \
                + _bc(self.shift_bias, acc.dim())
            shift = _bc(self.shift, acc.dim())
            out = torch.where(shift >= 0, rounding_shift(total, shift.clamp_min(0), self.round_mode),
                              torch.bitwise_left_shift(total, (-shift).clamp_min(0)))
        else:
            total = acc * _bc(self.m0, acc.dim()) + _bc(self.bias_term, acc.dim())
            if self.has_corr:
                s = self._apply(xc, self.ones).to(torch.int64)
                total = total - s * _bc(self.zm0, acc.dim())
            out = rounding_shift(total, _bc(self.n, acc.dim()), self.round_mode)
        return out


class IntegerEngine:
    """Run an exported CNN in integer arithmetic (see the module docstring).

    ``IntegerEngine.from_path("out/")`` or ``IntegerEngine.from_model(qmodel)``; then
    ``engine(x)`` gives float logits (integer logits times their step), ``engine.run(x)`` the
    :class:`IntegerOutput`, ``engine.predict(x)`` the top-1 classes. ``x`` is the float input the
    quantized model takes, or integer codes on the input grid (:attr:`input_rep`).
    """

    def __init__(self, exported: Exported, *, bias: str = "exact", headroom_bits: int = WIDE_HEADROOM_BITS):
        if bias not in ("exact", "int32"):
            raise ValueError(f"bias must be 'exact' or 'int32', got {bias!r}")
        self.bias_mode = bias
        self.exported = exported
        self.graph = exported.graph
        self.nodes = {n.name: n for n in self.graph.nodes}
        self.users = self.graph.users()
        self._check_layers()
        self.exponent = self._choose_exponent(headroom_bits)
        self.wide = Rep.wide(self.exponent)
        self.logits_rep = Rep.wide(self.exponent - LOGIT_DROP)  # int32 logits: the wide value shifted down
        self.reps: dict[str, Rep] = {}
        for n in self.graph.nodes:
            if n.op != "output":
                self.reps[n.name] = self._rep_of(n.name)
        self.kernels: dict[str, _LayerKernel] = {}
        for n in self.graph.nodes:
            if n.op in LAYER_OPS:
                layer = exported.layers[n.layer]
                self.kernels[n.name] = _LayerKernel(layer, n, self._layer_rep(n), self.reps[n.name], bias)
            elif n.op == "avgpool2d":
                a = n.attrs
                if a["ceil_mode"] or (not a["count_include_pad"] and any(a["padding"])):
                    raise ExportError(f"fx node {n.name!r} (avgpool2d): ceil_mode or padding excluded from the count "
                                      "is not supported by the integer engine")
        self._requant_cache: dict[tuple, tuple] = {}
        self.stats = {"saturated": 0}

    @classmethod
    def from_path(cls, path: str | os.PathLike, **kw) -> IntegerEngine:
        return cls(read_export(path), **kw)

    @classmethod
    def from_model(cls, qmodel, **kw) -> IntegerEngine:
        return cls(build_export(qmodel), **kw)

    # ----- planning -----------------------------------------------------------------------
    def _check_layers(self) -> None:
        for n in self.graph.nodes:
            if n.op in LAYER_OPS:
                layer = self.exported.layers[n.layer]
                if layer.weight_grid is None or layer.input_grid is None:
                    side = ("weights and input" if layer.weight_grid is None and layer.input_grid is None else
                            "weights" if layer.weight_grid is None else "input")
                    raise ExportError(f"layer {n.layer!r} ({layer.kind}) was exported with its {side} in float "
                                      "(marked float in the manifest); the integer engine runs only layers whose "
                                      "weights and input are both quantized")

    def _choose_exponent(self, headroom_bits: int) -> int:
        clip = max((self.exported.layers[n.layer].input_grid.clip_abs() for n in self.graph.nodes
                    if n.op in LAYER_OPS), default=1.0)
        return int(math.floor(WIDE_BITS - headroom_bits - math.log2(max(clip, 1e-30))))

    def _layer_rep(self, node: Node) -> Rep:
        return Rep.from_grid(self.exported.layers[node.layer].input_grid, f"layer {node.layer!r} input")

    def _consumer_reps(self, name: str) -> list:
        reps: list = []
        for u in self.users.get(name, []):
            if u.op in LAYER_OPS:
                reps.append(self._layer_rep(u))
            elif u.op in ("relu", "clamp", "pad", "maxpool2d"):
                reps += self._consumer_reps(u.name)
            elif u.op in ("flatten", "reshape"):
                reps += [r if (r != "wide" and not r.per_channel) else "wide" for r in self._consumer_reps(u.name)]
            else:
                reps.append("wide")
        return reps

    def _rep_of(self, name: str) -> Rep:
        reps = self._consumer_reps(name)
        if reps and all(r != "wide" for r in reps) and len({r.key for r in reps}) == 1:
            return reps[0]
        return self.wide

    # ----- conversions --------------------------------------------------------------------
    def _convert(self, t: torch.Tensor, src: Rep, dst: Rep) -> torch.Tensor:
        """Requantize integer ``t`` from ``src`` to ``dst`` (one exact rounding of ``(q - z_src) * M``)."""
        if src.key == dst.key:
            return t
        key = (src.key, dst.key)
        if key not in self._requant_cache:
            m = src.scale / dst.scale
            self._requant_cache[key] = _multipliers(m)  # requantize() is exact for any |t| < 2^62
        m0, n = self._requant_cache[key]
        nd = t.dim()
        centered = t.to(torch.int64) - _bc(src.zero, nd)
        return self._finish(requantize(centered, _bc(m0, nd), _bc(n, nd), dst.round_mode), dst)

    def _finish(self, v: torch.Tensor, rep: Rep) -> torch.Tensor:
        """Add the zero point and clamp to the grid (codes), or saturate to +-2^62 (wide, counted)."""
        nd = v.dim()
        if rep.kind == "wide":
            sat = (v <= -WIDE_LIMIT) | (v >= WIDE_LIMIT)
            if bool(sat.any()):
                self.stats["saturated"] += int(sat.sum())
            return v.clamp(-WIDE_LIMIT + 1, WIDE_LIMIT - 1)
        v = v + _bc(rep.zero, nd)
        return torch.maximum(torch.minimum(v, _bc(rep.qmax, nd)), _bc(rep.qmin, nd)).to(torch.int32)

    def _quantize_float(self, x: torch.Tensor, rep: Rep) -> torch.Tensor:
        """Boundary: the float input on ``rep``, with the fake-quant model's own float expression."""
        nd = x.dim()
        x = x.float()
        if rep.kind == "wide":
            v = torch.round(x.double() * 2.0**rep.exponent).to(torch.int64)
            return self._finish(v, rep)
        s, z = _bc(rep.scale.float(), nd), _bc(rep.zero.float(), nd)
        r = torch.round(x / s + z) if rep.round_mode == "half_even" else torch.floor(x / s + z + 0.5)
        r = torch.maximum(torch.minimum(r, _bc(rep.qmax.float(), nd)), _bc(rep.qmin.float(), nd))
        return r.to(torch.int32)

    # ----- running ------------------------------------------------------------------------
    @property
    def input_rep(self) -> Rep:
        return self.reps[self.graph.nodes[0].name]

    def run(self, x: torch.Tensor, *, capture: bool = False) -> IntegerOutput:
        """Integer logits of a batch ``x`` (float input, or int codes on :attr:`input_rep`).

        ``capture=True`` keeps each layer's integer input codes in :attr:`captured` (by layer name).
        """
        self.captured = {}
        env: dict[str, tuple[torch.Tensor | None, Rep | None]] = {}
        cache: dict[tuple, torch.Tensor] = {}
        self.stats["saturated"] = 0
        is_codes = not x.is_floating_point()
        if is_codes and self.input_rep.kind != "codes":
            raise ExportError("the model's input is held wide (it feeds several grids or a non-layer op); pass the "
                              "float input")

        def get(name: str, rep: Rep) -> torch.Tensor:
            key = (name, rep.key)
            if key not in cache:
                t, src = env[name]
                if src is None:  # the float input
                    cache[key] = self._quantize_float(t, rep)
                else:
                    cache[key] = self._convert(t, src, rep)
            return cache[key]

        node = None
        try:  # a batch of another shape than the exported model's fails inside torch: say where and why
            with torch.no_grad():
                for node in self.graph.nodes:
                    op, rep = node.op, self.reps.get(node.name)
                    if op == "input":
                        env[node.name] = (x.to(torch.int32), self.input_rep) if is_codes else (x, None)
                        continue
                    if op == "output":
                        out = get(node.inputs[0], self.logits_rep)
                        sat = (out < INT32_MIN) | (out > INT32_MAX)
                        self.stats["saturated"] += int(sat.sum())
                        values = out.clamp(INT32_MIN, INT32_MAX).to(torch.int32)
                        return IntegerOutput(values, self.logits_rep.exponent)
                    if op in LAYER_OPS:
                        k = self.kernels[node.name]
                        q = get(node.inputs[0], k.in_rep)
                        if capture:
                            self.captured[node.layer] = q
                        env[node.name] = (self._finish(k(q), rep), rep)
                    elif op in ("relu", "clamp", "pad", "maxpool2d", "flatten", "reshape"):
                        src_t, src_rep = env[node.inputs[0]]
                        work_rep = rep if src_rep is None else src_rep
                        t = get(node.inputs[0], work_rep)
                        env[node.name] = (self._convert(self._transparent(node, t, work_rep), work_rep, rep), rep)
                    elif op == "add":
                        a = get(node.inputs[0], self.wide).to(torch.int64)
                        b = get(node.inputs[1], self.wide).to(torch.int64)
                        s = self._finish(a + b, self.wide)
                        env[node.name] = (self._convert(s, self.wide, rep), rep)
                    elif op in ("global_avgpool", "avgpool2d"):
                        env[node.name] = (self._avgpool(node, get, env[node.inputs[0]][1], rep), rep)
                    else:  # pragma: no cover - the graph reader rejects unknown ops
                        raise ExportError(f"fx node {node.name!r}: op {op!r} is not supported by the integer engine")
        except (RuntimeError, IndexError) as exc:
            expected = self.exported.input_shape
            raise ExportError(f"fx node {node.name!r} ({node.op}) cannot run on an input batch of shape "
                              f"{tuple(x.shape)} ({exc}); pass inputs shaped like the exported model's"
                              + (f" ({expected}, any batch size)" if expected else "")) from exc
        raise ExportError("the exported graph has no output")

    def _transparent(self, node: Node, t: torch.Tensor, rep: Rep) -> torch.Tensor:
        a = node.attrs
        if node.op == "relu":
            return torch.maximum(t, _bc(rep.zero, t.dim()).to(t.dtype))
        if node.op == "clamp":
            lo, hi = (self._bound(a[k], rep, t.dim()).to(t.dtype) for k in ("min", "max"))
            return torch.minimum(torch.maximum(t, lo), hi)
        if node.op == "pad":
            z = _bc(rep.zero, t.dim()).to(t.dtype)
            return F.pad(t - z, a["pads"]) + z
        if node.op == "maxpool2d":
            return F.max_pool2d(t, a["kernel"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"])
        if node.op == "flatten":
            return torch.flatten(t, a.get("start_dim", 0), a.get("end_dim", -1))
        return t.reshape([t.shape[i] if d == 0 else d for i, d in enumerate(a["shape"])])

    def _bound(self, value: float, rep: Rep, ndim: int) -> torch.Tensor:
        """A clamp bound on ``rep``: the code the quantizer gives ``value`` (float32, as the fake-quant model),
        or ``round(value 2^E)`` wide."""
        return self._quantize_float(torch.full([1] * ndim, value), rep)

    def _avgpool(self, node: Node, get, src_rep: Rep | None, rep: Rep) -> torch.Tensor:
        work = self.wide if src_rep is None else src_rep
        t = get(node.inputs[0], work).to(torch.int64)
        c = t - _bc(work.zero, t.dim())
        if node.op == "global_avgpool":
            total = c.sum(dim=(2, 3), keepdim=node.attrs.get("keepdim", True))
            count = t.shape[2] * t.shape[3]
        else:
            a = node.attrs
            batch, ch = c.shape[:2]
            ones = torch.ones([1, 1, *a["kernel"]], dtype=torch.int64)  # each channel summed on its own
            total = F.conv2d(c.reshape(batch * ch, 1, *c.shape[2:]), ones, stride=a["stride"], padding=a["padding"])
            total = total.reshape(batch, ch, *total.shape[2:])
            count = a["kernel"][0] * a["kernel"][1]
        m = work.scale / (count * rep.scale)
        m0, n = _multipliers(m)
        nd = total.dim()
        return self._finish(requantize(total, _bc(m0, nd), _bc(n, nd), rep.round_mode), rep)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x).dequantize()

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x).values.argmax(dim=1)

    def describe(self) -> str:
        """One line per operation: how it runs in integers."""
        fine = sum(k.fine_bias for k in self.kernels.values())
        lines = [f"wide values: int64 x 2^-{self.exponent}, logits int32 x 2^-{self.exponent - LOGIT_DROP}; "
                 f"biases: {fine} exact (from float32), "
                 f"{len(self.kernels) - fine} int32 in accumulator units"]
        for n in self.graph.nodes:
            if n.op in LAYER_OPS:
                k = self.kernels[n.name]
                how = ("per-input-channel multipliers folded into int64 weights" if k.folded else
                       f"pure shift by {sorted(set(k.shift.tolist()))}" if k.pure_shift else
                       f"multiplier M0 * 2^-n, n in [{int(k.n.min())}, {int(k.n.max())}]")
                corr = ", zero-point correction term" if (not k.folded and k.has_corr) else ""
                lines.append(f"{n.layer:<24} {n.op:<7} acc {str(k.acc_dtype).replace('torch.', '')}, {how}{corr} "
                             f"-> {self.reps[n.name].describe()}")
            elif n.op not in ("output",):
                lines.append(f"{n.name:<24} {n.op:<7} -> {self.reps[n.name].describe()}")
        return "\n".join(lines)

    def summary_counts(self) -> dict:
        ks = list(self.kernels.values())
        return {"layers": len(ks), "pure_shift": sum(k.pure_shift for k in ks), "folded": sum(k.folded for k in ks),
                "multiplier": sum(not k.pure_shift and not k.folded for k in ks),
                "int32_accumulators": sum(k.acc_dtype == torch.int32 for k in ks),
                "exact_bias": sum(k.fine_bias for k in ks)}
