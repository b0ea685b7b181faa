"""The one integer grid under every lowbit quantizer, and the fake-quant op on it.

    q     = clamp(round(x / s + z), qmin, qmax)      # integers
    x_hat = (q - z) * s                              # what the float model sees

``s`` (step) and ``z`` (zero point) are per tensor, per channel along an axis, or per
group of ``group_size`` consecutive elements of each output channel (weights). Methods
differ only in how ``s`` is chosen or learned (DESIGN.md, "One idea at the core").

:func:`fake_quant` is one autograd function for all of them. Its forward computes
``(q - z) * s`` literally, so the fake-quantized tensor equals the integer tensor times the
step bit for bit. Its backward is the straight-through estimator for ``x`` and, on request,
one of two gradients for ``s``:

- ``"lsq"`` (Esser et al. 2020, Eq. 3): ``d x_hat / d s = round(x/s) - x/s`` where
  ``qmin < x/s + z < qmax``, ``qmin - z`` where ``x/s + z <= qmin`` and ``qmax - z`` where
  ``x/s + z >= qmax``;
- ``"clip"`` (PACT, Choi et al. 2018, Eq. 3, written for ``s = alpha / qmax``): only the
  clipped terms, so ``d x_hat / d alpha = 1`` exactly where ``x >= alpha``.

The ``x`` gradient is 1 strictly inside the range and 0 where clipped (or 1 everywhere
with ``pass_through``). A zero point that requires a gradient (LSQ's asymmetric grid) gets the
straight-through one, ``d x_hat / d z = -s`` where clipped and 0 inside (LSQ+, Bhalgat et al. 2020,
for its offset ``beta = -z s``).

The ``s`` gradient is multiplied by ``grad_scale`` inside the backward (LSQ's ``g``), so the
forward value of ``s`` is never perturbed by the usual ``(s - g s).detach() + g s`` trick.

``fused=True`` runs the same forward and backward as two kernels compiled by ``torch.compile``
(inductor: one pass over the tensor each way instead of about ten, and only ``x`` kept for the
backward instead of ``x/s`` and the codes), as :attr:`Quantizer.fused` asks; the fine-tuning
option ``compile_quantizers`` sets it. Forward values and the ``x`` gradient are bit for bit the
eager ones; the step and zero-point gradients are the same sums taken in another order (float
rounding). Where ``torch.compile`` cannot build (no C++ compiler, an unsupported platform) it
warns once and runs the eager op.

The zero point is added before rounding, ``round(x/s + z)``: for the usual integer ``z`` this
is ``round(x/s) + z`` (up to ties under half-to-even), and it also serves SAWB's even level
set, whose zero point is the half-integer ``(2^b - 1) / 2``.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import torch

ROUND_MODES = ("half_even", "half_up")


def int_range(bits: int, signed: bool, restricted: bool = False) -> tuple[int, int]:
    """Integer range of a ``bits``-wide code.

    unsigned ``[0, 2^b - 1]``; signed ``[-2^(b-1), 2^(b-1) - 1]``; signed restricted
    (symmetric) ``[-(2^(b-1) - 1), 2^(b-1) - 1]``.
    """
    check_bits(bits)
    if not signed:
        return 0, 2**bits - 1
    if restricted and bits < 2:
        raise ValueError("a restricted signed grid needs at least 2 bits (1 bit leaves only the level 0)")
    return -(2 ** (bits - 1)) + int(restricted), 2 ** (bits - 1) - 1


def channel_int_range(bits: torch.Tensor, signed: bool, restricted: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`int_range` per channel for a tensor of widths (float tensors); 0 bits gives ``[0, 0]``."""
    b = bits.to(torch.float32)
    if not signed:
        qmin, qmax = torch.zeros_like(b), torch.exp2(b) - 1
    else:
        half = torch.exp2(b - 1)
        qmin, qmax = -half + float(restricted), half - 1
    zero = b == 0
    qmin, qmax = torch.where(zero, 0.0, qmin), torch.where(zero, 0.0, qmax)
    return torch.minimum(qmin, qmax), qmax  # restricted 1-bit: [0, 0]


def check_bits(bits, where: str = "") -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"{where}bits must be an integer from 1 to 16, got {bits!r}")
    return bits


def round_(x: torch.Tensor, mode: str = "half_even") -> torch.Tensor:
    """Round to nearest: ties to even (``torch.round``) or ties away from zero upwards (``floor(x + 0.5)``)."""
    if mode == "half_even":
        return torch.round(x)
    if mode == "half_up":
        return torch.floor(x + 0.5)
    raise ValueError(f"round mode must be one of {ROUND_MODES}, got {mode!r}")


@dataclass(frozen=True)
class Granularity:
    """Which elements share one step: ``tensor``, ``channel`` (along ``axis``), ``group`` or ``token``.

    ``group`` splits each output channel (axis 0) of a weight, flattened to
    ``[C, K]``, into ``K / group_size`` consecutive groups with a step each.
    Steps are stored compactly: ``[]`` per tensor, ``[C]`` per channel, ``[C, K/g]`` per group.
    ``token`` (activations): one step per vector along the last axis (per token of a ``[batch, tokens,
    features]`` input), ``[batch, tokens]``; such steps are computed from each input as it arrives
    (dynamic quantization), never stored.
    """

    kind: str = "tensor"
    axis: int = 0
    group_size: int | None = None

    def __post_init__(self):
        if self.kind not in ("tensor", "channel", "group", "token"):
            raise ValueError(f"granularity must be 'tensor', 'channel', 'group' or 'token', got {self.kind!r}")
        if self.kind == "group" and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise ValueError(f"group granularity needs a positive integer group_size, got {self.group_size!r}")

    def view(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` reshaped so that a step of :meth:`param_shape` broadcasts after :meth:`expand`."""
        if self.kind != "group":
            return x
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] % self.group_size:
            raise ValueError(f"group_size {self.group_size} does not divide the {flat.shape[1]} elements "
                             f"of each output channel of a tensor of shape {tuple(x.shape)}")
        return flat.reshape(x.shape[0], -1, self.group_size)

    def reduce_dims(self, x: torch.Tensor) -> tuple[int, ...]:
        """Dimensions of ``view(x)`` that one step covers."""
        if self.kind == "tensor":
            return tuple(range(x.dim()))
        if self.kind == "channel":
            axis = self.axis % x.dim()
            return tuple(d for d in range(x.dim()) if d != axis)
        if self.kind == "token":
            return (x.dim() - 1,)
        return (2,)

    def param_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        if self.kind == "tensor":
            return ()
        if self.kind == "channel":
            return (x.shape[self.axis % x.dim()],)
        if self.kind == "token":
            return tuple(x.shape[:-1])
        v = self.view(x)
        return tuple(v.shape[:2])

    def expand(self, p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Reshape a compact step/zero point ``p`` to broadcast against the view ``v``."""
        if self.kind == "tensor" or p.dim() == 0:
            return p
        if self.kind == "channel":
            shape = [1] * v.dim()
            shape[self.axis % v.dim()] = -1
            return p.reshape(shape)
        return p.unsqueeze(-1)

    def reduce(self, v: torch.Tensor, fn: str) -> torch.Tensor:
        """Reduce the view ``v`` over the dims one step covers with ``amin``/``amax``/``mean``; compact shape."""
        dims = self.reduce_dims(v)
        return getattr(torch, fn)(v, dim=dims) if dims else v

    def to_dict(self) -> dict:
        return {"kind": self.kind, "axis": self.axis, "group_size": self.group_size}


class _FakeQuant(torch.autograd.Function):
    """Forward ``(clamp(round(x/s + z), qmin, qmax) - z) * s``; backward the STE for ``x`` and, on
    request, the step gradient of LSQ Eq. 3 / PACT Eq. 3.

    With ``u = x/s + z`` (the unrounded code) and ``inside = qmin < u < qmax``, the local step
    gradient is ``round(u) - u`` inside and ``q - z`` where clipped, which is one expression,
    ``(q - z) - inside * x/s``, since ``q = round(u)`` inside. So the step gradient is
    ``sum(g (q - z)) - sum(g inside x/s)`` (LSQ) or ``sum(g (q - z)) - sum(g inside (q - z))``
    (clip only), two multiply-reductions with no temporary for a per-tensor step. A zero point
    that is zero everywhere (every symmetric and unsigned grid) skips its two passes.

    Memory: the forward keeps ``x`` (which the layer before usually keeps anyway) and the codes as int8/uint8, not
    ``x/s`` and the float codes; the backward recomputes ``x/s`` with the same op, so the gradients are the same bit
    for bit, for two more passes over the tensor. On request the forward also returns those codes (``keep_codes``).
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, round_mode, scale_grad, grad_scale, pass_through, fused,
                keep_codes):
        shifted = float(zero_point) != 0.0 if zero_point.numel() == 1 else bool(torch.any(zero_point != 0))
        kernels = _fused_kernels() if fused else None
        codes_dtype = _codes_dtype(qmin, qmax) if keep_codes and not shifted else None
        if kernels is not None:
            bounds = (_constant(qmin, x.dtype, x.device), _constant(qmax, x.dtype, x.device))
            # detached: a Parameter (a weight) and a plain tensor would be two compiled variants of the same kernel
            outs = _run_fused(kernels[0], x.detach(), scale.detach(), zero_point.detach(), *bounds,
                              round_mode == "half_up", shifted, codes_dtype)
            if outs is not None:
                ctx.save_for_backward(x, scale, zero_point, *bounds)
                ctx.fused = (scale_grad, grad_scale, pass_through, shifted, round_mode == "half_up", kernels[1])
                return _mark_codes(ctx, *outs)
        xs = x / scale
        q = round_(xs + zero_point if shifted else xs, round_mode).clamp_(qmin, qmax)
        dtype = _codes_dtype(qmin, qmax)
        codes = q if dtype is None else q.to(dtype)  # exact: q holds integers of that range
        ctx.save_for_backward(x, codes, zero_point, scale)
        ctx.cfg = (qmin, qmax, scale_grad, grad_scale, pass_through, shifted)
        out = (q - zero_point) * scale if shifted else q * scale
        return _mark_codes(ctx, out, codes if codes_dtype is not None else None)

    @staticmethod
    def backward(ctx, grad, _grad_codes):
        if hasattr(ctx, "fused"):  # the fused forward ran
            x, scale, zero_point, qmin, qmax = ctx.saved_tensors
            scale_grad, grad_scale, pass_through, shifted, half_up, kernel = ctx.fused
            args = (grad.contiguous(), x.detach(), scale.detach(), zero_point.detach(), qmin, qmax,
                    _constant(grad_scale, x.dtype, x.device),
                    half_up, shifted, scale_grad if ctx.needs_input_grad[1] else None, pass_through,
                    ctx.needs_input_grad[2])
            grad_x, grad_s, grad_z = _run_fused(kernel, *args) or _fused_backward(*args)
            return grad_x, grad_s, grad_z, None, None, None, None, None, None, None, None
        x, q, zero_point, scale = ctx.saved_tensors
        qmin, qmax, scale_grad, grad_scale, pass_through, shifted = ctx.cfg
        xs = x / scale  # the forward's x/s, bit for bit (the same op on the same tensors)
        q = q.to(x.dtype)
        pre = xs + zero_point if shifted else xs
        inside = (pre > qmin) & (pre < qmax)
        grad_inside = grad * inside
        grad_x = grad if pass_through else grad_inside
        grad_s = None
        if scale_grad is not None and ctx.needs_input_grad[1]:
            code = q - zero_point if shifted else q  # x_hat / s
            if scale_grad == "lsq":
                grad_s = _dot_to(grad, code, scale.shape) - _dot_to(grad_inside, xs, scale.shape)
            else:
                grad_s = _dot_to(grad - grad_inside, code, scale.shape)
            grad_s = grad_s * grad_scale
        grad_z = None
        if ctx.needs_input_grad[2]:
            grad_z = -_sum_to((grad - grad_inside) * scale, zero_point.shape) * grad_scale
        return grad_x, grad_s, grad_z, None, None, None, None, None, None, None, None


def _constant(value, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``value`` as a tensor for the compiled kernels: a number as a 0-dim tensor made once per value (bounds and LSQ
    gradient scales repeat every step; never written to), a per-channel range converted as it is."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype=dtype, device=device)
    return _number(float(value), dtype, device)


@functools.lru_cache(maxsize=4096)
def _number(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(value, dtype=dtype, device=device)


CODE_TYPES = (torch.int8, torch.uint8, torch.int16)
BYTE_CODE_TYPES = CODE_TYPES[:2]


def code_dtype(low: float, high: float, types: tuple[torch.dtype, ...] = CODE_TYPES) -> torch.dtype | None:
    """The narrowest integer type of ``types`` holding ``[low, high]``; None when none does."""
    for dtype in types:
        info = torch.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return dtype
    return None


def _codes_dtype(qmin, qmax) -> torch.dtype | None:
    """int8 or uint8 where the integer range ``[qmin, qmax]`` (ints) fits, to keep codes in a quarter of the
    memory of float32; None otherwise (per-channel ranges, wider grids)."""
    if isinstance(qmin, int) and isinstance(qmax, int):
        return _byte_code_dtype(qmin, qmax)
    return None


@functools.lru_cache(maxsize=None)
def _byte_code_dtype(qmin: int, qmax: int) -> torch.dtype | None:
    return code_dtype(qmin, qmax, BYTE_CODE_TYPES)


def _mark_codes(ctx, out: torch.Tensor, codes: torch.Tensor | None):
    """The forward's two outputs: the fake-quantized tensor and, where asked for, its integer codes (no gradient)."""
    if codes is not None:
        ctx.mark_non_differentiable(codes)
    return out, codes


def _fused_forward(x, scale, zero_point, qmin, qmax, half_up: bool, shifted: bool, codes_dtype):
    """The forward of :class:`_FakeQuant` as one expression, for ``torch.compile``; with ``codes_dtype``, the codes
    in that integer type too (written in the same pass)."""
    u = x / scale + zero_point if shifted else x / scale
    q = (torch.floor(u + 0.5) if half_up else torch.round(u)).clamp(qmin, qmax)
    out = (q - zero_point) * scale if shifted else q * scale
    return out, (q.to(codes_dtype) if codes_dtype is not None else None)


def _fused_backward(grad, x, scale, zero_point, qmin, qmax, grad_scale, half_up: bool, shifted: bool,
                    scale_grad: str | None, pass_through: bool, need_z: bool):
    """The backward of :class:`_FakeQuant` recomputed from ``x``, for ``torch.compile``: the codes
    and the inside mask are rebuilt in registers instead of being read back from memory."""
    xs = x / scale
    u = xs + zero_point if shifted else xs
    q = (torch.floor(u + 0.5) if half_up else torch.round(u)).clamp(qmin, qmax)
    grad_inside = grad * ((u > qmin) & (u < qmax))
    grad_s = grad_z = None
    if scale_grad is not None:
        code = q - zero_point if shifted else q
        local = grad * code - grad_inside * xs if scale_grad == "lsq" else (grad - grad_inside) * code
        grad_s = _sum_to(local, scale.shape) * grad_scale
    if need_z:
        grad_z = -_sum_to((grad - grad_inside) * scale, zero_point.shape) * grad_scale
    return grad if pass_through else grad_inside, grad_s, grad_z


_FUSED: dict = {}
RECOMPILE_LIMIT = 256  # kernel variants: grid flags x tensor ranks x step layouts x code types, all models of a process


def _fused_kernels():
    """The compiled (forward, backward) pair, built once; None after a failed build."""
    if "kernels" not in _FUSED:
        _FUSED["kernels"] = (torch.compile(_fused_forward, dynamic=True),
                             torch.compile(_fused_backward, dynamic=True))
        config = torch._dynamo.config  # loaded by torch.compile above
        config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
    return _FUSED["kernels"]


def _run_fused(kernel, *args):
    """``kernel(*args)``, or None (with a warning, once) where ``torch.compile`` cannot build it."""
    try:
        return kernel(*args)
    except Exception as err:  # noqa: BLE001 - inductor raises many types; the eager op is always right
        _FUSED["kernels"] = None
        warnings.warn(f"compiled fake-quant is unavailable ({type(err).__name__}: {err}); running the eager op, "
                      "which gives the same values more slowly", RuntimeWarning, stacklevel=3)
        return None


def _dot_to(a: torch.Tensor, b: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``a * b`` summed back to ``shape``; one fused dot product when ``shape`` is a single step."""
    if math.prod(shape) == 1 and a.is_contiguous() and b.is_contiguous():
        return torch.dot(a.view(-1), b.view(-1)).reshape(shape)
    return _sum_to(a * b, shape)


def _sum_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a broadcast gradient back to ``shape`` (the shape of the expanded step)."""
    if t.shape == shape:
        return t
    lead = t.dim() - len(shape)
    t = t.sum(dim=tuple(range(lead))) if lead else t
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and t.shape[i] != 1)
    return t.sum(dim=dims, keepdim=True) if dims else t


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, *,
               round_mode: str = "half_even", scale_grad: str | None = None, grad_scale: float = 1.0,
               pass_through: bool = False, fused: bool = False, keep_codes: bool = False):
    """Quantize to the grid and back: ``(clamp(round(x/s + z), qmin, qmax) - z) * s``.

    ``scale`` and ``zero_point`` must already broadcast against ``x``. ``scale_grad`` is
    ``None`` (no step gradient), ``"lsq"`` or ``"clip"``; ``pass_through=True`` passes the
    ``x`` gradient everywhere (SAWB+) instead of zeroing it where ``x`` is clipped; ``fused``
    runs the compiled kernels (module docstring). ``keep_codes=True`` returns ``(x_hat, codes)``: the integer codes
    ``q`` as int8/uint8 where the grid has no zero point and its range fits, else None (the codes a quantized layer
    keeps for its backward: lowbit.nn.saved_codes).
    """
    if scale_grad not in (None, "lsq", "clip"):
        raise ValueError(f"scale_grad must be None, 'lsq' or 'clip', got {scale_grad!r}")
    out, codes = _FakeQuant.apply(x, scale, zero_point, qmin, qmax, round_mode, scale_grad, grad_scale, pass_through,
                                  fused, keep_codes)
    return (out, codes) if keep_codes else out


def quantize_int(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                 round_mode: str = "half_even") -> torch.Tensor:
    """The integer codes ``q`` (as an int32 tensor) of ``x`` on the grid; no gradient."""
    with torch.no_grad():
        return torch.clamp(round_(x / scale + zero_point, round_mode), qmin, qmax).to(torch.int32)


def pow2ceil(x: torch.Tensor) -> torch.Tensor:
    """``2 ** ceil(log2 x)``: the smallest power of two >= ``x`` (FAQ's step rule)."""
    return torch.exp2(torch.ceil(torch.log2(x)))
