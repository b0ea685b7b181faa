"""ONNX export: a QDQ model for onnxruntime, written from the exported graph and grids.

The ONNX graph is built directly with ``onnx.helper`` from the same :class:`Exported` data as
the lowbit format (not with ``torch.onnx.export``: torch 2.13 defaults to the dynamo exporter,
which needs ``onnxscript``, and neither exporter knows lowbit's grids). Opset 17.

QDQ layout (the "QDQ format" onnxruntime fuses into ``QLinearConv`` / ``QGemm`` /
``QLinearAdd`` where the pattern allows):

* each quantized layer's input is ``QuantizeLinear -> DequantizeLinear`` with the layer's input
  grid (per tensor, or per channel on axis 1); one pair per tensor and grid, shared by the
  layers that read it;
* the weight is an integer initializer with its per-channel (axis 0) or per-tensor step and
  zero point, dequantized by ``DequantizeLinear``;
* the bias is a float ``Add`` after the layer. Given to the Conv/Gemm next to dequantized
  operands, onnxruntime's ``WeightBiasQuantization`` would round it to int32 at ``s_w s_x``
  (half an accumulator unit: enough to change ~2 % of W4A4 ResNet-20 predictions);
* everything the fake-quant model keeps in float (conv outputs, residual sums, pooling,
  logits) stays float, so onnxruntime computes what lowbit's fake-quant model computes.

Activation codes live in uint8: a signed grid is written shifted by 128 (codes ``q + 128``, zero point ``z + 128``:
the same values), because onnxruntime fuses a Conv into ``QLinearConv`` only when its input and output codes share a
type. A clamp (ReLU6) whose readers' grids already map its bounds to their end codes is left out: ``QuantizeLinear``
saturates to the same codes, and a Conv followed by a ``Clip`` would first be fused into a float ``FusedConv``. Zero
padding read by quantized layers pads their codes with the zero point (``Q(0) = z``, exact), so that no float op
sits between a Conv and its QuantizeLinear. Below 8 bits the codes live in the same containers. ``QuantizeLinear``
saturates to the container, not to the narrower grid, so a narrowed input grid first clips the float input to
``[(qmin - z) s, (qmax - z) s]`` (``Clip``, or ``Min``/``Max`` against per-channel bounds). Weight codes below 8
bits are written multiplied by ``2^k``, the largest power of two that keeps them in int8 (in [-64, 63] when the
layer's input codes exceed 127, so that u8 x s8 pair sums stay inside int16 in AVX2 kernels), with the step divided
by ``2^k``: the same weights, and an integer accumulator ``2^k`` times finer. onnxruntime's 4-bit types are not
used: its CPU kernels run 4-bit only in weight-only MatMul, not in QDQ Conv.

Weight zero points. ONNX zero points are integers. SAWB's half-integer zero point is made
exact by doubling the codes (``(q - z) s = (2q - 2z)(s / 2)``). Any other fractional zero point
(weight bias correction) is split as in the integer engine, ``(q - z) s = (q - zi) s - zf s``:
the layer keeps int8 codes ``q - zi`` and gets a correction term ``(-zf s) * S``, ``S`` the sum of
its input over each receptive field (a conv with an all-ones int8 kernel, or ``ReduceSum``),
added after the layer. Float weights are avoided on purpose: onnxruntime (1.32) re-quantizes a
float weight that meets a ``DequantizeLinear``-ed input to its own int8 grid
(``WeightBiasQuantization``), which would silently change the model. Group-wise weight steps
are written as float weights all the same (and are affected). A negative weight step (batch
norm with negative gamma folded at export) becomes a positive step with negated codes.

``quantize_residual=True`` (with ``calib_data``) additionally quantizes, at 8 bits, the conv
outputs that feed residual additions (a signed grid from their calibrated range) and the
identity shortcut (at the grid the next block's layer reads), and gives each layer its bias as
int32 (``DequantizeLinear`` with step ``s_w s_x``, the QDQ convention), so that every conv of a
ResNet fuses into ``QLinearConv`` (below 8 bits the scaled codes above make that bias ``2^k``
times finer). This changes the numbers (an extra
8-bit rounding on the residual path, and the int32 bias): it is a speed option, used by
``benchmarks/export_speed.py``, with its accuracy in ``benchmarks/export_engine.py``. A layer whose output
reaches no quantized layer but a clamp first (MobileNetV2's and EfficientNet-Lite's last convolution: ReLU6, then
global pooling) gets an 8-bit grid spanning the clamp's bounds, ``s = (hi - lo) / 255``, which saturates exactly
where the clamp does, so the clamp is left out and the layer fuses too (one more 8-bit rounding, before the
pooling).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from lowbit.deploy.build import build_export
from lowbit.deploy.errors import ExportError
from lowbit.deploy.format import Exported
from lowbit.deploy.graph import LAYER_OPS
from lowbit.deploy.layers import GridData, LayerData
from lowbit.deploy.read import read_export

OPSET = 17


def _require_onnx():
    try:
        import onnx  # noqa: F401 - deferred: onnx is an optional dependency (the `onnx` extra)
    except ImportError as exc:
        raise ExportError("ONNX export needs the onnx package: pip install 'lowbit[onnx]'") from exc


def _exported(source) -> Exported:
    if isinstance(source, Exported):
        return source
    if isinstance(source, (str, os.PathLike)):
        return read_export(source)
    return build_export(source)


def _container(lo: int, hi: int) -> tuple[np.dtype, int, int] | None:
    if lo >= -128 and hi <= 127:
        return np.int8, -128, 127
    if lo >= 0 and hi <= 255:
        return np.uint8, 0, 255
    return None


class _Builder:
    def __init__(self, exp: Exported, *, residual_scales: dict[str, float] | None = None):
        from onnx import helper, numpy_helper  # deferred: onnx is an optional dependency
        self.h, self.numpy_helper = helper, numpy_helper
        self.exp = exp
        self.nodes, self.inits = [], []
        self.names: set[str] = set()
        self.qdq_cache: dict[tuple, str] = {}
        self.residual_scales = residual_scales or {}
        self.float_weights: list[str] = []

    def name(self, base: str) -> str:
        base = base.replace(".", "_")
        n, i = base, 1
        while n in self.names:
            n, i = f"{base}_{i}", i + 1
        self.names.add(n)
        return n

    def const(self, base: str, arr: np.ndarray) -> str:
        n = self.name(base)
        self.inits.append(self.numpy_helper.from_array(np.ascontiguousarray(arr), n))
        return n

    def node(self, op: str, inputs: list[str], base: str, **attrs) -> str:
        out = self.name(base)
        self.nodes.append(self.h.make_node(op, inputs, [out], name=out + "_" + op, **attrs))
        return out

    # ----- activations --------------------------------------------------------------------
    @staticmethod
    def _qdq_key(value: str, g: GridData) -> tuple:
        return value, g.scale.numpy().tobytes(), g.zero_point.numpy().tobytes(), str(g.qmin), str(g.qmax)

    def qdq(self, value: str, g: GridData, ndim: int, where: str) -> str:
        """``value`` through ``QuantizeLinear -> DequantizeLinear`` on grid ``g``: one pair per tensor and grid,
        shared by its readers."""
        key = self._qdq_key(value, g)
        if key in self.qdq_cache:
            return self.qdq_cache[key]
        lo, hi = g.qrange_tensors()
        z = g.zero_point.double()
        if not torch.equal(z, torch.round(z)):
            raise ExportError(f"{where}: a fractional activation zero point cannot be written as ONNX QDQ")
        # activation codes go in uint8 (a signed grid shifted by 128: q + 128 with zero point z + 128, the same
        # values): onnxruntime fuses a Conv into QLinearConv only when its input and output codes share a type
        offset = 128 if int(lo.min()) < 0 else 0
        if int(lo.min()) + offset < 0 or int(hi.max()) + offset > 255 or int(z.min()) < int(lo.min()) \
                or int(z.max()) > int(hi.max()):
            raise ExportError(f"{where}: activation range [{int(lo.min())}, {int(hi.max())}] fits no 8-bit container")
        dtype, cmin, cmax = np.uint8, 0, 255
        per_channel = g.scale.dim() > 0
        scale = g.scale.numpy().astype(np.float32)
        zp = (z + offset).numpy().astype(dtype)
        x = value
        narrowed = bool((lo + offset > cmin).any() or (hi + offset < cmax).any())
        if narrowed:
            s = g.scale.double()
            low = ((lo.double() - z) * s).float().numpy()
            high = ((hi.double() - z) * s).float().numpy()
            if per_channel or lo.dim() or hi.dim():
                shape = [1, -1] + [1] * (ndim - 2)
                c = max(scale.size, np.size(low), np.size(high))
                low = np.broadcast_to(low, (c,)).reshape(shape).astype(np.float32)
                high = np.broadcast_to(high, (c,)).reshape(shape).astype(np.float32)
                x = self.node("Min", [x, self.const(value + "_clip_hi", high)], value + "_min")
                x = self.node("Max", [x, self.const(value + "_clip_lo", low)], value + "_max")
            else:
                x = self.node("Clip", [x, self.const(value + "_clip_lo", np.array(low, np.float32)),
                                       self.const(value + "_clip_hi", np.array(high, np.float32))], value + "_clip")
        attrs = {"axis": 1} if per_channel else {}
        s_name = self.const(value + "_scale", scale)
        z_name = self.const(value + "_zero_point", zp)
        q = self.node("QuantizeLinear", [x, s_name, z_name], value + "_q", **attrs)
        dq = self.node("DequantizeLinear", [q, s_name, z_name], value + "_dq", **attrs)
        self.qdq_cache[key] = dq
        return dq

    def qdq_int8(self, value: str, scale: float) -> str:
        """``value`` through a signed 8-bit grid of step ``scale`` (zero point 0), written in uint8 (codes + 128)."""
        s = self.const(value + "_rscale", np.array(scale, np.float32))
        z = self.const(value + "_rzero", np.array(128, np.uint8))
        q = self.node("QuantizeLinear", [value, s, z], value + "_rq")
        return self.node("DequantizeLinear", [q, s, z], value + "_rdq")

    def qdq_range(self, value: str, lo: float, hi: float) -> str:
        """``value`` through an unsigned 8-bit grid spanning ``[lo, hi]`` (``lo <= 0 < hi``): step
        ``(hi - lo) / 255``, zero point ``round(-lo / step)``; it saturates at ``lo`` and ``hi``, as a clamp does."""
        step = np.float32((hi - lo) / 255.0)
        s = self.const(value + "_cscale", np.array(step, np.float32))
        z = self.const(value + "_czero", np.array(round(-lo / float(step)), np.uint8))
        q = self.node("QuantizeLinear", [value, s, z], value + "_cq")
        return self.node("DequantizeLinear", [q, s, z], value + "_cdq")

    def padded_codes(self, value: str, g: GridData, ndim: int, pad_consts: list[str], base: str) -> str:
        """Zero padding of ``value`` applied to its codes on ``g``: ``Q -> Pad (with z) -> DQ``, the same numbers as
        ``Q(Pad(value))`` since ``Q(0) = z``, and the DequantizeLinear is what the readers' ``qdq`` returns."""
        dq = self.qdq(value, g, ndim, f"padding {base!r}")
        dq_node = next(n for n in self.nodes if n.output[0] == dq)
        q, scale, zero = dq_node.input
        padded = self.node("Pad", [q] + pad_consts + [zero], base)
        out = self.node("DequantizeLinear", [padded, scale, zero], base + "_dq")
        self.qdq_cache[self._qdq_key(out, g)] = out
        return out

    # ----- weights ------------------------------------------------------------------------
    def weight(self, layer: LayerData) -> tuple[str, np.ndarray | None, np.ndarray | None]:
        """The weight input name, the per-channel step used (None for float weights), and the per-output-channel
        coefficient ``c = -zf * s`` of the zero-point correction term ``c * sum(x)`` (None if not needed)."""
        self.bias_factor, self.sign = 1, None
        g = layer.weight_grid
        if g is None:
            self.float_weights.append(layer.name)
            return self.const(layer.name + "_weight", layer.weight_float.numpy().astype(np.float32)), None, None
        if g.kind == "group":
            return self._float_weight(layer), None, None
        q = layer.weight_codes.to(torch.int64)
        co = q.shape[0]
        shape = [-1] + [1] * (q.dim() - 1)
        s = g.scale.double().expand(co) if g.scale.dim() == 0 else g.scale.double()
        z = g.zero_point.double().expand(co) if g.zero_point.dim() == 0 else g.zero_point.double()
        per_channel = g.scale.dim() > 0
        corr = None
        if torch.equal(z, torch.round(z)):
            qq, zz, ss = q, z, s
        elif torch.equal(2 * z, torch.round(2 * z)) and _container(int((2 * q - 2 * z.reshape(shape)).min()),
                                                                    int((2 * q - 2 * z.reshape(shape)).max())):
            # SAWB's (2^b - 1) / 2: (q - z) s = (2q - 2z) (s / 2), doubled codes and half the step
            qq, zz, ss = 2 * q - (2 * z).to(torch.int64).reshape(shape), torch.zeros_like(z), s / 2
            self.bias_factor = 2  # the bias in units of the halved step
        else:
            # (q - z) s = (q - zi) s - zf s: integer codes and a correction term -zf s * sum(x)
            zi = torch.round(z)
            qq, zz, ss = q - zi.to(torch.int64).reshape(shape), torch.zeros_like(z), s
            corr = (-(z - zi) * s).float().numpy()
            per_channel = True
        sign = torch.where(ss < 0, -1, 1)
        if bool((sign < 0).any()):
            qq, zz, ss = qq * sign.reshape(shape), zz * sign.double(), ss * sign.double()
            per_channel = True
        zi = zz.to(torch.int64)
        # below 8 bits: codes times 2^k (step / 2^k: the same weights) fill the int8 container, so the
        # accumulator - and the int32 bias integer kernels add - is 2^k times finer
        k = _fill_shift(qq, zi, layer)
        if k:
            qq, zi, ss = qq * 2**k, zi * 2**k, ss / 2**k
            self.bias_factor *= 2**k
        cont = _container(min(int(qq.min()), int(zi.min())), max(int(qq.max()), int(zi.max())))
        if cont is None:
            return self._float_weight(layer), None, None
        dtype = cont[0]
        w = self.const(layer.name + "_weight_q", qq.numpy().astype(dtype))
        if per_channel:
            sc = self.const(layer.name + "_weight_scale", ss.float().numpy())
            zp = self.const(layer.name + "_weight_zero_point", zi.numpy().astype(dtype))
            out = self.node("DequantizeLinear", [w, sc, zp], layer.name + "_weight", axis=0)
        else:
            sc = self.const(layer.name + "_weight_scale", np.array(float(ss[0]), np.float32))
            zp = self.const(layer.name + "_weight_zero_point", np.array(int(zi[0]), dtype))
            out = self.node("DequantizeLinear", [w, sc, zp], layer.name + "_weight")
        self.sign = sign
        return out, ss.numpy(), corr

    def correction(self, layer: LayerData, node, x: str, main: str, corr: np.ndarray) -> str:
        """``main + c * S`` with ``S`` the sum of the (dequantized) input over each output's receptive field:
        a conv with an all-ones int8 kernel (a ReduceSum for a linear layer)."""
        co = layer.out_channels
        if layer.kind == "linear":
            axes = self.const(layer.name + "_sum_axes", np.array([1], np.int64))
            ssum = self.node("ReduceSum", [x, axes], layer.name + "_input_sum", keepdims=1)
            c = self.const(layer.name + "_zp_correction", corr.reshape(1, co).astype(np.float32))
        else:
            a = node.attrs
            groups = int(a["groups"])
            kshape = [1 if groups == 1 else co] + list(layer.weight_shape[1:])
            ones = self.const(layer.name + "_ones_q", np.ones(kshape, np.int8))
            one = self.const(layer.name + "_ones_scale", np.array(1.0, np.float32))
            zero = self.const(layer.name + "_ones_zero_point", np.array(0, np.int8))
            k = self.node("DequantizeLinear", [ones, one, zero], layer.name + "_ones")
            ssum = self.node("Conv", [x, k], layer.name + "_input_sum", strides=a["stride"],
                             pads=a["padding"] + a["padding"], dilations=a["dilation"], group=groups)
            c = self.const(layer.name + "_zp_correction",
                           corr.reshape([1, co] + [1] * int(a.get("dims", 2))).astype(np.float32))
        term = self.node("Mul", [ssum, c], layer.name + "_zp_term")
        return self.node("Add", [main, term], layer.name + "_corrected")

    def _float_weight(self, layer: LayerData) -> str:
        self.float_weights.append(layer.name)
        return self.const(layer.name + "_weight", layer.dequantized_weight().numpy().astype(np.float32))

    def bias(self, layer: LayerData, w_step: np.ndarray | None) -> str | None:
        """int32 bias dequantized with step ``s_w s_x`` (the ONNX QDQ convention, which onnxruntime's integer
        kernels add as is), computed from the float bias at the step actually written; float otherwise."""
        if layer.bias is None:
            return None
        g = layer.input_grid
        if w_step is not None and g is not None and g.scale.dim() == 0:
            step64 = w_step.astype(np.float64) * float(g.scale)
            if layer.bias_exact:
                b = np.round(layer.bias.numpy().astype(np.float64) / step64)
            elif layer.bias_int32 is not None:
                b = layer.bias_int32.numpy().astype(np.float64) * self.sign.numpy() * self.bias_factor
            else:
                b = None
            if b is not None and np.abs(b).max(initial=0) <= 2**31 - 1:
                bq = self.const(layer.name + "_bias_q", b.astype(np.int32))
                sc = self.const(layer.name + "_bias_scale", step64.astype(np.float32))
                zp = self.const(layer.name + "_bias_zero_point", np.zeros(b.shape, np.int32))
                return self.node("DequantizeLinear", [bq, sc, zp], layer.name + "_bias", axis=0)
        return self.const(layer.name + "_bias", layer.bias.numpy().astype(np.float32))


def _fill_shift(q: torch.Tensor, z: torch.Tensor, layer: LayerData) -> int:
    """The largest ``k`` with ``q 2^k`` (and ``z 2^k``) inside int8, within [-64, 63] when the layer's input
    codes exceed 127 (keeps u8 x s8 pair sums inside int16 for AVX2 kernels), for weights below 8 bits."""
    g = layer.weight_grid
    bits = int(g.channel_bits.max()) if g.channel_bits is not None else g.bits
    if bits >= 8 or not q.numel():
        return 0
    lo, hi = min(int(q.min()), int(z.min())), max(int(q.max()), int(z.max()))
    ig = layer.input_grid
    wide_input = ig is not None and int((ig.qrange_tensors()[1] - ig.qrange_tensors()[0]).max()) > 127
    low, high = (-64, 63) if wide_input else (-128, 127)
    k = 0
    while k < 7 and lo * 2 ** (k + 1) >= low and hi * 2 ** (k + 1) <= high:
        k += 1
    return k


def to_onnx(source, path: str | os.PathLike | None = None, *, input_shape=None, quantize_residual: bool = False,
            calib_data=None, calib_batches: int = 4):
    """Write (if ``path``) and return an ONNX ``ModelProto`` of an export folder, an :class:`Exported`,
    or a model (quantized: QDQ; float: a plain fp32 graph with batch norm folded)."""
    _require_onnx()
    import onnx  # deferred: onnx is an optional dependency

    exp = _exported(source)
    residual_scales = {}
    if quantize_residual:
        if calib_data is None:
            raise ExportError("quantize_residual needs calib_data: the conv outputs that feed residual additions "
                              "get 8-bit grids from their calibrated range")
        plain = _build(exp, input_shape, {})
        residual_scales = _calibrate_residual(exp, plain, calib_data, calib_batches)
    model = _build(exp, input_shape, residual_scales, _clamped_outputs(exp) if quantize_residual else {})
    onnx.checker.check_model(model)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        onnx.save(model, str(path))
    return model


def _residual_inputs(exp: Exported) -> list[str]:
    """Conv/linear outputs read by an add (what quantize_residual gives a grid)."""
    by_name = {n.name: n for n in exp.graph.nodes}
    out = []
    for n in exp.graph.nodes:
        if n.op == "add":
            out += [i for i in n.inputs if by_name[i].op in LAYER_OPS and i not in out]
    return out


def _clamped_outputs(exp: Exported) -> dict[str, tuple[float, float]]:
    """Layer outputs read only by a clamp that is not a saturation of quantized readers (``_clamp_is_saturation``):
    ``{layer node: (lo, hi)}`` of the clamp, the range an output grid of the speed export spans."""
    users = exp.graph.users()
    out = {}
    for n in exp.graph.nodes:
        readers = users[n.name]
        if n.op in LAYER_OPS and len(readers) == 1 and readers[0].op == "clamp" \
                and not _clamp_is_saturation(readers[0], users, exp):
            lo, hi = readers[0].attrs["min"], readers[0].attrs["max"]
            if lo <= 0.0 < hi:
                out[n.name] = (float(lo), float(hi))
    return out


def _calibrate_residual(exp: Exported, model, calib_data, batches: int) -> dict[str, float]:
    import onnx  # deferred: onnx and onnxruntime are optional dependencies
    import onnxruntime as ort

    targets = _residual_inputs(exp)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in targets:
        m.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, ["N", "C", "H", "W"]))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    amax = dict.fromkeys(targets, 0.0)
    for i, batch in enumerate(calib_data):
        if i >= batches:
            break
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        outs = sess.run(targets, {"input": x.numpy().astype(np.float32)})
        for t, o in zip(targets, outs):
            amax[t] = max(amax[t], float(np.abs(o).max()))
    return {t: max(v, 1e-8) / 127.0 for t, v in amax.items()}


def _clamp_is_saturation(node, users: dict, exp: Exported) -> bool:
    """True when every reader of the clamp ``node`` (through zero padding, when 0 lies within the bounds) is a layer
    whose input grid already maps the clamp's bounds to its end codes, ``Q(lo) = qmin`` and ``Q(hi) = qmax`` for
    every channel (``Q(v) = round(v / s) + z`` in float32, as QuantizeLinear computes it): rounding is monotone and
    ``Q`` saturates, so ``Q(clamp(x, lo, hi)) = Q(x)`` for every ``x`` and the clamp can be left out exactly. ReLU6
    before an unsigned grid calibrated within [0, 6] is the case that matters: onnxruntime fuses a Conv with the
    Clip after it into a float ``FusedConv`` first, which stops the Conv becoming ``QLinearConv``."""
    lo, hi = node.attrs["min"], node.attrs["max"]
    readers = list(users[node.name])
    while any(u.op == "pad" for u in readers) and lo <= 0.0 <= hi:
        readers = [r for u in readers for r in (users[u.name] if u.op == "pad" else [u])]
    if not readers:
        return False
    for u in readers:
        g = exp.layers[u.layer].input_grid if u.op in LAYER_OPS else None
        if g is None or g.kind == "group":
            return False
        qmin, qmax = g.qrange_tensors()
        code = lambda v: torch.round(torch.tensor(v, dtype=torch.float32) / g.scale.float()) + g.zero_point.float()
        if bool((code(lo) > qmin).any() or (code(hi) < qmax).any()):
            return False
    return True


def _codes_grid_of_readers(readers: list, exp: Exported) -> GridData | None:
    """The one per-tensor input grid every reader (a quantized layer) of a value reads it at, else None."""
    grids = [exp.layers[u.layer].input_grid if u.op in LAYER_OPS else None for u in readers]
    if not grids or any(g is None or g.scale.dim() or g.kind == "group" for g in grids):
        return None
    same = all(torch.equal(g.scale, grids[0].scale) and torch.equal(g.zero_point, grids[0].zero_point)
               and g.qmin == grids[0].qmin and g.qmax == grids[0].qmax for g in grids)
    return grids[0] if same else None


def _build(exp: Exported, input_shape, residual_scales: dict[str, float],
           clamped: dict[str, tuple[float, float]] | None = None):
    from onnx import TensorProto, helper  # deferred: onnx is an optional dependency

    b = _Builder(exp, residual_scales=residual_scales)
    by_name = {n.name: n for n in exp.graph.nodes}
    users = exp.graph.users()
    vals: dict[str, str] = {}
    ndim: dict[str, int | None] = {}
    shape = input_shape or exp.input_shape
    graph_inputs, graph_outputs = [], []
    for n in exp.graph.nodes:
        if n.op == "input":
            dims = (["N"] + [int(d) for d in shape[1:]]) if shape else ["N", "C", "H", "W"]
            graph_inputs.append(helper.make_tensor_value_info("input", TensorProto.FLOAT, dims))
            b.names.add("input")
            vals[n.name], ndim[n.name] = "input", len(dims)
            continue
        src = [vals[i] for i in n.inputs]
        if n.op in LAYER_OPS:
            layer = exp.layers[n.layer]
            nd = (int(n.attrs.get("dims", 2)) + 2) if n.op == "conv" else 2
            x = src[0]
            if layer.input_grid is not None:
                x = b.qdq(x, layer.input_grid, nd, f"layer {n.layer!r} input")
            w, step, corr = b.weight(layer)
            # faithful graphs add a float bias after the layer: as a Conv/Gemm input next to dequantized operands,
            # onnxruntime (WeightBiasQuantization) would round it to int32 at s_w s_x and move ~2% of W4A4 ResNet-20
            # predictions; the speed graph keeps the int32 bias in the layer, so that it fuses
            separate = not residual_scales and layer.input_grid is not None and layer.bias is not None
            bias = None if separate else b.bias(layer, step)
            ins = [x, w] + ([bias] if bias else [])
            if n.op == "conv":
                a = n.attrs
                out = b.node("Conv", ins, n.name, strides=a["stride"], pads=a["padding"] + a["padding"],
                             dilations=a["dilation"], group=a["groups"])
            else:
                out = b.node("Gemm", ins, n.name, transB=1)
            if corr is not None:
                out = b.correction(layer, n, x, out, corr)
            if separate:
                shape = [1, -1] + [1] * (nd - 2)
                bias_const = b.const(n.name + "_bias", layer.bias.numpy().reshape(shape).astype(np.float32))
                out = b.node("Add", [out, bias_const], n.name + "_biased")
            if n.name in residual_scales:
                out = b.qdq_int8(out, residual_scales[n.name])
            if n.name in (clamped or {}):
                out = b.qdq_range(out, *clamped[n.name])
            vals[n.name], ndim[n.name] = out, nd
        elif n.op == "relu":
            vals[n.name], ndim[n.name] = b.node("Relu", src, n.name), ndim[n.inputs[0]]
        elif n.op == "clamp" and (_clamp_is_saturation(n, users, exp) or n.inputs[0] in (clamped or {})):
            vals[n.name], ndim[n.name] = src[0], ndim[n.inputs[0]]
        elif n.op == "clamp":
            bounds = [b.const(f"{n.name}_{k}", np.array(n.attrs[k], np.float32)) for k in ("min", "max")]
            vals[n.name], ndim[n.name] = b.node("Clip", src + bounds, n.name), ndim[n.inputs[0]]
        elif n.op == "pad":
            left, right, top, bottom = n.attrs["pads"]
            nd = ndim[n.inputs[0]] or 4
            pads = [0] * (nd - 2) + [top, left] + [0] * (nd - 2) + [bottom, right]
            pad_consts = [b.const(n.name + "_pads", np.array(pads, np.int64))]
            g = _codes_grid_of_readers(users[n.name], exp)
            if g is None:
                vals[n.name] = b.node("Pad", [src[0]] + pad_consts, n.name)
            else:  # pad the codes with the code of 0 (exactly z), so that the Conv before and after fuse
                vals[n.name] = b.padded_codes(src[0], g, nd, pad_consts, n.name)
            ndim[n.name] = nd
        elif n.op == "add":
            ins = list(src)
            if residual_scales:
                # the identity shortcut: read it at the grid of a layer that reads the same tensor, if any
                for k, i in enumerate(n.inputs):
                    if by_name[i].op in LAYER_OPS:
                        continue
                    readers = [u for u in users[i] if u.op in LAYER_OPS and exp.layers[u.layer].input_grid is not None]
                    if readers:
                        g = exp.layers[readers[0].layer].input_grid
                        ins[k] = b.qdq(vals[i], g, ndim[i] or 4, f"shortcut into {n.name!r}")
            vals[n.name], ndim[n.name] = b.node("Add", ins, n.name), ndim[n.inputs[0]]
        elif n.op == "maxpool2d":
            a = n.attrs
            vals[n.name] = b.node("MaxPool", src, n.name, kernel_shape=a["kernel"], strides=a["stride"],
                                  pads=a["padding"] + a["padding"], dilations=a["dilation"],
                                  ceil_mode=int(a["ceil_mode"]))
            ndim[n.name] = 4
        elif n.op == "avgpool2d":
            a = n.attrs
            vals[n.name] = b.node("AveragePool", src, n.name, kernel_shape=a["kernel"], strides=a["stride"],
                                  pads=a["padding"] + a["padding"], ceil_mode=int(a["ceil_mode"]),
                                  count_include_pad=int(a["count_include_pad"]))
            ndim[n.name] = 4
        elif n.op == "global_avgpool":
            out = b.node("GlobalAveragePool", src, n.name)
            if not n.attrs.get("keepdim", True):
                out = b.node("Flatten", [out], n.name + "_squeeze", axis=1)
            vals[n.name], ndim[n.name] = out, (4 if n.attrs.get("keepdim", True) else 2)
        elif n.op == "flatten":
            a = n.attrs
            if a.get("end_dim", -1) != -1 or a.get("start_dim", 0) not in (1,):
                raise ExportError(f"fx node {n.name!r}: flatten(start_dim={a.get('start_dim')}, "
                                  f"end_dim={a.get('end_dim')}) has no ONNX Flatten equivalent; use flatten(1)")
            vals[n.name], ndim[n.name] = b.node("Flatten", src, n.name, axis=1), 2
        elif n.op == "reshape":
            shp = b.const(n.name + "_shape", np.array(n.attrs["shape"], np.int64))
            vals[n.name], ndim[n.name] = b.node("Reshape", [src[0], shp], n.name), len(n.attrs["shape"])
        elif n.op == "output":
            b.nodes.append(helper.make_node("Identity", src, ["logits"], name="logits_Identity"))
            nd = ndim.get(n.inputs[0]) or 2
            graph_outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                               ["N"] + [f"logits_{i}" for i in range(1, nd)]))
        else:  # pragma: no cover
            raise ExportError(f"fx node {n.name!r}: op {n.op!r} has no ONNX writer")
    doc = "lowbit QDQ export" + (f"; float weights in {b.float_weights}" if b.float_weights else "")
    graph = helper.make_graph(b.nodes, "lowbit", graph_inputs, graph_outputs, b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="lowbit",
                              doc_string=doc)
    model.ir_version = 8
    return model
