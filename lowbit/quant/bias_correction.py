"""Weight bias correction (Banner, Nahshan, Soudry, NeurIPS 2019, Eqs. 12-13; reference code flags
``-bcw``/``-vcw``).

Quantization shifts each output channel's mean and changes its spread. With the channel's
integer codes ``q`` frozen, the correction only moves the channel's step ``s`` and zero point
``z``, so the corrected weight stays exactly ``(q - z') * s'`` on lowbit's grid:

- ``"code"`` (default; the reference code: variance then mean correction)
  ``w' = (w_q - E[w_q]) * std(W) / std(w_q) + E[W]``  gives  ``s' = s * std(W)/std(w_q)``,
  ``z' = E[q] - E[W] / s'``: channel mean and std match the float weight exactly;
- ``"eq13"`` (Eq. 13 literally) ``w' = xi (w_q + mu)`` with ``mu = E[W] - E[w_q]`` and
  ``xi = ||W - E W|| / ||w_q - E w_q||``  gives  ``s' = xi s``, ``z' = z - mu / s``;
- ``"mean"`` (``-bcw`` alone, the README's W4A4 recipe) ``w' = w_q - E[w_q] + E[W]``  gives
  ``s' = s``, ``z' = z - mu / s``.

A channel whose quantized values are all equal keeps its step (no spread to rescale). The
zero points become fractional; the integer engine applies them as a per-channel correction
of the accumulator (``z' s' sum(x)``). Per-tensor grids become per-channel ones.
"""

from __future__ import annotations

import torch

from lowbit.quant.grid import Granularity

BIAS_CORRECTION_MODES = ("code", "eq13", "mean")


@torch.no_grad()
def bias_correct(quantizer, weight: torch.Tensor, mode: str = "code") -> None:
    """Freeze ``quantizer``'s codes of ``weight`` and correct each output channel's step and zero point."""
    if mode not in BIAS_CORRECTION_MODES:
        raise ValueError(f"bias correction mode must be one of {BIAS_CORRECTION_MODES}, got {mode!r}")
    g = quantizer.granularity
    if g.kind == "group" or (g.kind == "channel" and g.axis % weight.dim() != 0):
        raise ValueError("bias correction works per output channel: use 'tensor' or 'channel' granularity")
    channels = weight.shape[0]
    codes = quantizer.quantize_int(weight)
    scale = quantizer.get_scale().detach().expand(channels).double()
    zero = quantizer.zero_point.detach().expand(channels).double()
    w = weight.reshape(channels, -1).double()
    q = codes.reshape(channels, -1).double()
    wq = (q - zero[:, None]) * scale[:, None]
    mu = w.mean(1) - wq.mean(1)
    if mode == "code":
        spread_q = wq.std(1, unbiased=False)
        ratio = torch.where(spread_q > 0, w.std(1, unbiased=False) / spread_q.clamp_min(1e-30), torch.ones_like(mu))
        new_scale = scale * ratio
        new_zero = q.mean(1) - w.mean(1) / new_scale
    elif mode == "eq13":
        norm_q = (wq - wq.mean(1, keepdim=True)).norm(dim=1)
        xi = torch.where(norm_q > 0, (w - w.mean(1, keepdim=True)).norm(dim=1) / norm_q.clamp_min(1e-30),
                         torch.ones_like(mu))
        new_scale, new_zero = scale * xi, zero - mu / scale
    else:
        new_scale, new_zero = scale, zero - mu / scale
    if g.kind == "tensor":
        quantizer.granularity = Granularity("channel", axis=0)
    quantizer._set_grid(new_scale.float(), new_zero.float())
    quantizer.codes = codes
