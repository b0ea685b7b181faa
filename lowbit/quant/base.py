"""The quantizer base class: one grid (step, zero point, integer range), several ways to set it.

A quantizer is an ``nn.Module`` that fake-quantizes what passes through it. Its life:

1. built with a bit width, signedness and granularity (``signed=None`` means "decide from
   the first tensor seen": signed if it holds a negative value);
2. calibrated: ``observe(x)`` accumulates statistics batch by batch (in ``calibrating``
   mode the forward observes and returns ``x`` unchanged), then ``finalize()`` sets the step;
   a quantizer never calibrated initialises itself from the first tensor it sees. An
   auto-signed quantizer that decided "unsigned" and later sees a negative value switches to
   signed and restarts its statistics from that batch (with a warning);
3. used: ``forward(x)`` returns ``(q - z) * s``; in training mode a *dynamic* quantizer
   (min-max, percentile, SAWB, ACIQ on weights) re-derives its step from the current tensor;
4. exported: :meth:`grid` hands out ``s``, ``z``, ``qmin``, ``qmax`` and
   :meth:`quantize_int` the integer codes ``q``.

Subclasses implement ``_reset_stats``, ``_observe`` and ``_compute`` (statistics to step);
learned quantizers (LSQ, PACT) keep their step as a parameter instead.

Post-training options shared by the statistics-based quantizers (Banner et al., NeurIPS 2019):

- ``bit_allocation``: per-channel bit widths with mean ``bits`` (``"paper"``: Eqs. 10-11 with the
  fixed-target correction; ``"exact"``: the integer optimum), from each channel's std (or its
  Laplace ``b`` for ACIQ's Laplace prior). Then ``qmin``/``qmax`` are per-channel tensors and a
  channel may get 0 bits (it quantizes to its zero level). Needs ``channel`` granularity.
- ``bias_correction`` (weights): after quantizing a weight, freeze its integer codes and move each
  channel's step and zero point so the channel's mean and spread match the float weight
  (:mod:`lowbit.quant.bias_correction`). A frozen quantizer returns ``(codes - z) * s`` and
  ignores later changes of the weight until :meth:`unfreeze`.
"""

from __future__ import annotations

from dataclasses import dataclass

import warnings

import torch
from torch import nn

from lowbit.errors import CalibrationError, RecipeError
from lowbit.quant.bias_correction import BIAS_CORRECTION_MODES, bias_correct
from lowbit.quant.bitalloc import allocate_bits, allocate_bits_exact
from lowbit.quant.grid import (ROUND_MODES, Granularity, channel_int_range, check_bits, fake_quant, int_range,
                               quantize_int)
from lowbit.quant.running import RunningStats

BIT_ALLOCATION_MODES = ("paper", "exact")

EPS = 1e-8


@dataclass(frozen=True)
class Grid:
    """A frozen snapshot of a quantizer's grid, for export and integer inference."""

    scale: torch.Tensor
    zero_point: torch.Tensor
    qmin: int
    qmax: int
    bits: int
    signed: bool
    granularity: Granularity


class Quantizer(nn.Module):
    """Base of every lowbit quantizer (see the module docstring for the life cycle)."""

    method = "base"
    dynamic = False        # re-derive the step from the tensor at every training forward
    supports_bit_allocation = False  # per-channel widths: only quantizers whose grid reads qmin/qmax tensors
    supports_token = False  # per-token steps computed at run time (token_grid): min-max only
    needs_calibration = True

    role = "activation"    # make_quantizer sets "weight" for weight quantizers
    fused = False          # compiled fake-quant kernels (lowbit.quant.grid); fine-tuning's compile_quantizers

    def __init__(self, bits: int = 8, signed: bool | None = None, granularity: Granularity | None = None,
                 restricted: bool = False, round_mode: str = "half_even", bit_allocation: bool | str = False,
                 bias_correction: bool | str = False):
        super().__init__()
        check_bits(bits, f"{type(self).__name__}: ")
        if round_mode not in ROUND_MODES:
            raise ValueError(f"round_mode must be one of {ROUND_MODES}, got {round_mode!r}")
        self.bits, self.restricted, self.round_mode = bits, restricted, round_mode
        self.granularity = granularity or Granularity()
        self.bit_allocation = "paper" if bit_allocation is True else (bit_allocation or None)
        if self.bit_allocation is not None:
            if self.bit_allocation not in BIT_ALLOCATION_MODES:
                raise ValueError(f"bit_allocation must be true, false or one of {BIT_ALLOCATION_MODES}, "
                                 f"got {bit_allocation!r}")
            if self.granularity.kind != "channel":
                raise ValueError("bit_allocation gives each channel its own width: use granularity 'channel'")
        if self.granularity.kind == "token" and not self.supports_token:
            raise ValueError(f"{self.method} cannot compute a step per token at run time; granularity 'token' "
                             "needs method minmax")
        if self.bit_allocation is not None and not self.supports_bit_allocation:
            raise ValueError(f"{self.method} does not support bit_allocation; use minmax, percentile or aciq")
        self.bias_correction = "code" if bias_correction is True else (bias_correction or None)
        if self.bias_correction is not None and getattr(self, "learnable", False):
            raise ValueError(f"{self.method} learns its step; bias_correction is a post-training transform for "
                             "minmax, percentile, aciq, faq or sawb weights")
        if self.bias_correction is not None and self.bias_correction not in BIAS_CORRECTION_MODES:
            raise ValueError(f"bias_correction must be true, false or one of {BIAS_CORRECTION_MODES}, "
                             f"got {bias_correction!r}")
        self.calibrating = False
        self.enabled = True
        self.output_grid = None  # (step, zero point) of the latest fake-quantized output, set by _expanded
        self.keep_codes = False  # keep the latest output's integer codes as output_codes (see _on_grid)
        self.output_codes = None
        self.name = ""  # filled in by model preparation, used in error messages
        self.register_buffer("signed_flag", torch.tensor(-1 if signed is None else int(signed), dtype=torch.int8))
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros(()))
        self.register_buffer("channel_bits", torch.zeros(0, dtype=torch.int16))  # empty: every channel `bits`
        self.register_buffer("codes", torch.zeros(0, dtype=torch.int32))  # frozen integer codes, if any
        self._alloc_stats = None
        self._reset_stats()

    # ----- grid -------------------------------------------------------------------------
    @property
    def signed(self) -> bool | None:
        flag = int(self.signed_flag)
        return None if flag < 0 else bool(flag)

    @property
    def qrange(self) -> tuple:
        """``(qmin, qmax)``: ints, or per-channel float tensors after bit allocation."""
        if self.signed is None:
            raise CalibrationError(f"{self._where()}signedness is not known before the quantizer has seen data")
        if self.channel_bits.numel():
            return channel_int_range(self.channel_bits, self.signed, self.restricted)
        return int_range(self.bits, self.signed, self.restricted)

    @property
    def frozen(self) -> bool:
        return self.codes.numel() > 0

    @property
    def mean_bits(self) -> float:
        """Average bits per element (``bits`` unless bit allocation gave channels their own widths)."""
        return float(self.channel_bits.float().mean()) if self.channel_bits.numel() else float(self.bits)

    @property
    def qmin(self) -> int:
        return self.qrange[0]

    @property
    def qmax(self) -> int:
        return self.qrange[1]

    def get_scale(self) -> torch.Tensor:
        """The step in compact shape (learned quantizers override this)."""
        return self.scale

    def get_zero_point(self) -> torch.Tensor:
        """The zero point in compact shape, as the grid uses it (learned quantizers override this)."""
        return self.zero_point

    def grid(self) -> Grid:
        self._require_initialized()
        qmin, qmax = self.qrange
        return Grid(self.get_scale().detach().clone(), self.get_zero_point().detach().clone(), qmin, qmax,
                    self.bits, bool(self.signed), self.granularity)

    def _bounds(self, v: torch.Tensor) -> tuple:
        qmin, qmax = self.qrange
        if isinstance(qmin, torch.Tensor):
            return self.granularity.expand(qmin, v), self.granularity.expand(qmax, v)
        return qmin, qmax

    def quantize_int(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes of ``x`` (int32, same shape as ``x``); a frozen quantizer returns its codes."""
        self._require_initialized()
        if self.frozen:
            self._check_frozen_shape(x)
            return self.codes.clone()
        v = self.granularity.view(x)
        s, z = self._expanded(v)
        return quantize_int(v, s, z, *self._bounds(v), self.round_mode).reshape(x.shape)

    @torch.no_grad()
    def freeze(self, x: torch.Tensor) -> None:
        """Store the integer codes of ``x``; from now on the forward returns ``(codes - z) * s``."""
        self.codes = self.quantize_int(x)

    def unfreeze(self) -> None:
        """Forget frozen codes: the forward quantizes its input again (e.g. before fine-tuning)."""
        self.codes = torch.zeros(0, dtype=torch.int32, device=self.codes.device)

    def _check_frozen_shape(self, x: torch.Tensor) -> None:
        if x.shape != self.codes.shape:
            raise CalibrationError(f"{self._where()}holds frozen codes of shape {tuple(self.codes.shape)} but got "
                                   f"a tensor of shape {tuple(x.shape)}; call unfreeze() to re-quantize")

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        v = self.granularity.view(q.float())
        s, z = self._expanded(v)
        return ((v - z) * s).reshape(q.shape)

    def _expanded(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Step and zero point broadcast against the view ``v``; also kept as :attr:`output_grid`, the grid of the
        latest output (a quantized layer reads it to save its input as codes: lowbit.nn.saved_codes)."""
        g = self.granularity
        if g.kind == "token":
            s, z = self.token_grid(g.reduce(v.detach(), "amin"), g.reduce(v.detach(), "amax"))
            s, z = g.expand(s.clamp_min(EPS), v), g.expand(z, v)
        else:
            s, z = g.expand(self.get_scale(), v), g.expand(self.get_zero_point(), v)
        self.output_grid = (s.detach(), z.detach())  # detached: a module holding graph tensors cannot be deep-copied
        return s, z

    def token_grid(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Step and zero point of each token from its range (quantizers with ``supports_token``)."""
        raise NotImplementedError

    # ----- calibration ------------------------------------------------------------------
    def reset_stats(self) -> None:
        """Forget every statistic accumulated so far (before a new calibration pass)."""
        self._reset_stats()
        self._alloc_stats = None

    def _reset_stats(self) -> None:
        """Forget the method's accumulated statistics (subclasses keep theirs as plain attributes)."""

    def _observe(self, v: torch.Tensor) -> None:
        """Accumulate statistics of one batch, given in the granularity's view."""

    def _compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Step and zero point (compact shapes) from the accumulated statistics."""
        raise NotImplementedError

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        check_finite(x, self._where())
        if x.numel() == 0:
            raise CalibrationError(f"{self._where()}received an empty tensor")
        has_negative = bool((x < 0).any())
        if self.signed is None:
            self.signed_flag.fill_(int(has_negative))
            self._auto_signed = True
        elif has_negative and not self.signed and getattr(self, "_auto_signed", False):
            warnings.warn(f"{self._where()}decided 'unsigned' from its first batch, but this batch has negative "
                          "values: switching to a signed grid and restarting its statistics from this batch",
                          stacklevel=3)
            self.signed_flag.fill_(1)
            self.reset_stats()
        if self.granularity.kind == "token":
            return  # per-token steps come from each input at run time; calibration only settles signedness
        v = self.granularity.view(x.detach().float())
        if self.bit_allocation is not None:
            if self._alloc_stats is None:
                self._alloc_stats = RunningStats(self.granularity)
            self._alloc_stats.update(v)
        self._observe(v)

    def _allocation_spread(self, stats: RunningStats) -> torch.Tensor:
        """The per-channel ``alpha_i`` of Eq. 10: the std (ACIQ's Laplace prior overrides with ``b``)."""
        return stats.std

    @torch.no_grad()
    def _allocate_bits(self) -> None:
        stats, self._alloc_stats = self._alloc_stats, None
        if stats is None:
            return
        spread = self._allocation_spread(stats)
        allocate = allocate_bits if self.bit_allocation == "paper" else allocate_bits_exact
        try:
            bits = allocate(spread, float(self.bits), max_bits=max(8, self.bits))
        except RecipeError as exc:
            raise RecipeError(f"{self._where()}{exc}") from None
        constant = (spread <= 0) & (stats.mean != 0)  # a constant non-zero channel needs one level for its value
        self.channel_bits = torch.where(constant, bits.clamp_min(1), bits).to(torch.int16)

    @torch.no_grad()
    def finalize(self) -> None:
        """Turn the accumulated statistics into the grid; raises if nothing was observed."""
        if self.granularity.kind == "token":
            if self.signed is None:
                raise self._nothing_observed()
            self.initialized.fill_(True)
            return
        self._allocate_bits()
        scale, zero_point = self._compute()
        scale = torch.as_tensor(scale, dtype=torch.float32)
        if not torch.isfinite(scale).all():
            raise CalibrationError(f"{self._where()}calibration produced a non-finite step")
        self._set_grid(scale.clamp_min(EPS), torch.as_tensor(zero_point, dtype=torch.float32))
        self.initialized.fill_(True)
        self._reset_stats()

    def _set_grid(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        self.scale = scale.to(self.scale.device)
        self.zero_point = zero_point.to(self.scale.device).expand_as(scale).clone()

    def init_from(self, x: torch.Tensor) -> None:
        """Reset, observe one tensor (e.g. a weight) and finalize; a weight quantizer with
        ``bias_correction`` then freezes the corrected codes. No-op while frozen."""
        if self.frozen:
            return
        self.reset_stats()
        self.observe(x)
        self.finalize()
        if self.bias_correction is not None and self.role == "weight":
            bias_correct(self, x.detach(), self.bias_correction)

    # ----- forward ----------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.calibrating:
            self.observe(x)
            return x
        if self.frozen:
            self._check_frozen_shape(x)
            return self.dequantize(self.codes)
        if (self.training and self.dynamic) or not bool(self.initialized):
            self.init_from(x.detach())
        return self.fake_quant(x)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        v = self.granularity.view(x)
        s, z = self._expanded(v)
        return self._on_grid(x, v, s, z, *self._bounds(v))

    def _on_grid(self, x: torch.Tensor, v: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmin, qmax,
                 **options) -> torch.Tensor:
        """:func:`~lowbit.quant.grid.fake_quant` of the view ``v`` with this quantizer's rounding and kernels, in
        ``x``'s shape. With :attr:`keep_codes` (set by the quantized layer this quantizer feeds) and gradients
        recorded, the integer codes are kept as :attr:`output_codes` (or None where the grid cannot give them)."""
        keep = self.keep_codes and torch.is_grad_enabled() and self.granularity.kind != "group"
        out = fake_quant(v, s, z, qmin, qmax, round_mode=self.round_mode, fused=self.fused, keep_codes=keep, **options)
        if keep:
            out, self.output_codes = out
        return out.reshape(x.shape)

    # ----- bookkeeping ------------------------------------------------------------------
    def _where(self) -> str:
        return f"{self.method} quantizer{' of ' + self.name if self.name else ''}: "

    def _nothing_observed(self) -> CalibrationError:
        """The error ``_compute`` raises when ``finalize()`` comes before any data was observed."""
        return CalibrationError(f"{self._where()}finalize() before any data was observed; the calibration data "
                                "yielded nothing for this quantizer")

    def _require_initialized(self) -> None:
        if not bool(self.initialized):
            raise CalibrationError(f"{self._where()}not calibrated yet; run calibration data through the "
                                   "model (lowbit.quantize(..., calib_data=...)) or one forward pass first")

    def extra_repr(self) -> str:
        signed = {None: "auto", True: "signed", False: "unsigned"}[self.signed]
        bits = f"{self.mean_bits:.2f} (per channel)" if self.channel_bits.numel() else str(self.bits)
        return f"bits={bits}, {signed}, granularity={self.granularity.kind}" + (", frozen" if self.frozen else "")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Per-channel steps get their shape only at calibration: adopt the checkpoint's shape.
        for name, tensor in list(self._buffers.items()) + list(self._parameters.items()):
            key = prefix + name
            if key in state_dict and tensor is not None and state_dict[key].shape != tensor.shape:
                with torch.no_grad():
                    new = torch.empty_like(state_dict[key], dtype=tensor.dtype, device=tensor.device)
                    if name in self._parameters:
                        self._parameters[name] = nn.Parameter(new, requires_grad=tensor.requires_grad)
                    else:
                        self._buffers[name] = new
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def check_finite(x: torch.Tensor, where: str = "") -> None:
    """Raise a :class:`CalibrationError` naming the place if ``x`` holds NaN or Inf.

    One reduction in the common case: NaN and Inf propagate into the sum (an overflowing sum
    of finite values falls through to the exact element-wise check)."""
    if torch.isfinite(x.sum()) or bool(torch.isfinite(x).all()):
        return
    n_nan, n_inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
    raise CalibrationError(f"{where}input holds {n_nan} NaN and {n_inf} Inf values; "
                           "clean the calibration data (or check the preceding layer for overflow)")


def symmetric_grid(amax: torch.Tensor, qmin, qmax) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-point-free grid whose clip ``amax`` maps to the largest code: ``s = amax / qmax``.

    For signed grids the negative side reaches ``qmin * s`` (``-amax`` when restricted).
    ``qmin``/``qmax`` may be per-channel tensors; a 0-bit channel (``qmax = 0``) keeps ``s = amax``.
    """
    levels = qmax.clamp_min(1) if isinstance(qmax, torch.Tensor) else max(qmax, 1)
    return amax / levels, torch.zeros_like(amax)


def affine_grid(lo: torch.Tensor, hi: torch.Tensor, qmin, qmax) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric grid covering ``[lo, hi]`` (widened to include 0): ``s = (hi - lo) / (qmax - qmin)``,
    ``z = round(qmin - lo / s)`` so that 0 is exactly representable."""
    lo, hi = torch.minimum(lo, torch.zeros_like(lo)), torch.maximum(hi, torch.zeros_like(hi))
    span = qmax - qmin
    span = span.clamp_min(1) if isinstance(span, torch.Tensor) else max(span, 1)
    scale = ((hi - lo) / span).clamp_min(EPS)
    zero_point = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)
    return scale, zero_point
