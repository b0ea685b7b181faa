"""The model's structure as a small list of operations, found with ``torch.fx``.

:func:`trace_graph` symbolically traces a (quantized) model with lowbit's quantized layers
and quantizers as leaves and maps each fx node to one of a few operations:

    input, conv, linear, relu, clamp, pad, add, maxpool2d, avgpool2d, global_avgpool, flatten,
    reshape, output

``clamp`` (``{"min", "max"}``, finite floats) is ReLU6 / Hardtanh / ``torch.clamp`` with constant
bounds; ``pad`` (``{"pads": [left, right, top, bottom]}``) is a zero padding of the last two
dimensions (``nn.ZeroPad2d``, ``F.pad`` with value 0), e.g. TensorFlow's asymmetric ``SAME``
padding before a stride-2 convolution.

``Identity``/``Dropout`` disappear (their users read their input) and every batch norm must
follow a Conv/Linear whose output it alone reads: it is folded into that layer (recorded in
:attr:`Graph.bn_folds`). Anything else raises :class:`~lowbit.deploy.errors.ExportError`
naming the module (or the function and the module whose ``forward`` calls it) and the op.
The list is stored in the export's manifest, so the integer engine and the ONNX writer run
from the exported files alone. :meth:`Graph.from_list` reads it back and checks every node
before anything runs it: known op, the number of inputs the op takes, inputs that name earlier
nodes, one ``input`` node first and one ``output`` node last, and each attribute with its type
and range (windows, strides, dilations 1..:data:`MAX_WINDOW`, paddings 0..:data:`MAX_WINDOW`: far
beyond any CNN here, and a bound on what a stored graph can make the engine allocate).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from lowbit.deploy.errors import ExportError
from lowbit.nn.modules import QuantMixin
from lowbit.quant.base import Quantizer

OPS = ("input", "conv", "linear", "relu", "clamp", "pad", "add", "maxpool2d", "avgpool2d", "global_avgpool", "flatten",
       "reshape", "output")
LAYER_OPS = ("conv", "linear")


@dataclass
class Node:
    name: str
    op: str
    inputs: list[str] = field(default_factory=list)
    layer: str | None = None  # module name of a conv/linear
    attrs: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {"name": self.name, "op": self.op, "inputs": list(self.inputs)}
        if self.layer is not None:
            d["layer"] = self.layer
        if self.attrs:
            d["attrs"] = self.attrs
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "graph node") -> Node:
        """A node from its stored form, checked (see :func:`check_attrs`); raises ExportError naming the field."""
        if not isinstance(d, dict) or set(d) - {"name", "op", "inputs", "layer", "attrs"}:
            raise ExportError(f"{where}: a node is an object with keys name, op, inputs (layer, attrs), got {d!r}")
        name, op, inputs = d.get("name"), d.get("op"), d.get("inputs", [])
        if not isinstance(name, str) or not name:
            raise ExportError(f"{where}.name: a non-empty string, got {name!r}")
        if op not in OPS:
            raise ExportError(f"{where}.op: unknown op {op!r} (node {name!r}); this lowbit knows {list(OPS)}")
        if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs) or len(inputs) != _ARITY[op]:
            raise ExportError(f"{where}.inputs: op {op!r} takes {_ARITY[op]} input name(s), got {inputs!r}")
        layer = d.get("layer")
        if (op in LAYER_OPS) != (layer is not None) or (layer is not None and (not isinstance(layer, str) or not layer)):
            raise ExportError(f"{where}.layer: {'a module name' if op in LAYER_OPS else 'absent'} for op {op!r}, "
                              f"got {layer!r}")
        attrs = d.get("attrs", {})
        check_attrs(op, attrs, f"{where}.attrs")
        return cls(name, op, list(inputs), layer, dict(attrs))


@dataclass
class Graph:
    nodes: list[Node]
    bn_folds: dict[str, str] = field(default_factory=dict)  # layer -> batch-norm module folded into it at export

    @property
    def layers(self) -> list[str]:
        """Conv/Linear module names in the order the graph first uses them."""
        seen: list[str] = []
        for n in self.nodes:
            if n.op in LAYER_OPS and n.layer not in seen:
                seen.append(n.layer)
        return seen

    def users(self) -> dict[str, list[Node]]:
        out: dict[str, list[Node]] = {n.name: [] for n in self.nodes}
        for n in self.nodes:
            for i in n.inputs:
                out[i].append(n)
        return out

    def to_list(self) -> list[dict]:
        return [n.to_dict() for n in self.nodes]

    @classmethod
    def from_list(cls, items: list[dict]) -> Graph:
        """The graph of a stored node list, checked node by node and as a whole (one input first, one output
        last, every input an earlier node); raises :class:`ExportError` naming the node and field."""
        if not isinstance(items, list) or len(items) < 2:
            raise ExportError(f"graph: a list of at least an input and an output node, got {type(items).__name__}")
        nodes, seen = [], set()
        for i, d in enumerate(items):
            node = Node.from_dict(d, f"graph[{i}]")
            if node.name in seen:
                raise ExportError(f"graph[{i}].name: {node.name!r} names two nodes")
            unknown = [x for x in node.inputs if x not in seen]
            if unknown:
                raise ExportError(f"graph[{i}].inputs: {unknown} name no earlier node (node {node.name!r})")
            if (node.op == "input") != (i == 0) or (node.op == "output") != (i == len(items) - 1):
                raise ExportError(f"graph[{i}].op: the graph has one input node first and one output node last, "
                                  f"found {node.op!r} at position {i} of {len(items)}")
            seen.add(node.name)
            nodes.append(node)
        return cls(nodes)


MAX_WINDOW = 256  # largest kernel, stride, dilation or padding a stored graph may hold
_ARITY = {"input": 0, "output": 1, "add": 2}
_ARITY.update({op: 1 for op in OPS if op not in _ARITY})
_WINDOW_ATTRS = {  # attribute -> smallest value; each a list of window.ndim integers up to MAX_WINDOW
    "stride": 1, "dilation": 1, "kernel": 1, "padding": 0,
}
_ATTRS = {
    "conv": {"dims": int, "stride": list, "padding": list, "dilation": list, "groups": int},
    "maxpool2d": {"kernel": list, "stride": list, "padding": list, "dilation": list, "ceil_mode": bool},
    "avgpool2d": {"kernel": list, "stride": list, "padding": list, "ceil_mode": bool, "count_include_pad": bool},
    "global_avgpool": {"keepdim": bool},
    "clamp": {"min": float, "max": float},
    "pad": {"pads": list},
    "flatten": {"start_dim": int, "end_dim": int},
    "reshape": {"shape": list},
}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_attrs(op: str, attrs, where: str) -> None:
    """Check a stored node's attributes: exactly the keys its op writes, each of its type and range."""
    expected = _ATTRS.get(op, {})
    if not isinstance(attrs, dict) or set(attrs) != set(expected):
        raise ExportError(f"{where}: op {op!r} has attributes {sorted(expected)}, got {attrs!r}")
    for key, kind in expected.items():
        v = attrs[key]
        ok = _is_int(v) if kind is int else (isinstance(v, (int, float)) and not isinstance(v, bool)
                                               and math.isfinite(v)) if kind is float else isinstance(v, kind)
        if not ok:
            raise ExportError(f"{where}.{key}: expected {'a finite ' if kind is float else ''}{kind.__name__}, "
                              f"got {v!r}")
    if op == "clamp" and not attrs["min"] <= attrs["max"]:
        raise ExportError(f"{where}: clamp needs min <= max, got {attrs!r}")
    if op == "pad" and (len(attrs["pads"]) != 4 or not all(_is_int(x) and 0 <= x <= MAX_WINDOW
                                                            for x in attrs["pads"])):
        raise ExportError(f"{where}.pads: 4 integers (left, right, top, bottom) from 0 to {MAX_WINDOW}, "
                          f"got {attrs['pads']!r}")
    ndim = attrs["dims"] if op == "conv" else 2
    if op == "conv" and (ndim not in (1, 2) or not 1 <= attrs["groups"] <= 2**20):
        raise ExportError(f"{where}: dims must be 1 or 2 and groups a positive integer, got {attrs!r}")
    for key, low in _WINDOW_ATTRS.items():
        if key in attrs:
            v = attrs[key]
            if len(v) != ndim or not all(_is_int(x) and low <= x <= MAX_WINDOW for x in v):
                raise ExportError(f"{where}.{key}: {ndim} integers from {low} to {MAX_WINDOW}, got {v!r}")
    if op == "flatten" and not all(-8 <= attrs[k] < 8 for k in ("start_dim", "end_dim")):
        raise ExportError(f"{where}: flatten dimensions lie in [-8, 8), got {attrs!r}")
    if op == "reshape":
        shape = attrs["shape"]
        ok = 1 <= len(shape) <= 8 and all(_is_int(x) and (x == -1 or 0 <= x < 2**31) for x in shape) and \
            shape.count(-1) <= 1 and 0 not in shape[1:]
        if not ok:
            raise ExportError(f"{where}.shape: up to 8 sizes, 0 (the batch) only first, at most one -1, "
                              f"got {shape!r}")


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (QuantMixin, Quantizer)) or super().is_leaf_module(m, qualname)


def _where(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"module {node.target!r} ({type(modules[node.target]).__name__})"
    stack = node.meta.get("nn_module_stack") or {}
    owner = list(stack.values())[-1] if stack else None
    inside = f" in the forward of {owner[0]!r} ({getattr(owner[1], '__name__', owner[1])})" if owner else \
        " in the model's top-level forward"
    return f"fx node {node.name!r}{inside}"


def _pair(v, n: int = 2) -> list[int]:
    if isinstance(v, (tuple, list)):
        return [int(x) for x in v]
    return [int(v)] * n


def _unsupported(node: fx.Node, modules, what: str, hint: str = "") -> ExportError:
    return ExportError(f"{_where(node, modules)}: {what} is not supported by lowbit export / the integer engine"
                       + (f"; {hint}" if hint else "") + ". Supported: Conv1d/Conv2d, Linear, BatchNorm after "
                       "Conv/Linear, ReLU, ReLU6/Hardtanh/clamp with constant bounds, zero padding (ZeroPad2d), "
                       "residual add, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d(1), flatten, Identity, Dropout")


def _conv_attrs(m: nn.Module, node, modules) -> dict:
    if m.padding_mode != "zeros":
        raise _unsupported(node, modules, f"padding_mode={m.padding_mode!r}", "use zero padding")
    padding = m.padding
    if isinstance(padding, str):
        if padding == "valid":
            padding = [0] * len(m.kernel_size)
        else:  # 'same' with stride 1: symmetric only
            total = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size)]
            if any(t % 2 for t in total):
                raise _unsupported(node, modules, "asymmetric padding='same'")
            padding = [t // 2 for t in total]
    return {"dims": len(m.kernel_size), "stride": _pair(m.stride), "padding": _pair(padding),
            "dilation": _pair(m.dilation), "groups": int(m.groups)}


def _module_node(node: fx.Node, m: nn.Module, modules) -> tuple[str, dict]:
    if isinstance(m, (nn.Conv1d, nn.Conv2d)) and type(m) not in (nn.Conv3d,):
        return "conv", _conv_attrs(m, node, modules)
    if isinstance(m, nn.Linear):
        return "linear", {}
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return "batchnorm", {}
    if isinstance(m, nn.ReLU):
        return "relu", {}
    if isinstance(m, nn.Hardtanh):  # ReLU6 too
        return "clamp", _clamp_attrs(m.min_val, m.max_val, node, modules)
    if isinstance(m, (nn.ZeroPad2d, nn.ConstantPad2d)):
        if float(m.value) != 0.0:
            raise _unsupported(node, modules, f"ConstantPad2d(value={m.value})", "only zero padding is")
        return "pad", _pad_attrs(m.padding, node, modules)
    if isinstance(m, nn.MaxPool2d):
        if m.return_indices:
            raise _unsupported(node, modules, "MaxPool2d(return_indices=True)")
        return "maxpool2d", {"kernel": _pair(m.kernel_size), "stride": _pair(m.stride or m.kernel_size),
                             "padding": _pair(m.padding), "dilation": _pair(m.dilation), "ceil_mode": bool(m.ceil_mode)}
    if isinstance(m, nn.AvgPool2d):
        if m.divisor_override is not None:
            raise _unsupported(node, modules, "AvgPool2d(divisor_override=...)")
        return "avgpool2d", {"kernel": _pair(m.kernel_size), "stride": _pair(m.stride or m.kernel_size),
                             "padding": _pair(m.padding), "ceil_mode": bool(m.ceil_mode),
                             "count_include_pad": bool(m.count_include_pad)}
    if isinstance(m, nn.AdaptiveAvgPool2d):
        if _pair(m.output_size) != [1, 1]:
            raise _unsupported(node, modules, f"AdaptiveAvgPool2d(output_size={m.output_size})",
                               "only global pooling (output_size=1) is")
        return "global_avgpool", {"keepdim": True}
    if isinstance(m, nn.Flatten):
        return "flatten", {"start_dim": int(m.start_dim), "end_dim": int(m.end_dim)}
    if isinstance(m, (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d)):
        return "identity", {}
    raise _unsupported(node, modules, f"the module type {type(m).__name__}")


def _clamp_attrs(low, high, node, modules) -> dict:
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (low, high)):
        raise _unsupported(node, modules, f"clamp({low}, {high})", "both bounds must be finite constants")
    return {"min": float(low), "max": float(high)}


def _pad_attrs(padding, node, modules) -> dict:
    pads = [int(p) for p in padding] if isinstance(padding, (tuple, list)) else [int(padding)] * 4
    if len(pads) != 4 or min(pads) < 0:
        raise _unsupported(node, modules, f"padding {padding}", "pad the last two dimensions by >= 0")
    return {"pads": pads}


_ADD = {operator.add, operator.iadd, torch.add}
_RELU = {F.relu, torch.relu, torch.relu_}
_FLATTEN = {torch.flatten}


def _arg(node: fx.Node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _function_node(node: fx.Node, modules, batch_values: set[str]) -> tuple[str, dict, list]:
    """(op, attrs, tensor inputs) of a call_function / call_method node."""
    fn, is_method = node.target, node.op == "call_method"
    name = fn if is_method else getattr(fn, "__name__", str(fn))
    tensors = [a for a in node.args if isinstance(a, fx.Node)]
    if (not is_method and fn in _ADD) or (is_method and fn in ("add", "add_")):
        if len(tensors) != 2 or len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
            raise _unsupported(node, modules, f"{name} with arguments {node.args} {dict(node.kwargs)}",
                               "only the sum of two tensors is")
        return "add", {}, tensors
    if (not is_method and fn in _RELU) or (is_method and fn in ("relu", "relu_")):
        return "relu", {}, tensors[:1]
    if not is_method and fn is F.relu6:
        return "clamp", _clamp_attrs(0.0, 6.0, node, modules), tensors[:1]
    if not is_method and fn is F.hardtanh:
        return "clamp", _clamp_attrs(_arg(node, 1, "min_val", -1.0), _arg(node, 2, "max_val", 1.0), node,
                                     modules), tensors[:1]
    if (not is_method and fn in (torch.clamp, torch.clip)) or (is_method and fn in ("clamp", "clip", "clamp_")):
        return "clamp", _clamp_attrs(_arg(node, 1, "min"), _arg(node, 2, "max"), node, modules), tensors[:1]
    if not is_method and fn is F.pad:
        if _arg(node, 2, "mode", "constant") != "constant" or (_arg(node, 3, "value", 0.0) or 0.0) != 0.0:
            raise _unsupported(node, modules, "F.pad other than constant zero padding")
        return "pad", _pad_attrs(_arg(node, 1, "pad"), node, modules), tensors[:1]
    if (not is_method and fn in _FLATTEN) or (is_method and fn == "flatten"):
        return "flatten", {"start_dim": int(_arg(node, 1, "start_dim", 0)),
                           "end_dim": int(_arg(node, 2, "end_dim", -1))}, tensors[:1]
    if is_method and fn in ("view", "reshape"):
        dims = list(node.args[1:])
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = list(dims[0])
        shape = []
        for i, d in enumerate(dims):
            if isinstance(d, fx.Node) and d.name in batch_values and i == 0:
                shape.append(0)  # ONNX Reshape: 0 copies the input's dimension (the batch)
            elif isinstance(d, int):
                shape.append(d)
            else:
                raise _unsupported(node, modules, f"{fn} with a computed shape {dims}",
                                   "write x.flatten(1) or x.view(x.size(0), -1)")
        return "reshape", {"shape": shape}, tensors[:1]
    if is_method and fn in ("contiguous",):
        return "identity", {}, tensors[:1]
    if not is_method and fn in (F.dropout, F.dropout2d):
        return "identity", {}, tensors[:1]
    if (not is_method and fn is torch.mean) or (is_method and fn == "mean"):
        dims = _arg(node, 1, "dim")
        dims = [dims] if isinstance(dims, int) else list(dims or [])
        if sorted(d % 4 for d in dims) == [2, 3]:
            return "global_avgpool", {"keepdim": bool(_arg(node, 2, "keepdim", False))}, tensors[:1]
        raise _unsupported(node, modules, f"mean over dims {dims}", "only the spatial mean (dims 2, 3) is")
    if not is_method and fn is F.adaptive_avg_pool2d:
        if _pair(_arg(node, 1, "output_size")) != [1, 1]:
            raise _unsupported(node, modules, "adaptive_avg_pool2d to a size other than 1")
        return "global_avgpool", {"keepdim": True}, tensors[:1]
    if not is_method and fn is F.max_pool2d:
        k = _arg(node, 1, "kernel_size")
        if _arg(node, 6, "return_indices", False):
            raise _unsupported(node, modules, "max_pool2d(return_indices=True)")
        return "maxpool2d", {"kernel": _pair(k), "stride": _pair(_arg(node, 2, "stride") or k),
                             "padding": _pair(_arg(node, 3, "padding", 0)),
                             "dilation": _pair(_arg(node, 4, "dilation", 1)),
                             "ceil_mode": bool(_arg(node, 5, "ceil_mode", False))}, tensors[:1]
    if not is_method and fn is F.avg_pool2d:
        k = _arg(node, 1, "kernel_size")
        if _arg(node, 6, "divisor_override") is not None:
            raise _unsupported(node, modules, "avg_pool2d(divisor_override=...)")
        return "avgpool2d", {"kernel": _pair(k), "stride": _pair(_arg(node, 2, "stride") or k),
                             "padding": _pair(_arg(node, 3, "padding", 0)),
                             "ceil_mode": bool(_arg(node, 4, "ceil_mode", False)),
                             "count_include_pad": bool(_arg(node, 5, "count_include_pad", True))}, tensors[:1]
    raise _unsupported(node, modules, f"the {'method' if is_method else 'function'} {name!r}")


def trace_graph(model: nn.Module) -> Graph:
    """The model's operations (see the module docstring); raises ExportError for anything unsupported."""
    modules = dict(model.named_modules())
    for name, m in modules.items():
        if "forward" in m.__dict__:
            raise ExportError(f"module {name or '<model>'!r} ({type(m).__name__}) has a forward set on the instance; "
                              "torch.fx traces the class's forward, so export would describe another computation")
    try:
        fx_graph = _Tracer().trace(model)
    except Exception as exc:  # torch.fx raises TraceError, TypeError, NotImplementedError...
        hint = ("; a Hugging Face transformer is not an exportable graph here (attention, LayerNorm and GELU have no "
                "integer kernels in lowbit's engine): lowbit.export writes a causal LM or an encoder without a "
                "graph (lowbit.deploy.transformer); keep any other as a quantized checkpoint, lowbit.save / lowbit.load"
                if hasattr(model, "config") and hasattr(model, "get_input_embeddings") else "")
        raise ExportError(f"torch.fx cannot trace {type(model).__name__} ({type(exc).__name__}: {exc}); export "
                          f"needs a model whose forward has no data-dependent Python control flow{hint}") from exc
    nodes: list[Node] = []
    alias: dict[str, str] = {}  # removed node -> the node its users read instead
    batch_values: set[str] = set()
    bn_of: dict[str, str] = {}
    inputs = 0
    for node in fx_graph.nodes:
        def src(a):
            return alias.get(a.name, a.name)

        if node.op == "placeholder":
            inputs += 1
            if inputs > 1:
                raise ExportError(f"{type(model).__name__}.forward takes more than one input ({node.name!r}); "
                                  "export supports models with one input tensor")
            nodes.append(Node(node.name, "input"))
        elif node.op == "output":
            out = node.args[0]
            if not isinstance(out, fx.Node):
                raise ExportError(f"{type(model).__name__}.forward returns {type(out).__name__}; export supports "
                                  "models returning one tensor")
            nodes.append(Node("output", "output", [src(out)]))
        elif node.op == "get_attr":
            raise _unsupported(node, modules, f"reading the tensor {node.target!r} in forward")
        elif node.op == "call_module":
            m = modules[node.target]
            if isinstance(m, Quantizer):
                raise _unsupported(node, modules, "a quantizer called outside a quantized layer")
            op, attrs = _module_node(node, m, modules)
            args = [a for a in node.args if isinstance(a, fx.Node)]
            if len(args) != 1 or node.kwargs:
                raise _unsupported(node, modules, f"calling {type(m).__name__} with {len(node.args)} arguments")
            if op == "identity":
                alias[node.name] = src(args[0])
                continue
            if op == "batchnorm":
                if m.running_mean is None:
                    raise _unsupported(node, modules, "BatchNorm without running statistics")
                bn_of[node.name] = node.target
            nodes.append(Node(node.name, op, [src(args[0])], node.target if op in LAYER_OPS else None, attrs))
        elif node.op in ("call_function", "call_method"):
            if (node.op == "call_method" and node.target == "size") or \
                    (node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",)):
                if node.op == "call_method" and _arg(node, 1, "dim") not in (0,):
                    raise _unsupported(node, modules, "x.size() other than x.size(0)")
                batch_values.add(node.name)
                continue
            if node.op == "call_function" and node.target is operator.getitem and \
                    isinstance(node.args[0], fx.Node) and node.args[0].name in batch_values:
                if node.args[1] != 0:
                    raise _unsupported(node, modules, "indexing a shape other than its batch dimension")
                batch_values.add(node.name)
                continue
            op, attrs, args = _function_node(node, modules, batch_values)
            if op == "identity":
                alias[node.name] = src(args[0])
                continue
            nodes.append(Node(node.name, op, [src(a) for a in args], None, attrs))
        else:  # pragma: no cover - fx has no other node kinds
            raise _unsupported(node, modules, f"fx op {node.op}")
    return _fold_batchnorms(Graph(nodes), bn_of, modules)


def _fold_batchnorms(graph: Graph, bn_of: dict[str, str], modules) -> Graph:
    by_name = {n.name: n for n in graph.nodes}
    users = graph.users()
    layer_calls: dict[str, int] = {}
    for n in graph.nodes:
        if n.op in LAYER_OPS:
            layer_calls[n.layer] = layer_calls.get(n.layer, 0) + 1
    alias: dict[str, str] = {}
    kept = []
    for n in graph.nodes:
        n.inputs = [alias.get(i, i) for i in n.inputs]
        if n.op != "batchnorm":
            kept.append(n)
            continue
        src = by_name[n.inputs[0]]
        bn_name = bn_of[n.name]
        if src.op not in LAYER_OPS:
            raise ExportError(f"module {bn_name!r} ({type(modules[bn_name]).__name__}) follows {src.op!r} "
                              f"({src.name!r}), not a Conv/Linear: lowbit folds batch norm only into the layer "
                              "that feeds it")
        if len(users[src.name]) != 1 or layer_calls[src.layer] != 1:
            raise ExportError(f"module {bn_name!r}: the output of {src.layer!r} is also used elsewhere, so the "
                              "batch norm cannot be folded into it")
        graph.bn_folds[src.layer] = bn_name
        alias[n.name] = src.name
    graph.nodes = kept
    return graph
