"""LSQ: learned step size quantization (Esser, McKinstry, Bablani, Appuswamy, Modha; ICLR 2020).

    v_bar = round(clip(v / s, -Q_N, Q_P)),   v_hat = v_bar * s

with ``Q_N = 0, Q_P = 2^b - 1`` for unsigned data and ``Q_N = 2^(b-1), Q_P = 2^(b-1) - 1`` for
signed data (arXiv v3; ``restricted=True`` gives v1's ``Q_N = 2^(b-1) - 1``). The step is a
parameter with the gradient of LSQ Eq. 3 (``round(v/s) - v/s`` inside, ``-Q_N``/``Q_P`` where
clipped), scaled by ``g = 1 / sqrt(N * Q_P)``; ``N`` is the number of weights of the layer (per
channel: of the channel) or, for activations, the features per sample (``n_features="sample"``,
the paper's wording) or per batch (``"numel"``).

Initialisation, exactly once, from the pretrained weights or the first calibration batch:
``init="paper"`` (default) ``s_0 = 2 mean(|v|) / sqrt(Q_P)``; ``init="mse"`` the step with the
least quantization error of that data (:mod:`lowbit.quant.mse_step`, LSQ+'s advice), which
starts a short fine-tuning much closer to its optimum, most at 2-3 bits (a per-tensor weight
step searches a strided sample of at most 65,536 weights, so that choosing precisions for a
ResNet-50 stays fast; activations use the whole batch). The ``initialized``
buffer travels in the state dict, so a reloaded checkpoint keeps its learned step. The step is
kept >= 1e-5 in the forward.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lowbit.quant.base import Quantizer
from lowbit.quant.grid import fake_quant
from lowbit.quant.mse_step import mse_optimal_step

MIN_STEP = 1e-5
MSE_SAMPLE = 1 << 16  # weights searched for the init="mse" step of one per-tensor step


class LSQQuantizer(Quantizer):
    method = "lsq"
    dynamic = False
    learnable = True

    def __init__(self, bits: int = 4, signed: bool | None = None, granularity=None, *, role: str = "activation",
                 n_features: str = "sample", init: str = "paper", **kw):
        if n_features not in ("sample", "numel"):
            raise ValueError(f"n_features must be 'sample' or 'numel', got {n_features!r}")
        if init not in ("paper", "mse"):
            raise ValueError(f"LSQ init must be 'paper' (2 mean|v| / sqrt(Q_P)) or 'mse', got {init!r}")
        super().__init__(bits, signed, granularity, **kw)
        if self.signed is not None and self.qmax < 1:
            raise ValueError(f"LSQ needs Q_P >= 1: a signed {bits}-bit grid has no positive level; use >= 2 bits")
        self.role, self.n_features, self.init = role, n_features, init
        del self._buffers["scale"]
        self.scale = nn.Parameter(torch.ones(()))

    def _reset_stats(self):
        self._init_step = None

    def _observe(self, v):
        if self._init_step is None:  # LSQ initialises from the first batch only
            if self.init == "mse":
                self._init_step = mse_optimal_step(v, self.granularity, self.qmin, self.qmax,
                                                   max_elements=MSE_SAMPLE if self.role == "weight" else None)
            else:
                self._init_step = 2.0 * self.granularity.reduce(v.abs(), "mean") / math.sqrt(self.qmax)

    def _compute(self):
        if self._init_step is None:
            from lowbit.errors import CalibrationError
            raise CalibrationError(f"{self._where()}finalize() before any data was observed")
        return self._init_step, torch.zeros_like(self._init_step)

    def observe(self, x):
        if not bool(self.initialized):  # never re-initialise a learned (or reloaded) step
            super().observe(x)

    def finalize(self):
        if not bool(self.initialized):
            super().finalize()

    def _set_grid(self, scale, zero_point):
        with torch.no_grad():
            if self.scale.shape == scale.shape:
                self.scale.copy_(scale)  # keep the Parameter object: optimizers may hold it
            else:
                self.scale = nn.Parameter(scale.to(self.scale.device))
        self.zero_point = torch.zeros_like(scale)

    def get_scale(self):
        return self.scale.clamp_min(MIN_STEP)

    def grad_scale(self, x: torch.Tensor) -> float:
        """LSQ's ``g = 1 / sqrt(N Q_P)`` with ``N`` the elements that share one step."""
        n = x.numel() / max(1, self.get_scale().numel())
        if self.role != "weight" and self.n_features == "sample" and x.dim() > 1:
            n /= x.shape[0]
        return 1.0 / math.sqrt(n * self.qmax)

    def fake_quant(self, x):
        v = self.granularity.view(x)
        s, z = self._expanded(v)
        return fake_quant(v, s, z, self.qmin, self.qmax, round_mode=self.round_mode, scale_grad="lsq",
                          grad_scale=self.grad_scale(x)).reshape(x.shape)
