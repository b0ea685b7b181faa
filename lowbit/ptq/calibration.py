"""One streaming pass of calibration data that records per-layer, per-channel input statistics.

``collect_stats(model, loader)`` hooks the input of every Conv/Linear (quantized or not) and
feeds it to a :class:`~lowbit.quant.running.RunningStats` per layer (channels on axis 1 for
convolutions, the last axis for linear layers); nothing but the running sums is kept.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from lowbit.errors import CalibrationError
from lowbit.quant.base import check_finite
from lowbit.quant.grid import Granularity
from lowbit.quant.running import RunningStats

LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)


def input_channel_axis(layer: nn.Module) -> int:
    return -1 if isinstance(layer, nn.Linear) else 1


@torch.no_grad()
def collect_stats(model: nn.Module, data: Iterable, *, max_batches: int | None = None,
                  percentiles: tuple[float, ...] = (99.9, 99.99)) -> dict[str, RunningStats]:
    """Per-channel statistics of each Conv/Linear layer's input over the calibration batches."""
    stats = {name: RunningStats(Granularity("channel", axis=input_channel_axis(m)), percentiles)
             for name, m in model.named_modules() if isinstance(m, LAYERS)}

    def hook(name):
        def record(module, inputs):
            x = inputs[0].detach().float()
            check_finite(x, f"input of layer {name}: ")
            stats[name].update(x)
        return record

    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in stats]
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for batch in data:
            if max_batches is not None and seen >= max_batches:
                break
            model(batch[0] if isinstance(batch, (tuple, list)) else batch)
            seen += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if seen == 0:
        raise CalibrationError("the calibration data yielded no batches")
    return {n: s for n, s in stats.items() if s.batches}
