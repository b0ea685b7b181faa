"""PACT: parameterized clipping activation (Choi et al., arXiv:1805.06085, 2018).

    y   = clip(x, 0, alpha)                                    (Eq. 1)
    y_q = round(y * (2^k - 1) / alpha) * alpha / (2^k - 1)     (Eq. 2)

On lowbit's grid: ``s = alpha / (2^k - 1)``, ``z = 0``, ``q in [0, 2^k - 1]``. ``alpha`` is one
learned scalar per layer (``granularity="channel"`` gives one per channel, not in the paper).
Gradients (Eq. 3): ``dy_q/dx = 1`` for ``0 < x < alpha`` else 0; ``dy_q/dalpha = 1`` where
``x >= alpha``, summed over the tensor. ``gradient="pact+"`` adds the LSQ-style in-range term
``round(x/s) - x/s`` divided by ``2^k - 1`` (fms-model-optimizer's PACT+; not in the paper).

Signed inputs (e.g. a normalised image in front of the first layer) get the two-sided variant
``clip(x, -alpha, alpha)`` on a restricted signed grid (fms's PACT2; not in the paper).

Initial ``alpha``: ``init="percentile"`` (default; 99.9th percentile of the first calibration
batch, fms-model-optimizer's practice when fine-tuning a pretrained model) or a number
(the paper's 10.0). ``alpha`` goes in its own parameter group with L2 ``weight_decay``
(the paper: equal to the model's weight decay, 2e-4 for CIFAR ResNet-20; default here 2e-4)
and is kept >= 1e-3 in the forward.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.quant.base import Quantizer
from lowbit.quant.grid import int_range
from lowbit.quant.stats import percentile

MIN_ALPHA = 1e-3


class PACTQuantizer(Quantizer):
    method = "pact"
    dynamic = False
    learnable = True

    def __init__(self, bits: int = 4, signed: bool | None = None, granularity=None, *, init="percentile",
                 percentile: float = 99.9, gradient: str = "pact", weight_decay: float = 2e-4,
                 role: str = "activation", **kw):
        if gradient not in ("pact", "pact+"):
            raise ValueError(f"PACT gradient must be 'pact' (paper Eq. 3) or 'pact+', got {gradient!r}")
        if not (init == "percentile" or (isinstance(init, (int, float)) and init > 0)):
            raise ValueError(f"PACT init must be 'percentile' or a positive number, got {init!r}")
        if role == "weight":
            raise ValueError("PACT clips activations; for weights use sawb, lsq, faq, aciq or minmax")
        super().__init__(bits, signed, granularity, **kw)
        self.init, self.pct, self.gradient, self.weight_decay = init, percentile, gradient, weight_decay
        del self._buffers["scale"]  # the step is alpha / qmax (get_scale), never stored
        self.alpha = nn.Parameter(torch.full((), float(init) if init != "percentile" else 1.0))

    @property
    def qrange(self):
        if self.signed is None:
            return super().qrange  # raises: signedness unknown before data
        return int_range(self.bits, self.signed, restricted=self.signed)  # two-sided: +-alpha exactly

    def _reset_stats(self):
        self._alpha0 = None

    def _observe(self, v):
        if self._alpha0 is None and self.init == "percentile":
            self._alpha0 = percentile(v.abs() if self.signed else v, self.granularity, self.pct)

    def observe(self, x):
        if not bool(self.initialized):
            super().observe(x)

    def finalize(self):
        if bool(self.initialized):
            return
        if self.init == "percentile":
            if self._alpha0 is None:
                raise self._nothing_observed()
            alpha = self._alpha0.clamp_min(MIN_ALPHA)
            with torch.no_grad():
                if self.alpha.shape == alpha.shape:
                    self.alpha.copy_(alpha)
                else:
                    self.alpha = nn.Parameter(alpha)
        self.zero_point = torch.zeros_like(self.alpha.detach())
        self.initialized.fill_(True)
        self._reset_stats()

    def get_scale(self):
        return self.alpha.clamp_min(MIN_ALPHA) / self.qmax

    def fake_quant(self, x):
        v = self.granularity.view(x)
        s, z = self._expanded(v)
        return self._on_grid(x, v, s, z, *self.qrange, scale_grad="clip" if self.gradient == "pact" else "lsq")
