"""Cost model of a per-layer precision assignment: MACs, stored bits and bit-operations.

MACs are counted on a traced forward pass (forward hooks on every Conv1d/Conv2d/Conv3d/Linear,
quantized layers included) on an example input, per example (the count over the batch divided
by the batch size, the first dimension of the input):

- convolution: ``out.numel() / N * (in_channels / groups) * prod(kernel_size)``, so stride,
  padding, dilation and groups (depthwise) enter through the output shape and the group size;
- linear: ``out.numel() / N * in_features`` (any leading dimensions, e.g. tokens, count).

A layer called twice counts twice; a layer the example never reaches counts 0 MACs (a warning
names it). Per layer and precision ``(w_bits, a_bits)``:

- stored bits (``"size"``): ``weight elements * w_bits`` (steps, zero points and biases are
  the same for every assignment and are left out);
- bit-operations (``"bitops"``): ``MACs * w_bits * a_bits`` (the throughput model of
  HAWQ-v3 and of EAGL/ALPS's comparisons; one model for every method).

Totals of an assignment sum its layers. Tracing runs in eval mode under ``no_grad`` with every
quantizer disabled, so it changes no statistic, grid or running batch-norm estimate.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.errors import RecipeError
from lowbit.quant.base import Quantizer

METRICS = ("bitops", "size")
Precision = tuple[int, int]  # (weight bits, activation bits)
_COUNTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def parse_precision(p) -> Precision:
    """``4`` or ``"4"`` -> ``(4, 4)``; ``(4, 8)``, ``"w4a8"``, ``"4/8"`` -> ``(4, 8)`` (weights, activations)."""
    if isinstance(p, bool):
        raise RecipeError(f"a precision is a bit width like 4, or weight/activation bits like 'w4a8', got {p!r}")
    if isinstance(p, int):
        w = a = p
    elif isinstance(p, (tuple, list)) and len(p) == 2 and all(isinstance(b, int) and not isinstance(b, bool)
                                                              for b in p):
        w, a = p
    elif isinstance(p, str) and (m := re.fullmatch(r"\s*(?:w(\d+)a(\d+)|(\d+)(?:/(\d+))?)\s*", p.lower())):
        w, a = (int(m[1]), int(m[2])) if m[1] else (int(m[3]), int(m[4] or m[3]))
    else:
        raise RecipeError(f"a precision is a bit width like 4, or weight/activation bits like 'w4a8' or (4, 8), "
                          f"got {p!r}")
    for b in (w, a):
        if not 1 <= b <= 16:
            raise RecipeError(f"precision {p!r}: bit widths must be from 1 to 16")
    return int(w), int(a)


def precision_label(p: Precision) -> str:
    return f"w{p[0]}a{p[1]}"


@dataclass(frozen=True)
class LayerCost:
    """One layer's size and work: ``macs`` per example and ``params`` weight elements."""

    name: str
    kind: str
    macs: int
    params: int

    def size_bits(self, p: Precision) -> int:
        return self.params * p[0]

    def bitops(self, p: Precision) -> int:
        return self.macs * p[0] * p[1]

    def cost(self, p: Precision, metric: str = "bitops") -> int:
        check_metric(metric)
        return self.bitops(p) if metric == "bitops" else self.size_bits(p)


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise RecipeError(f"cost metric must be one of {list(METRICS)} (bit-operations or stored bits), "
                          f"got {metric!r}")
    return metric


def _layer_macs(m: nn.Module, out: torch.Tensor, batch: int) -> int:
    per_example = out.numel() // max(1, batch)
    if isinstance(m, nn.Linear):
        return per_example * m.in_features
    return per_example * (m.in_channels // m.groups) * math.prod(m.kernel_size)


def _batch_size(example) -> int:
    if isinstance(example, torch.Tensor):
        return example.shape[0] if example.dim() else 1
    if isinstance(example, dict):
        first = next((v for v in example.values() if isinstance(v, torch.Tensor)), None)
        return first.shape[0] if first is not None and first.dim() else 1
    if isinstance(example, (tuple, list)) and example and isinstance(example[0], torch.Tensor):
        return _batch_size(example[0])
    return 1


@torch.no_grad()
def count_macs(model: nn.Module, example_input) -> dict[str, int]:
    """MACs per example of every Conv/Linear layer (``named_modules()`` order) on ``example_input``.

    ``example_input``: a tensor (batch first), a tuple of positional inputs, or a dict of
    keyword inputs. Quantizers are disabled and the model runs in eval mode; both are restored.
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, _COUNTED)}
    macs = dict.fromkeys(layers, 0)
    batch = _batch_size(example_input)
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: macs.__setitem__(n, macs[n] + _layer_macs(mod, out,
                                                                                                          batch)))
             for n, m in layers.items()]
    quantizers = [q for q in model.modules() if isinstance(q, Quantizer)]
    enabled = [q.enabled for q in quantizers]
    was_training = model.training
    model.eval()
    try:
        for q in quantizers:
            q.enabled = False
        if isinstance(example_input, dict):
            model(**example_input)
        elif isinstance(example_input, (tuple, list)):
            model(*example_input)
        else:
            model(example_input)
    finally:
        for h in hooks:
            h.remove()
        for q, e in zip(quantizers, enabled):
            q.enabled = e
        model.train(was_training)
    unreached = [n for n, v in macs.items() if v == 0]
    if unreached:
        warnings.warn(f"the example input never reached layer(s) {unreached[:8]}; they count 0 MACs", stacklevel=2)
    return macs


def default_example_input(model: nn.Module) -> torch.Tensor | None:
    """Zeros of the input shape the model records (``model.lowbit_architecture["input_shape"]``: every zoo
    model), else ``zeros(1, in_features)`` when the first Conv/Linear layer is a Linear (an MLP),
    else None."""
    shape = (getattr(model, "lowbit_architecture", None) or {}).get("input_shape")
    if shape:
        return torch.zeros(shape)
    first = next((m for m in model.modules() if isinstance(m, _COUNTED)), None)
    if isinstance(first, nn.Linear):
        return torch.zeros(1, first.in_features)
    return None


class CostModel:
    """Per-layer :class:`LayerCost` of a model, and the totals of any assignment.

    An assignment maps layer names to precisions ``(w_bits, a_bits)`` (anything
    :func:`parse_precision` reads); layers it leaves out are not counted.
    """

    def __init__(self, layers: dict[str, LayerCost]):
        self.layers = dict(layers)

    @classmethod
    def from_model(cls, model: nn.Module, example_input=None, *, metric: str = "bitops") -> CostModel:
        """Trace ``model`` on ``example_input`` (needed for bit-operations; the stored-size metric
        needs only parameter counts, and then MACs are counted when an example is given)."""
        check_metric(metric)
        if example_input is None:
            example_input = default_example_input(model)
            if example_input is None and metric == "bitops":
                raise RecipeError("counting bit-operations needs example_input: one batch of model inputs, "
                                  "e.g. torch.zeros(1, 1, 28, 28) for a 28x28 grey-scale image model (zoo "
                                  "models record their input shape and need none)")
        if example_input is not None:
            try:
                macs = count_macs(model, example_input)
            except (RuntimeError, TypeError, ValueError) as exc:
                if metric == "bitops":
                    raise RecipeError(f"the model did not run on the example input ({exc}); pass example_input: "
                                      "one batch the model accepts") from None
                macs = {}
        else:
            macs = {}
        layers = {name: LayerCost(name, type(m).__name__.replace("Quant", ""), int(macs.get(name, 0)),
                                  int(m.weight.numel()))
                  for name, m in model.named_modules() if isinstance(m, _COUNTED)}
        return cls(layers)

    def cost(self, assignment: dict, metric: str = "bitops") -> int:
        """Total cost (bit-operations or stored bits) of ``assignment``."""
        check_metric(metric)
        return sum(self.layers[n].cost(parse_precision(p), metric) for n, p in assignment.items())

    def totals(self, assignment: dict) -> dict:
        """``macs``, ``params``, ``bitops``, ``size_bits``, and the MAC-weighted mean weight and
        activation bits and parameter-weighted mean weight bits of ``assignment``."""
        ps = {n: parse_precision(p) for n, p in assignment.items()}
        macs = sum(self.layers[n].macs for n in ps)
        params = sum(self.layers[n].params for n in ps)
        out = {"macs": macs, "params": params,
               "bitops": sum(self.layers[n].bitops(p) for n, p in ps.items()),
               "size_bits": sum(self.layers[n].size_bits(p) for n, p in ps.items())}
        out["mean_w_bits"] = out["size_bits"] / params if params else 0.0
        out["mean_a_bits_by_macs"] = (sum(self.layers[n].macs * p[1] for n, p in ps.items()) / macs) if macs else 0.0
        out["mean_bitops_per_mac"] = out["bitops"] / macs if macs else 0.0
        return out

    def table(self) -> list[dict]:
        return [{"layer": c.name, "kind": c.kind, "macs": c.macs, "params": c.params} for c in self.layers.values()]
