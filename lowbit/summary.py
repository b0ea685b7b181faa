"""Per-layer table of a quantized model and its stored size.

One row per quantized layer (Conv/Linear, and Embedding tables, whose input is token ids), then
one row per module holding other quantization points (a language model's attention block with
its key and value cache quantizers), so every quantizer of the model appears.

Stored size counts what an export holds: each quantized weight at its bit width (each
channel's own width after bit allocation, plus 4 bits per channel to record it), one
fp32 step (and zero point where it is not zero) per step group, biases as 32-bit, and every
other parameter or buffer of the model (batch norm, float embeddings, float layers) as fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lowbit.nn.modules import QuantMixin
from lowbit.quant.base import Quantizer


@dataclass
class LayerRow:
    name: str
    kind: str
    weight: str
    activation: str
    params: int
    size_bytes: float


def quantizer_label(q: Quantizer | None) -> str:
    if q is None:
        return "float"
    gran = {"tensor": "", "channel": "/ch", "token": "/token"}.get(q.granularity.kind, f"/g{q.granularity.group_size}")
    bits = f"{q.mean_bits:.2f}b" if q.channel_bits.numel() else f"{q.bits}b"
    return f"{bits} {q.method}{gran}"


def weight_bits(q: Quantizer | None, numel: int) -> float:
    """Bits to store one weight tensor with its grid (32 for a float weight)."""
    if q is None:
        return 32.0 * numel
    n_steps = max(1, q.get_scale().numel())
    zero_point_bits = 0 if bool((q.zero_point == 0).all()) else 32 * n_steps
    width_bits = 4 * q.channel_bits.numel()  # each channel's own width, after bit allocation
    return q.mean_bits * numel + 32.0 * n_steps + zero_point_bits + width_bits


def _step_bits(q: Quantizer) -> float:
    return 64.0 * max(1, q.get_scale().numel())  # an activation step + zero point per group


def _layer_bytes(m: QuantMixin) -> float:
    bits = weight_bits(m.weight_quantizer, m.weight.numel())
    bias = getattr(m, "bias", None)
    if bias is not None:
        bits += 32.0 * bias.numel()
    if m.input_quantizer is not None:
        bits += _step_bits(m.input_quantizer)
    return bits / 8.0


def _point_rows(model: nn.Module) -> list[LayerRow]:
    """Quantizers no quantized layer owns (e.g. the KV cache's), one row per module holding them."""
    owned = {id(q) for m in model.modules() if isinstance(m, QuantMixin)
             for q in (m.weight_quantizer, m.input_quantizer) if q is not None}
    rows = []
    for name, m in model.named_modules():
        points = [(child, q) for child, q in m.named_children() if isinstance(q, Quantizer) and id(q) not in owned]
        if points and not isinstance(m, QuantMixin):
            label = ", ".join(f"{child.removesuffix('_quantizer')} {quantizer_label(q)}" for child, q in points)
            rows.append(LayerRow(name, type(m).__name__, "-", label, 0,
                                 sum(_step_bits(q) for _, q in points) / 8.0))
    return rows


class Summary:
    """Rows of quantized layers, the layers left float, and totals; ``str()`` renders a table."""

    def __init__(self, model: nn.Module):
        self.rows: list[LayerRow] = []
        counted: set[int] = set()
        for name, m in model.named_modules():
            if isinstance(m, QuantMixin):
                bias = getattr(m, "bias", None)
                embedding = isinstance(m, nn.Embedding)
                self.rows.append(LayerRow(name, type(m).__name__.replace("Quant", ""),
                                          quantizer_label(m.weight_quantizer),
                                          "token ids" if embedding else quantizer_label(m.input_quantizer),
                                          m.weight.numel() + (bias.numel() if bias is not None else 0),
                                          _layer_bytes(m)))
                counted |= {id(p) for p in (m.weight, bias) if p is not None}
        self.rows += _point_rows(model)
        report = getattr(model, "lowbit_report", None)
        self.left_float = dict(report.left_float) if report is not None else {}
        prefix = getattr(model, "lowbit_sink_prefix", None)  # kv_cache.sink_prefix (lowbit.llm.sink_prefix)
        self.sink_prefix = None if prefix is None else prefix.token_ids.tolist()
        quantizer_ids = _quantizer_tensor_ids(model)
        model_tensors = [t for t in list(model.parameters()) + list(model.buffers())
                         if t.is_floating_point() and id(t) not in quantizer_ids]
        self.float_bytes = 4.0 * sum(t.numel() for t in model_tensors if id(t) not in counted)
        self.fp32_bytes = 4.0 * sum(t.numel() for t in model_tensors)

    @property
    def total_bytes(self) -> int:
        return int(round(sum(r.size_bytes for r in self.rows) + self.float_bytes))

    def __str__(self) -> str:
        head = ("layer", "type", "weights", "activations", "params", "bytes")
        body = [(r.name, r.kind, r.weight, r.activation, f"{r.params:,}", f"{r.size_bytes:,.0f}") for r in self.rows]
        widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(head)]
        fmt = "  ".join(f"{{:<{w}}}" if i < 4 else f"{{:>{w}}}" for i, w in enumerate(widths))
        lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*row) for row in body]
        lines.append(f"stored size {self.total_bytes:,} bytes (fp32 {self.fp32_bytes:,.0f} bytes, "
                     f"{self.fp32_bytes / max(1, self.total_bytes):.1f}x smaller); other float tensors "
                     f"{self.float_bytes:,.0f} bytes")
        for name, why in self.left_float.items():
            lines.append(f"left float: {name or '<model>'}: {why}")
        if self.sink_prefix is not None:
            lines.append(f"sink prefix: tokens {self.sink_prefix}, their float keys and values first in every cache")
        return "\n".join(lines)

    __repr__ = __str__


def _quantizer_tensor_ids(model: nn.Module) -> set[int]:
    ids = set()
    for m in model.modules():
        if isinstance(m, Quantizer):
            ids |= {id(t) for t in list(m.parameters()) + list(m.buffers())}
    return ids


def summary(model: nn.Module) -> Summary:
    """Per-layer table (name, type, weight bits/method, activation bits/method, params, stored bytes)."""
    return Summary(model)


def stored_size_bytes(model: nn.Module) -> int:
    """Bytes an export of ``model`` holds (see the module docstring)."""
    return Summary(model).total_bytes
