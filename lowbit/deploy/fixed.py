"""A quantizer with a fixed grid, for models rebuilt from an export by :func:`lowbit.load_export`.

It holds the exported step, zero point and integer range (per-channel widths included) and,
for weights, the exported integer codes (frozen). Its forward is the base quantizer's, so a
rebuilt layer computes ``(codes - z) * s`` for its weight and ``fake_quant`` on its input
with exactly the numbers the original quantizer used. Calibration does not move it. An input grid
with per-token steps (``granularity: token``) computes each token's step from the input, as the
original min-max quantizer did.
"""

from __future__ import annotations

import torch

from lowbit.errors import CalibrationError
from lowbit.deploy.layers import GridData
from lowbit.quant.base import Quantizer
from lowbit.quant.grid import Granularity
from lowbit.quant.minmax import minmax_grid


class FixedQuantizer(Quantizer):
    method = "fixed"
    dynamic = False
    needs_calibration = False
    supports_token = True

    def __init__(self, grid: GridData, role: str, codes: torch.Tensor | None = None, name: str = ""):
        super().__init__(bits=min(max(int(grid.bits), 1), 16), signed=grid.signed,
                         granularity=Granularity(grid.kind, grid.axis, grid.group_size),
                         restricted=grid.restricted, round_mode=grid.round_mode)
        self.method = grid.method or "fixed"  # the original method, for summary() labels
        self.role, self.name, self.symmetric = role, name, grid.symmetric
        self.scale = grid.scale.detach().to(torch.float32).clone()
        self.zero_point = grid.zero_point.detach().to(torch.float32).clone()
        if grid.channel_bits is not None:
            self.channel_bits = grid.channel_bits.to(torch.int16).clone()
            self._range = (torch.as_tensor(grid.qmin).float(), torch.as_tensor(grid.qmax).float())
        else:
            self._range = (int(grid.qmin), int(grid.qmax))
        self.initialized.fill_(True)
        if codes is not None:
            self.codes = codes.to(torch.int32).clone()

    @property
    def qrange(self):
        lo, hi = self._range
        if isinstance(lo, torch.Tensor):
            return lo.to(self.scale.device), hi.to(self.scale.device)
        return lo, hi

    # the grid is fixed: calibration and re-initialisation leave it alone
    def observe(self, x):
        pass

    def finalize(self):
        pass

    def init_from(self, x):
        pass

    def token_grid(self, lo, hi):
        return minmax_grid(lo, hi, bool(self.signed), self.symmetric, self.qmin, self.qmax)

    def _compute(self):
        raise CalibrationError(f"{self._where()}holds an exported grid and is never calibrated")

    def extra_repr(self) -> str:
        return super().extra_repr() + ", exported"
