"""Acting with a Q-network: frames to float input, greedy and epsilon-greedy actions."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from lowbit.qat.state import NonFiniteError


def as_input(frames, obs_scale: float) -> torch.Tensor:
    """``uint8 [N, C, H, W]`` frames (array or tensor) as the network's float input, times ``obs_scale``."""
    x = torch.as_tensor(np.asarray(frames) if not isinstance(frames, torch.Tensor) else frames).float()
    return x if obs_scale == 1.0 else x * obs_scale


def checked_q(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``net(x)``, or :class:`~lowbit.qat.state.NonFiniteError` when a Q-value is NaN or infinite."""
    q = net(x)
    if not bool(torch.isfinite(q).all()):
        raise NonFiniteError(f"{type(net).__name__} produced non-finite Q-values ({q.flatten()[:6].tolist()}); "
                             "the weights have diverged: lower the learning rate, or start from a good checkpoint")
    return q


@torch.no_grad()
def greedy_actions(net: nn.Module, frames, obs_scale: float = 1.0) -> torch.Tensor:
    """``argmax_a Q(s, a)`` for a batch of frames (the first action on ties)."""
    return checked_q(net, as_input(frames, obs_scale)).argmax(dim=1)


def linear_epsilon(frame: int, start: float, end: float, frames: int) -> float:
    """Epsilon decayed linearly from ``start`` to ``end`` over the first ``frames`` frames, then ``end``."""
    if frame >= frames:
        return end
    return start + (end - start) * frame / frames
