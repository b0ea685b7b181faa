"""LSQ: learned step size quantization (Esser, McKinstry, Bablani, Appuswamy, Modha; ICLR 2020).

    v_bar = round(clip(v / s, -Q_N, Q_P)),   v_hat = v_bar * s

with ``Q_N = 0, Q_P = 2^b - 1`` for unsigned data and ``Q_N = 2^(b-1), Q_P = 2^(b-1) - 1`` for
signed data (arXiv v3; ``restricted=True`` gives v1's ``Q_N = 2^(b-1) - 1``). The step is a
parameter with the gradient of LSQ Eq. 3 (``round(v/s) - v/s`` inside, ``-Q_N``/``Q_P`` where
clipped), scaled by ``g = 1 / sqrt(N * Q_P)``; ``N`` is the number of weights of the layer (per
channel: of the channel) or, for activations, the features per sample (``n_features="sample"``,
the paper's wording) or per batch (``"numel"``).

Initialisation, exactly once, from the pretrained weights or the first calibration batch:
``init="paper"`` (default) ``s_0 = 2 mean(|v|) / sqrt(Q_P)``; ``init="max"`` the min-max step
``max(max(v) / Q_P, min(v) / -Q_N)``, which clips nothing (our option: the weights of language
models, where clipping a few large weights costs more output error than the coarser grid;
measured in docs/RESULTS.md, section llm); ``init="mse"`` the step with the
least quantization error of that data (:mod:`lowbit.quant.mse_step`, LSQ+'s advice), which
starts a short fine-tuning much closer to its optimum, most at 2-3 bits (a per-tensor weight
step searches a strided sample of at most 65,536 weights, so that choosing precisions for a
ResNet-50 stays fast; activations use the whole batch). The ``initialized``
buffer travels in the state dict, so a reloaded checkpoint keeps its learned step. The step is
kept >= 1e-5 in the forward.

``asymmetric=True`` (not in the paper; LSQ+, Bhalgat et al., CVPR-W 2020, learns an offset the same
way) uses unsigned codes ``[0, 2^b - 1]`` with a learned zero point ``z``:
``v_hat = (clamp(round(v/s + z), 0, 2^b - 1) - z) * s``. ``z`` is a parameter rounded to an
integer in the forward (straight through, so every tensor stays ``integer * s`` for integer
inference; our choice where LSQ+ keeps a float offset), with the gradient ``-s`` where ``v`` is
clipped, scaled by ``g`` like the step's. Initialised from the first batch's range (``init="paper"`` or ``"max"``:
min-max) or by :func:`~lowbit.quant.mse_step.mse_optimal_affine` (``init="mse"``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lowbit.quant.base import Quantizer, affine_grid
from lowbit.quant.mse_step import minmax_step, mse_optimal_affine, mse_optimal_step

MIN_STEP = 1e-5
MSE_SAMPLE = 1 << 16  # weights searched for the init="mse" step of one per-tensor step
INITS = ("paper", "max", "mse")


class LSQQuantizer(Quantizer):
    method = "lsq"
    dynamic = False
    learnable = True

    def __init__(self, bits: int = 4, signed: bool | None = None, granularity=None, *, role: str = "activation",
                 n_features: str = "sample", init: str = "paper", asymmetric: bool = False, **kw):
        if n_features not in ("sample", "numel"):
            raise ValueError(f"n_features must be 'sample' or 'numel', got {n_features!r}")
        if init not in INITS:
            raise ValueError(f"LSQ init must be 'paper' (2 mean|v| / sqrt(Q_P)), 'max' (min-max) or 'mse', "
                             f"got {init!r}")
        if asymmetric and signed:
            raise ValueError("an asymmetric LSQ grid has unsigned codes and a zero point; leave signed unset (auto)")
        super().__init__(bits, False if asymmetric else signed, granularity, **kw)
        if self.signed is not None and self.qmax < 1:
            raise ValueError(f"LSQ needs Q_P >= 1: a signed {bits}-bit grid has no positive level; use >= 2 bits")
        self.role, self.n_features, self.init, self.asymmetric = role, n_features, init, bool(asymmetric)
        del self._buffers["scale"]
        self.scale = nn.Parameter(torch.ones(()))
        if self.asymmetric:
            del self._buffers["zero_point"]
            self.zero_point = nn.Parameter(torch.zeros(()))

    def _reset_stats(self):
        self._init_step = self._init_zero_point = None

    def _observe(self, v):
        if self._init_step is None and self.asymmetric:
            if self.init == "mse":
                self._init_step, self._init_zero_point = mse_optimal_affine(v, self.granularity, self.qmin, self.qmax)
            else:  # "paper" and "max": the observed range
                g = self.granularity
                self._init_step, self._init_zero_point = affine_grid(g.reduce(v, "amin"), g.reduce(v, "amax"),
                                                                     self.qmin, self.qmax)
        elif self._init_step is None:  # LSQ initialises from the first batch only
            if self.init == "mse":
                self._init_step = mse_optimal_step(v, self.granularity, self.qmin, self.qmax,
                                                   max_elements=MSE_SAMPLE if self.role == "weight" else None)
            elif self.init == "max":
                self._init_step = minmax_step(v, self.granularity, self.qmin, self.qmax)
            else:
                self._init_step = 2.0 * self.granularity.reduce(v.abs(), "mean") / math.sqrt(self.qmax)

    def _compute(self):
        if self._init_step is None:
            raise self._nothing_observed()
        zero_point = self._init_zero_point if self.asymmetric else torch.zeros_like(self._init_step)
        return self._init_step, zero_point

    def observe(self, x):
        if not bool(self.initialized):  # never re-initialise a learned (or reloaded) step
            super().observe(x)

    def finalize(self):
        if not bool(self.initialized):
            super().finalize()

    def _set_grid(self, scale, zero_point):
        self.scale = _assign(self.scale, scale)
        if self.asymmetric:
            self.zero_point = _assign(self.zero_point, zero_point.expand_as(scale))
        else:
            self.zero_point = torch.zeros_like(scale)

    def get_scale(self):
        return self.scale.clamp_min(MIN_STEP)

    def get_zero_point(self):
        """An asymmetric grid's learned zero point, rounded to an integer (straight through)."""
        if not self.asymmetric:
            return self.zero_point
        z = self.zero_point.clamp(self.qmin, self.qmax)
        return z + (z.round() - z).detach()

    def grad_scale(self, x: torch.Tensor, qmax: int | None = None) -> float:
        """LSQ's ``g = 1 / sqrt(N Q_P)`` with ``N`` the elements that share one step (``qmax``: ``Q_P`` when the
        caller has it already)."""
        n = x.numel() / max(1, self.scale.numel())
        if self.role != "weight" and self.n_features == "sample" and x.dim() > 1:
            n /= x.shape[0]
        return 1.0 / math.sqrt(n * (self.qmax if qmax is None else qmax))

    def extra_repr(self) -> str:
        return super().extra_repr() + (", asymmetric" if self.asymmetric else "")

    def fake_quant(self, x):
        v = self.granularity.view(x)
        s, z = self._expanded(v)
        qmin, qmax = self.qrange
        return self._on_grid(x, v, s, z, qmin, qmax, scale_grad="lsq", grad_scale=self.grad_scale(x, qmax))


def _assign(param: nn.Parameter, value: torch.Tensor) -> nn.Parameter:
    """``value`` into ``param`` in place when the shapes match (optimizers may hold the Parameter
    object), else a new Parameter of ``value``'s shape."""
    with torch.no_grad():
        if param.shape == value.shape:
            param.copy_(value)
            return param
        return nn.Parameter(value.to(param.device).clone())
