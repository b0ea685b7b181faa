"""The quantizer base class: one grid (step, zero point, integer range), several ways to set it.

A quantizer is an ``nn.Module`` that fake-quantizes what passes through it. Its life:

1. built with a bit width, signedness and granularity (``signed=None`` means "decide from
   the first tensor seen": signed if it holds a negative value);
2. calibrated: ``observe(x)`` accumulates statistics batch by batch (in ``calibrating``
   mode the forward observes and returns ``x`` unchanged), then ``finalize()`` sets the step;
   a quantizer never calibrated initialises itself from the first tensor it sees;
3. used: ``forward(x)`` returns ``(q - z) * s``; in training mode a *dynamic* quantizer
   (min-max, percentile, SAWB, ACIQ on weights) re-derives its step from the current tensor;
4. exported: :meth:`grid` hands out ``s``, ``z``, ``qmin``, ``qmax`` and
   :meth:`quantize_int` the integer codes ``q``.

Subclasses implement ``_reset_stats``, ``_observe`` and ``_compute`` (statistics to step);
learned quantizers (LSQ, PACT) keep their step as a parameter instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lowbit.errors import CalibrationError
from lowbit.quant.grid import ROUND_MODES, Granularity, check_bits, fake_quant, int_range, quantize_int

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
    needs_calibration = True

    def __init__(self, bits: int = 8, signed: bool | None = None, granularity: Granularity | None = None,
                 restricted: bool = False, round_mode: str = "half_even"):
        super().__init__()
        check_bits(bits, f"{type(self).__name__}: ")
        if round_mode not in ROUND_MODES:
            raise ValueError(f"round_mode must be one of {ROUND_MODES}, got {round_mode!r}")
        self.bits, self.restricted, self.round_mode = bits, restricted, round_mode
        self.granularity = granularity or Granularity()
        self.calibrating = False
        self.enabled = True
        self.name = ""  # filled in by model preparation, used in error messages
        self.register_buffer("signed_flag", torch.tensor(-1 if signed is None else int(signed), dtype=torch.int8))
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros(()))
        self._reset_stats()

    # ----- grid -------------------------------------------------------------------------
    @property
    def signed(self) -> bool | None:
        flag = int(self.signed_flag)
        return None if flag < 0 else bool(flag)

    @property
    def qrange(self) -> tuple[int, int]:
        if self.signed is None:
            raise CalibrationError(f"{self._where()}signedness is not known before the quantizer has seen data")
        return int_range(self.bits, self.signed, self.restricted)

    @property
    def qmin(self) -> int:
        return self.qrange[0]

    @property
    def qmax(self) -> int:
        return self.qrange[1]

    def get_scale(self) -> torch.Tensor:
        """The step in compact shape (learned quantizers override this)."""
        return self.scale

    def grid(self) -> Grid:
        self._require_initialized()
        return Grid(self.get_scale().detach().clone(), self.zero_point.detach().clone(), self.qmin, self.qmax,
                    self.bits, bool(self.signed), self.granularity)

    def quantize_int(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes of ``x`` (int32, same shape as ``x``)."""
        self._require_initialized()
        v = self.granularity.view(x)
        s, z = self._expanded(v)
        return quantize_int(v, s, z, self.qmin, self.qmax, self.round_mode).reshape(x.shape)

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        v = self.granularity.view(q.float())
        s, z = self._expanded(v)
        return ((v - z) * s).reshape(q.shape)

    def _expanded(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.granularity
        return g.expand(self.get_scale(), v), g.expand(self.zero_point, v)

    # ----- calibration ------------------------------------------------------------------
    def _reset_stats(self) -> None:
        """Forget accumulated statistics (subclasses keep theirs as plain attributes)."""

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
        if self.signed is None:
            self.signed_flag.fill_(int(bool((x < 0).any())))
        self._observe(self.granularity.view(x.detach().float()))

    @torch.no_grad()
    def finalize(self) -> None:
        """Turn the accumulated statistics into the grid; raises if nothing was observed."""
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
        """Reset, observe one tensor (e.g. a weight) and finalize."""
        self._reset_stats()
        self.observe(x)
        self.finalize()

    # ----- forward ----------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.calibrating:
            self.observe(x)
            return x
        if (self.training and self.dynamic) or not bool(self.initialized):
            self.init_from(x.detach())
        return self.fake_quant(x)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        v = self.granularity.view(x)
        s, z = self._expanded(v)
        return fake_quant(v, s, z, self.qmin, self.qmax, round_mode=self.round_mode).reshape(x.shape)

    # ----- bookkeeping ------------------------------------------------------------------
    def _where(self) -> str:
        return f"{self.method} quantizer{' of ' + self.name if self.name else ''}: "

    def _require_initialized(self) -> None:
        if not bool(self.initialized):
            raise CalibrationError(f"{self._where()}not calibrated yet; run calibration data through the "
                                   "model (lowbit.quantize(..., calib_data=...)) or one forward pass first")

    def extra_repr(self) -> str:
        signed = {None: "auto", True: "signed", False: "unsigned"}[self.signed]
        return f"bits={self.bits}, {signed}, granularity={self.granularity.kind}"

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
    """Raise a :class:`CalibrationError` naming the place if ``x`` holds NaN or Inf."""
    if not torch.isfinite(x).all():
        n_nan, n_inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
        raise CalibrationError(f"{where}input holds {n_nan} NaN and {n_inf} Inf values; "
                               "clean the calibration data (or check the preceding layer for overflow)")


def symmetric_grid(amax: torch.Tensor, qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-point-free grid whose clip ``amax`` maps to the largest code: ``s = amax / qmax``.

    For signed grids the negative side reaches ``qmin * s`` (``-amax`` when restricted).
    """
    return amax / qmax, torch.zeros_like(amax)


def affine_grid(lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric grid covering ``[lo, hi]`` (widened to include 0): ``s = (hi - lo) / (qmax - qmin)``,
    ``z = round(qmin - lo / s)`` so that 0 is exactly representable."""
    lo, hi = torch.minimum(lo, torch.zeros_like(lo)), torch.maximum(hi, torch.zeros_like(hi))
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(EPS)
    zero_point = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)
    return scale, zero_point
