"""Packed int4 / int8 CPU inference: quantized Linear layers and embedding tables that keep their integer
codes in memory and multiply them with torch's low-bit CPU kernels.

    packed = lowbit.deploy.pack_model(qmodel)                              # any quantized causal LM
    packed = lowbit.load_export("out/", model=hf_float, packed="int4")    # straight from an export

:class:`PackedLinear` computes, with ``q_x = clamp(round(x / s_x + z_x), qmin, qmax)`` the input codes of
the layer's static activation grid and ``q_w`` its weight codes (signed, zero point 0, one step ``s_w[c]``
per output channel; a per-tensor step is the same step for every channel):

    acc[c] = sum_k (q_x[k] - z_x) q_w[c, k]          y[c] = (s_x s_w[c]) acc[c] + b[c]

which is what the fake-quant Linear computes, ``linear((q_x - z_x) s_x, q_w s_w) + b``, reassociated.
Two kernels:

- **int4** (weight codes in [-8, 7]: 4-bit and narrower; ``out_features % 16 == 0``, ``in_features % 32 == 0``,
  what the kernel accepts): the codes ``q_w + 8`` in torch's CPU int4 layout
  (``aten._convert_weight_to_int4pack_for_cpu``: ``[N, K/2]`` uint8, two codes per byte), run by
  ``aten._weight_int4pack_mm_for_cpu`` (the kernel torchao uses on CPU), which dequantizes
  ``(u - 8) * scale + zero`` per group of 32 input features. The steps repeat per group in that format;
  lowbit's choice is to give the kernel scale 1 and zero 0 (so it sees the integer codes exactly) and
  the activation codes ``q_x - z_x`` as bfloat16 (exact: integers up to 256), and to apply ``s_x s_w[c]``
  in float32 afterwards: steps passed to the kernel would be rounded to bfloat16. The kernel sums in
  float32 (exact while ``K * 255 * 8 < 2^24``, i.e. up to 8,224 input features) and returns bfloat16,
  which rounds ``acc`` to 8 significant bits: **the layer's outputs differ from the fake-quant layer's
  by at most 2^-8 |acc| s_x s_w[c]** (plus float32 rounding), a relative 0.4 % per output. That is
  the price of the only fast int4 kernel torch has on CPU: its float32 and float16 paths are an
  order of magnitude slower than a float matmul here. In a deep model these per-layer differences
  move later activation codes across rounding boundaries, so whole-model logits differ by more
  (RESULTS.md measures it); use the int8 kernel where exactness matters.
- **int8** (codes in [-128, 127]: 8-bit weights, narrower weights whose shape the int4 kernel refuses,
  and every layer with ``pack_model(..., kernel="int8")``; needs an input grid of at most 256 codes):
  ``torch._int_mm`` (int8 x int8 -> int32, exact), then ``acc * (s_x s_w[c])`` in float32: equal to the
  fake-quant layer up to float32 rounding (the fake-quant one rounds each float product and partial sum;
  a relative ~1e-6). An input grid whose codes do not fit int8 (an asymmetric one, [0, 255] with zero
  point z_x) runs shifted by ``o = qmin + 128``: ``acc[c] = sum_k (q_x[k] - o) q_w[c, k] - (z_x - o)
  sum_k q_w[c, k]``, the second sum kept per output channel, still exact in int32.

:class:`PackedEmbedding` keeps an int8 table (codes in [-128, 127]) and one step per row (or one step):
``table[ids] = q[ids] * s[ids]`` in float32, bit for bit the fake-quant table's rows.

**Per-token input steps** (an input grid of ``granularity: token``): each row ``t`` of the input gets its
min-max step ``s_x[t]`` and zero point ``z_x[t]`` from the row itself, exactly as the fake-quant quantizer
computes them (:func:`lowbit.quant.minmax.minmax_grid`), and ``y[t, c] = (s_x[t] s_w[c]) acc[t, c] + b[c]``
with ``acc[t, c] = sum_k (q_x[t, k] - z_x[t]) q_w[c, k]``: still one integer matrix product (the int8 path
subtracts ``(z_x[t] - o) sum_k q_w[c, k]`` per row and column, exact in int32).

Anything else (weights with a zero point, group-wise or per-channel widths, an input left float or with
per-channel steps, wider grids) is refused by :func:`pack_model`, naming the module and this supported
set, rather than run partly packed.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lowbit.deploy.errors import ExportError
from lowbit.deploy.layers import GridData, LayerData, layer_from_module
from lowbit.nn.modules import QuantEmbedding, QuantLinear, float_class
from lowbit.quant.base import EPS
from lowbit.quant.grid import round_
from lowbit.quant.minmax import minmax_grid

INT4_GROUP = 32      # input features per step group in the int4 layout (the kernel takes 32, 64, 128 or 256)
INT4_N_MULTIPLE = 16  # the int4 packing needs output features in multiples of 16
KERNELS = ("int4", "int8")
SUPPORTED = ("Linear layers with signed weights of at most 8 bits, zero point 0, one step per output channel or per "
             "tensor, and a static per-tensor or a per-token input grid of at most 256 codes with an integer zero "
             "point; Embedding "
             "tables with signed weights of at most 8 bits, zero point 0, per-row or per-tensor steps")


def _unsupported(name: str, what: str) -> ExportError:
    return ExportError(f"module {name!r}: {what}; packed inference runs {SUPPORTED}")


def _weight_steps(layer: LayerData) -> torch.Tensor:
    """``[N]`` float32 steps of a symmetric per-channel or per-tensor weight grid (refusing any other)."""
    g = layer.weight_grid
    if g is None:
        raise _unsupported(layer.name, "its weights are float")
    if g.kind not in ("channel", "tensor") or g.channel_bits is not None:
        raise _unsupported(layer.name, f"its weight grid is {g.kind}-wise"
                           + (" with per-channel widths" if g.channel_bits is not None else ""))
    if not g.signed or bool((g.zero_point != 0).any()):
        raise _unsupported(layer.name, "its weight grid has a zero point (or is unsigned)")
    if int(g.qmin) < -128 or int(g.qmax) > 127:
        raise _unsupported(layer.name, f"its weight codes span [{g.qmin}, {g.qmax}], wider than int8")
    return g.scale.float().expand(layer.out_channels).contiguous() if g.scale.dim() == 0 else g.scale.float()


def _input_grid(layer: LayerData) -> GridData:
    g = layer.input_grid
    if g is None:
        raise _unsupported(layer.name, "its input is float")
    if g.kind not in ("tensor", "token") or g.channel_bits is not None or g.bits > 8:
        raise _unsupported(layer.name, f"its input grid is {g.kind}-wise at {g.bits} bits")
    if float(g.zero_point) != round(float(g.zero_point)):
        raise _unsupported(layer.name, "its input grid has a fractional zero point")
    return g


class _PackedModule(nn.Module):
    """A packed layer: every buffer it holds is part of its stored weights."""

    def weight_bytes(self) -> int:
        """Bytes of the packed weights and their steps."""
        return sum(b.numel() * b.element_size() for b in self.buffers())


class PackedLinear(_PackedModule):
    """A quantized Linear running packed integer weights (module docstring), built from its :class:`LayerData`."""

    def __init__(self, layer: LayerData, kernel: str = "int4"):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        self.in_features, self.out_features = layer.weight_shape[1], layer.weight_shape[0]
        w_step = _weight_steps(layer)
        g = _input_grid(layer)
        self.per_token = (bool(g.signed), g.symmetric) if g.kind == "token" else None  # steps of each row
        self.input_step, self.input_zero = float(g.scale), float(g.zero_point)  # static grid (1, 0 per token)
        self.input_range = (int(g.qmin), int(g.qmax))
        self.round_mode = g.round_mode
        codes = layer.weight_codes
        self.kernel = "int4" if (kernel == "int4" and int(codes.min()) >= -8 and int(codes.max()) <= 7
                                 and self.out_features % INT4_N_MULTIPLE == 0
                                 and self.in_features % INT4_GROUP == 0) else "int8"
        if self.kernel == "int8" and self.input_range[1] - self.input_range[0] > 255:
            raise _unsupported(layer.name, f"the int8 kernel needs at most 256 input codes, its input grid is "
                                           f"[{g.qmin}, {g.qmax}]")
        fits = self.input_range[0] >= -128 and self.input_range[1] <= 127
        self.input_offset = 0 if fits else self.input_range[0] + 128  # o: q_x - o fits int8 (module docstring)
        if self.kernel == "int4":
            self.register_buffer("weight_packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                (codes + 8).to(torch.int32).contiguous(), 1))
            groups = self.in_features // INT4_GROUP
            scales_and_zeros = torch.zeros(groups, self.out_features, 2, dtype=torch.bfloat16)
            scales_and_zeros[..., 0] = 1.0
            self.register_buffer("scales_and_zeros", scales_and_zeros)
        else:
            self.register_buffer("weight_int8", codes.to(torch.int8).contiguous())
            shift = round(self.input_zero) - self.input_offset  # (z_x - o) sum_k q_w[c, k], subtracted from acc
            self.register_buffer("acc_correction", (shift * codes.to(torch.int32).sum(1)).to(torch.int32)
                                 if shift and not self.per_token else None)
            self.register_buffer("weight_sums", codes.to(torch.int32).sum(1).to(torch.int32)
                                 if self.per_token else None)  # sum_k q_w[c, k], times (z_x[t] - o) per row
        self.register_buffer("output_step", (w_step.double() * float(g.scale)).float())  # s_x s_w[c]
        self.register_buffer("bias", layer.bias.clone() if layer.bias is not None else None)

    def input_grid(self, rows: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """``(s_x, z_x)``: the static grid's, or each row's ``[T, 1]`` min-max grid (per-token steps)."""
        if self.per_token is None:
            return self.input_step, self.input_zero
        signed, symmetric = self.per_token
        s, z = minmax_grid(rows.amin(1, keepdim=True), rows.amax(1, keepdim=True), signed, symmetric,
                           *self.input_range)
        return s.clamp_min(EPS), z

    def input_codes(self, x: torch.Tensor, minus, grid=None) -> torch.Tensor:
        """``q_x - minus`` as float32, ``q_x = round(x / s_x + z_x)`` clamped (the fake-quant input's codes);
        ``grid``: the rows' ``(s_x, z_x)`` when already computed."""
        step, zero = grid if grid is not None else self.input_grid(x)
        u = x / step
        if self.per_token is not None or zero:
            u = u + zero
        u = round_(u, self.round_mode).clamp_(*self.input_range)
        return u - minus

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float()
        step, zero = grid = self.input_grid(rows)
        if self.kernel == "int4":
            acc = torch.ops.aten._weight_int4pack_mm_for_cpu(self.input_codes(rows, zero, grid).to(torch.bfloat16),
                                                             self.weight_packed, INT4_GROUP, self.scales_and_zeros)
        else:
            acc = torch._int_mm(self.input_codes(rows, self.input_offset, grid).to(torch.int8), self.weight_int8.t())
            if self.acc_correction is not None:
                acc = acc - self.acc_correction
            if self.per_token is not None:
                acc = acc - (zero.to(torch.int32) - self.input_offset) * self.weight_sums
        y = torch.mul(acc, self.output_step)  # bfloat16 / int32 promoted to float32
        if self.per_token is not None:
            y = y * step  # s_x[t]: y = (s_w[c] acc) s_x[t], the order of the fake-quant product aside
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


class PackedEmbedding(_PackedModule):
    """An embedding table of int8 codes and per-row (or one) steps: ``q[ids] * s[ids]`` (module docstring)."""

    def __init__(self, layer: LayerData):
        super().__init__()
        steps = _weight_steps(layer)
        self.num_embeddings, self.embedding_dim = layer.weight_shape
        self.register_buffer("codes", layer.weight_codes.to(torch.int8).contiguous())
        self.register_buffer("steps", steps[:, None].contiguous())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.codes[ids].float() * self.steps[ids]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8"


def check_plain_tables(model: nn.Module, names) -> None:
    """Raise :class:`~lowbit.deploy.errors.ExportError` when a table named in ``names`` is of an ``nn.Embedding``
    subclass: its forward does more than the lookup (Gemma 3 scales it by sqrt(hidden size)), which a
    :class:`PackedEmbedding` in its place would silently drop."""
    for name in names:
        base = float_class(type(model.get_submodule(name)))
        if base is not nn.Embedding:
            raise ExportError(f"{name} is a {base.__module__}.{base.__name__}, whose forward does more "
                              "than the table lookup; packed inference supports plain nn.Embedding tables only: run "
                              "this model unpacked (lowbit.load_export without packed=)")


def packed_layers(layers, kernel: str = "int4") -> dict[str, nn.Module]:
    """``{name: PackedLinear or PackedEmbedding}`` for every quantized layer of ``layers`` (:class:`LayerData`;
    layers without a weight grid are left out). Raises :class:`~lowbit.deploy.errors.ExportError` naming the
    first one outside the supported set."""
    out: dict[str, nn.Module] = {}
    for layer in layers:
        if layer.weight_grid is None and layer.input_grid is None:
            continue
        out[layer.name] = PackedEmbedding(layer) if layer.kind == "embedding" else PackedLinear(layer, kernel)
    return out


def pack_model(qmodel: nn.Module, kernel: str = "int4") -> nn.Module:
    """A copy of the quantized ``qmodel`` whose quantized Linear and Embedding layers are
    :class:`PackedLinear` / :class:`PackedEmbedding` (module docstring); everything else (norms, attention,
    the KV-cache quantizers) is unchanged, in eval mode.

    ``kernel``: ``"int4"`` (default) keeps 4-bit (and narrower) weights packed two per byte and runs the int4
    kernel wherever the layer's shape allows it, the int8 kernel elsewhere; ``"int8"`` stores every weight as
    int8 and runs ``torch._int_mm`` everywhere: twice the memory of int4 for 4-bit weights, exact in int32,
    and on this CPU the faster kernel at one token per step (RESULTS.md).
    ``qmodel`` (from :func:`lowbit.quantize` or :func:`lowbit.load_export`) is left unchanged; the copy never
    holds the float weights of the packed layers (they are left out of the copy, not copied then dropped).
    Raises :class:`~lowbit.deploy.errors.ExportError` naming the first layer outside the supported set
    (:data:`SUPPORTED`) before anything is copied, ``ValueError`` for an unknown ``kernel``.
    """
    check_plain_tables(qmodel, [name for name, m in qmodel.named_modules() if isinstance(m, QuantEmbedding)])
    was_training = qmodel.training
    qmodel.eval()
    try:
        packed = packed_layers([layer_from_module(name, m) for name, m in qmodel.named_modules()
                                if isinstance(m, (QuantLinear, QuantEmbedding))], kernel)
    finally:
        qmodel.train(was_training)
    if not packed:
        raise ExportError(f"{type(qmodel).__name__} has no quantized Linear or Embedding layer to pack")
    # the float weights of the packed layers are not copied: the memo maps them to None
    memo = {id(qmodel.get_submodule(name).weight): None for name in packed}
    copied = copy.deepcopy(qmodel, memo)
    for name, module in packed.items():
        copied.set_submodule(name, module)
    return copied.eval()
