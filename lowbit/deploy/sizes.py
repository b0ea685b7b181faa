"""The size an export is compared with: the float model's state dict as a safetensors checkpoint."""

from __future__ import annotations

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn


def fp32_checkpoint_bytes(model: nn.Module) -> int:
    """Size of ``model``'s state dict written as a safetensors checkpoint (what save_checkpoint writes)."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    return len(safetensors_bytes(state))
