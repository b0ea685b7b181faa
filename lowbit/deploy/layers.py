"""What an export holds per Conv/Linear layer, read from the quantized model's grids.

:func:`extract_layers` turns each layer of the traced graph into a :class:`LayerData`: the
integer weight codes and their grid (step, zero point, range, widths), the input (activation)
grid, the bias, and any batch norm folded into it.

Batch norm. A model quantized with ``ptq: {fold_bn: true}`` was folded before its weight
grids were set: nothing to do. A batch norm still present after a quantized layer (QAT
recipes keep it) is folded **into the weight step, not the weights**: with
``a_c = gamma_c / sqrt(var_c + eps)``

    BN(conv(x, (q - z) s)) = conv(x, (q - z) (a s)) + (beta + (b - mu) a)

so the integer codes ``q`` (and the zero point) stay exactly the codes the model was
trained/calibrated with, each output channel's step becomes ``a_c s_c`` (per-tensor weight
grids become per-channel) and the bias absorbs the shift. Nothing is re-quantized; the
folded layer computes the same real function (up to float rounding). A negative ``gamma``
gives a negative step, which the format, the integer engine and the loaded model handle
as is (the ONNX writer flips the codes' sign instead). The manifest names every folded
batch norm and whether it was folded at quantization or at export.

Bias in the accumulator's scale. For a layer with quantized weights and input,
``bias_int32 = round_half_even(b / (s_w s_x))`` computed in float64 (``s_x``: the input
step; for per-channel input steps the largest one, which the manifest records). The
rounding error is at most half an accumulator unit. A bias beyond int32 in accumulator units
(an input range tiny next to the bias) is stored as float32 instead and the integer engine
uses an int64 bias for that layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit.deploy.errors import ExportError
from lowbit.deploy.graph import Graph
from lowbit.nn.modules import QuantMixin
from lowbit.quant.base import Quantizer
from lowbit.quant.grid import channel_int_range

INT32_MAX = 2**31 - 1


@dataclass
class GridData:
    """A quantizer's grid: ``q = clamp(round(x / scale + zero_point), qmin, qmax)``."""

    scale: torch.Tensor            # float32: [] per tensor, [C] per channel, [C, G] per group
    zero_point: torch.Tensor       # float32, same shape as scale (weights may be fractional)
    qmin: int | torch.Tensor       # int, or int64 [C] with per-channel widths
    qmax: int | torch.Tensor
    bits: int                      # nominal width
    channel_bits: torch.Tensor | None  # int64 [C] per-channel widths (bit allocation), else None
    signed: bool
    restricted: bool
    kind: str = "tensor"           # tensor / channel / group / token (inputs: steps computed at run time)
    axis: int = 0
    group_size: int | None = None
    round_mode: str = "half_even"
    method: str = ""
    symmetric: bool = True         # token grids: zero-point-free (signed data) or spanning each token's min..max

    @property
    def per_channel_range(self) -> bool:
        return self.channel_bits is not None

    def qrange_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(qmin, qmax)`` as int64 tensors ([] or [C])."""
        return torch.as_tensor(self.qmin, dtype=torch.int64), torch.as_tensor(self.qmax, dtype=torch.int64)

    def max_abs_centered(self) -> float:
        """Largest ``|q - z|`` on the grid."""
        lo, hi = self.qrange_tensors()
        z = self.zero_point.double()
        if self.kind == "group":
            z = z.amax(dim=-1) if z.dim() else z
        return float(torch.maximum((hi.double() - z).abs(), (z - lo.double()).abs()).max())

    def clip_abs(self) -> float:
        """Largest ``|x|`` the grid represents, ``max |(q - z) s|``."""
        lo, hi = self.qrange_tensors()
        s, z = self.scale.double().abs(), self.zero_point.double()
        return float(torch.maximum((hi.double() - z).abs() * s, (z - lo.double()).abs() * s).max())

    def describe(self) -> dict:
        d = {"method": self.method, "bits": self.bits, "signed": self.signed, "restricted": self.restricted,
             "granularity": self.kind, "round_mode": self.round_mode}
        if self.kind == "channel":
            d["axis"] = self.axis
        if self.kind == "group":
            d["group_size"] = self.group_size
        if self.kind == "token":
            d["symmetric"] = self.symmetric
        if self.channel_bits is None:
            d["qmin"], d["qmax"] = int(self.qmin), int(self.qmax)
        else:
            d["bits"] = "per-channel"
            d["mean_bits"] = round(float(self.channel_bits.double().mean()), 4)
            d["nominal_bits"] = self.bits
        return d


def grid_from_quantizer(q: Quantizer, where: str) -> GridData:
    g = q.grid()
    gran = g.granularity
    if q.channel_bits.numel():
        cb = q.channel_bits.to(torch.int64).clone()
        lo, hi = channel_int_range(cb, bool(q.signed), bool(q.restricted))
        if not (torch.equal(lo, torch.as_tensor(g.qmin, dtype=lo.dtype)) and
                torch.equal(hi, torch.as_tensor(g.qmax, dtype=hi.dtype))):
            raise ExportError(f"{where}: its per-channel integer ranges do not follow its per-channel widths")
        qmin, qmax = lo.to(torch.int64), hi.to(torch.int64)
    else:
        cb, qmin, qmax = None, int(g.qmin), int(g.qmax)
    scale = g.scale.detach().to(torch.float32).cpu().clone()
    zero = g.zero_point.detach().to(torch.float32).cpu().clone()
    if zero.shape != scale.shape:
        zero = zero.expand_as(scale).clone()
    if not torch.isfinite(scale).all() or bool((scale == 0).any()):
        raise ExportError(f"{where}: its step holds zero or non-finite values")
    return GridData(scale, zero, qmin, qmax, int(q.bits), cb, bool(g.signed), bool(q.restricted), gran.kind,
                    int(gran.axis), gran.group_size, q.round_mode, q.method, bool(getattr(q, "symmetric", True)))


@dataclass
class LayerData:
    name: str
    kind: str                         # conv / linear / embedding (causal-LM exports)
    weight_shape: tuple[int, ...]
    attrs: dict = field(default_factory=dict)
    weight_codes: torch.Tensor | None = None   # int64 codes q (quantized weights)
    weight_grid: GridData | None = None
    weight_float: torch.Tensor | None = None   # float32 weight (weights left float)
    bias: torch.Tensor | None = None           # float32 bias (see bias_exact)
    bias_exact: bool = True                    # False: `bias` was rebuilt from bias_int32
    bias_int32: torch.Tensor | None = None     # bias in the accumulator's scale
    input_grid: GridData | None = None
    bn: str | None = None                      # batch norm folded into this layer
    bn_folded_at: str | None = None            # "quantize" or "export"

    @property
    def quantized(self) -> bool:
        return self.weight_grid is not None and self.input_grid is not None

    @property
    def out_channels(self) -> int:
        return self.weight_shape[0]

    def acc_input_scale(self) -> torch.Tensor | None:
        """The input step that defines the accumulator's scale (the largest, for per-channel steps)."""
        if self.input_grid is None:
            return None
        return self.input_grid.scale.double().abs().max()

    def acc_scale(self) -> torch.Tensor | None:
        """Per output channel ``s_w * s_x`` (float64), the scale of the integer accumulator and of ``bias_int32``."""
        if self.weight_grid is None or self.input_grid is None or self.weight_grid.kind == "group" \
                or self.input_grid.kind == "token":
            return None
        s_w = self.weight_grid.scale.double().expand(self.out_channels) if self.weight_grid.scale.dim() == 0 \
            else self.weight_grid.scale.double()
        return s_w * self.acc_input_scale()

    def dequantized_weight(self) -> torch.Tensor:
        """``(q - z) * s`` exactly as the quantizer's forward computes it, or the float weight."""
        if self.weight_grid is None:
            return self.weight_float
        g = self.weight_grid
        q = self.weight_codes.to(torch.float32)
        if g.kind == "group":
            v = q.reshape(q.shape[0], -1, g.group_size)
            s, z = g.scale.unsqueeze(-1), g.zero_point.unsqueeze(-1)
        else:
            v = q
            shape = [1] * q.dim()
            if g.scale.dim():
                shape[g.axis % q.dim()] = -1
            s, z = g.scale.reshape(shape), g.zero_point.reshape(shape)
        return ((v - z) * s).reshape(q.shape)


def _bn_factor(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, shift)`` with ``BN(y) = a * y + shift`` (float64)."""
    inv = 1.0 / torch.sqrt(bn.running_var.double() + bn.eps)
    gamma = bn.weight.double() if bn.affine else torch.ones_like(inv)
    beta = bn.bias.double() if bn.affine else torch.zeros_like(inv)
    a = gamma * inv
    return a, beta - bn.running_mean.double() * a


def _fold_into_grid(grid: GridData, a: torch.Tensor, channels: int) -> GridData:
    s, z = grid.scale.double(), grid.zero_point.double()
    if grid.kind == "tensor":
        s, z = s.expand(channels).clone(), z.expand(channels).clone()
        grid.kind, grid.axis = "channel", 0
    if grid.kind == "channel":
        s = s * a
    else:
        s = s * a[:, None]
    grid.scale, grid.zero_point = s.to(torch.float32), z.to(torch.float32)
    if bool((grid.scale == 0).any()) or not torch.isfinite(grid.scale).all():
        raise ExportError("batch-norm folding gave a zero or non-finite weight step (gamma = 0 or var + eps = 0?)")
    return grid


def int32_bias(bias: torch.Tensor, acc_scale: torch.Tensor) -> torch.Tensor | None:
    """``round_half_even(bias / acc_scale)`` as int32, computed in float64; ``None`` where a value does not
    fit int32 (a layer whose input range is tiny next to its bias): the bias then stays float32."""
    b = torch.round(bias.double() / acc_scale)
    if bool((b.abs() > INT32_MAX).any()):
        return None
    return b.to(torch.int32)


@torch.no_grad()
def layer_from_module(name: str, m: nn.Module, attrs: dict | None = None) -> LayerData:
    """The :class:`LayerData` of one Conv/Linear/Embedding ``m``: integer weight codes and grid (or the float
    weight), input grid, float bias; no batch norm and no int32 bias yet (see :func:`set_int32_bias`).
    Raises :class:`ExportError` naming ``name`` for a grid the format cannot hold."""
    kind = "linear" if isinstance(m, nn.Linear) else "embedding" if isinstance(m, nn.Embedding) else "conv"
    where = f"layer {name!r}"
    weight = m.weight.detach().float().cpu()
    layer = LayerData(name, kind, tuple(weight.shape), dict(attrs or {}))
    wq = m.weight_quantizer if isinstance(m, QuantMixin) else None
    aq = m.input_quantizer if isinstance(m, QuantMixin) else None
    if wq is not None and wq.enabled:
        layer.weight_grid = grid_from_quantizer(wq, f"{where} weights")
        g = layer.weight_grid
        if g.kind == "channel" and g.axis % weight.dim() != 0:
            raise ExportError(f"{where}: weight steps per channel along axis {g.axis}; export needs them along "
                              "the output channels (axis 0)")
        codes = wq.quantize_int(m.weight.detach()).to(torch.int64).cpu()
        lo, hi = (t.reshape(shape_for(codes)) if t.dim() else t for t in g.qrange_tensors())
        if bool((codes < lo).any() or (codes > hi).any()):
            raise ExportError(f"{where}: weight codes fall outside the grid's integer range")
        layer.weight_codes = codes
    else:
        layer.weight_float = weight.clone()
    if aq is not None and aq.enabled:
        layer.input_grid = grid_from_quantizer(aq, f"{where} input")
    bias = getattr(m, "bias", None)
    layer.bias = bias.detach().float().cpu().clone() if bias is not None else None
    return layer


def set_int32_bias(layer: LayerData) -> None:
    """``layer.bias_int32`` from its float bias, where the layer has an accumulator scale (module docstring)."""
    acc = layer.acc_scale()
    if layer.bias is not None and acc is not None:
        layer.bias_int32 = int32_bias(layer.bias, acc)


@torch.no_grad()
def extract_layers(model: nn.Module, graph: Graph, *, folded_at_quantize: dict[str, str] | None = None
                   ) -> dict[str, LayerData]:
    """One :class:`LayerData` per Conv/Linear of ``graph`` (batch norms of ``graph.bn_folds`` folded)."""
    modules = dict(model.named_modules())
    folded_at_quantize = folded_at_quantize or {}
    layers: dict[str, LayerData] = {}
    attrs_of = {n.layer: n.attrs for n in graph.nodes if n.layer is not None}
    for name in graph.layers:
        layer = layer_from_module(name, modules[name], attrs_of.get(name, {}))
        if name in graph.bn_folds:
            bn = modules[graph.bn_folds[name]]
            a, shift = _bn_factor(bn)
            if layer.weight_grid is not None:
                layer.weight_grid = _fold_into_grid(layer.weight_grid, a, layer.out_channels)
            else:
                layer.weight_float = (layer.weight_float.double() * a.reshape(shape_for(layer.weight_float))).float()
            b = layer.bias.double() if layer.bias is not None else torch.zeros_like(a)
            layer.bias = (b * a + shift).float()
            layer.bn, layer.bn_folded_at = graph.bn_folds[name], "export"
        elif name in folded_at_quantize:
            layer.bn, layer.bn_folded_at = folded_at_quantize[name], "quantize"
        set_int32_bias(layer)
        layers[name] = layer
    return layers


def shape_for(weight: torch.Tensor) -> list[int]:
    return [-1] + [1] * (weight.dim() - 1)
