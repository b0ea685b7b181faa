"""Q-networks for the games of :mod:`lowbit.rl`: one output per action.

- ``minatar``: MinAtar's reference DQN (Young & Tian 2019): a 3x3 convolution of 16 channels
  (no padding), ReLU, a fully connected layer of 128, ReLU, one output per action; 132,566
  parameters on Breakout's 4 channels.
- ``minatar-small``: the same shape at 8 channels and 64 units (33,518 parameters on Breakout,
  25 % of the reference: the largest student of Rusu et al. 2016).
- ``nature``: the DQN of Mnih et al. (2015) for 4x84x84 Atari frames: convolutions 32x8x8/4,
  64x4x4/2, 64x3x3/1, a fully connected layer of 512.

Inputs are the environment's frames times its ``obs_scale`` (0/1 for MinAtar, pixels / 255 for
Atari); every layer is a plain Conv2d/Linear, so ``lowbit.quantize`` and the export see
ordinary layers.
"""

from __future__ import annotations

import torch
from torch import nn


class MinAtarQNet(nn.Module):
    def __init__(self, in_channels: int, num_actions: int, *, channels: int = 16, hidden: int = 128,
                 size: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, channels, 3)
        self.relu1 = nn.ReLU()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels * (size - 2) ** 2, hidden)
        self.relu2 = nn.ReLU()
        self.head = nn.Linear(hidden, num_actions)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu2(self.fc(self.flatten(self.relu1(self.conv(x))))))


class NatureQNet(nn.Module):
    def __init__(self, in_channels: int, num_actions: int, *, size: int = 84):
        super().__init__()
        self.conv1, self.relu1 = nn.Conv2d(in_channels, 32, 8, 4), nn.ReLU()
        self.conv2, self.relu2 = nn.Conv2d(32, 64, 4, 2), nn.ReLU()
        self.conv3, self.relu3 = nn.Conv2d(64, 64, 3, 1), nn.ReLU()
        self.flatten = nn.Flatten()
        side = ((size - 8) // 4 + 1 - 4) // 2 + 1 - 2
        self.fc, self.relu4 = nn.Linear(64 * side * side, 512), nn.ReLU()
        self.head = nn.Linear(512, num_actions)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu3(self.conv3(self.relu2(self.conv2(self.relu1(self.conv1(x))))))
        return self.head(self.relu4(self.fc(self.flatten(x))))


QNETS = {
    "minatar": lambda c, a, size: MinAtarQNet(c, a, size=size),
    "minatar-small": lambda c, a, size: MinAtarQNet(c, a, channels=8, hidden=64, size=size),
    "nature": lambda c, a, size: NatureQNet(c, a, size=size),
}


def create_qnet(arch: str, obs_shape: tuple[int, int, int], num_actions: int) -> nn.Module:
    """An untrained Q-network ``arch`` for frames of ``obs_shape`` ``[C, H, W]`` (square)."""
    if arch not in QNETS:
        raise ValueError(f"unknown Q-network {arch!r}; choose one of {sorted(QNETS)}")
    c, h, w = obs_shape
    if h != w:
        raise ValueError(f"Q-networks take square frames, got {h}x{w}")
    return QNETS[arch](c, num_actions, h)
