"""The deployment format: ``model.safetensors`` (packed integers, grids) + ``manifest.json``.

``lowbit.export(qmodel, "out/")`` writes

``model.safetensors`` — a few flat tensors ("arenas"), one per kind of data, so the file
carries almost no header overhead; each layer's slice is named in the manifest as
``[tensor key, offset, count]`` (offset and count in elements of that tensor):

    weight.int8          I8   8-bit signed weight codes, one per byte
    weight.packed        U8   every other width: offset codes q - qmin, bit-packed (lowbit.deploy.pack);
                              each layer's stream starts on a byte
    weight.channel_bits  U8   per-output-channel widths of layers with bit allocation (5-bit packed)
    weight.scale         F32  weight steps (per channel, per tensor, or [C, G] per group)
    weight.zero_point    F32  weight zero points, only for layers where one is non-zero
                              (fractional after bias correction, (2^b-1)/2 for SAWB's even levels);
                              one value when every channel has the same (count 1, broadcast)
    input.scale          F32  activation (layer input) steps
    input.zero_point     F32  activation zero points (integers), only where non-zero
    input.channel_bits   U8   per-channel activation widths (bit allocation, 5-bit packed)
    bias.int32           I32  biases in the accumulator's scale, round_half_even(b / (s_w s_x))
    bias.float           F32  float biases: layers without an accumulator scale (a float side, or
                              group-wise weight steps), biases beyond int32 in accumulator units,
                              and (by default, float_bias=True) every layer: 4 bytes per output
                              channel that buy a bit-identical reload and an exact bias in the
                              integer engine
    float.weight         F32  weights of layers left in float

``manifest.json`` — format name and version, lowbit version, the architecture reference (a zoo
model and its constructor arguments, or a user-given name), the recipe, per layer its type,
shape, weight and input grids (method, bits or per-channel widths, range, granularity, round
mode), bias storage and any batch norm folded into it (at quantization or at export), which
layers stay float and why, the graph of operations (:mod:`lowbit.deploy.graph`), sizes, and
the SHA-256 of ``model.safetensors``.

:func:`read_export` checks the format name and version and the checksum before decoding
anything; a mismatch raises :class:`~lowbit.deploy.errors.ExportFileError` (a
``CheckpointError``). :func:`load` rebuilds a torch model (see its docstring).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lowbit.deploy.errors import ExportError, ExportFileError
from lowbit.deploy.graph import Graph, trace_graph
from lowbit.deploy.layers import GridData, LayerData, extract_layers
from lowbit.deploy.pack import pack_bits, packed_nbytes, unpack_bits

FORMAT = "lowbit-export"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
TENSOR_FILE = "model.safetensors"
CHANNEL_BITS_WIDTH = 5  # per-channel widths 0..16, bit-packed
MANIFEST_FILE = "manifest.json"

_ARENA_DTYPES = {
    "weight.int8": torch.int8, "weight.packed": torch.uint8, "weight.channel_bits": torch.uint8,
    "weight.scale": torch.float32, "weight.zero_point": torch.float32,
    "input.scale": torch.float32, "input.zero_point": torch.float32, "input.channel_bits": torch.uint8,
    "bias.int32": torch.int32, "bias.float": torch.float32, "float.weight": torch.float32,
}


@dataclass
class Exported:
    """An export in memory: the graph, the per-layer data and the metadata (what the files hold)."""

    graph: Graph
    layers: dict[str, LayerData]
    architecture: dict = field(default_factory=dict)
    recipe: dict | None = None
    input_shape: list[int] | None = None
    left_float: dict[str, str] = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)  # as read from disk (empty for a fresh build)


# ----- building ---------------------------------------------------------------------------
def _lowbit_version() -> str:
    from lowbit import __version__
    return __version__


def infer_architecture(model: nn.Module, arch: str | None) -> dict:
    """``{"zoo": name, "kwargs": {...}}`` when ``model`` is a zoo model (checked layer by layer), else
    ``{"zoo": None, "name": arch or the class name}``."""
    from lowbit.zoo import create_model, list_models

    shapes = _layer_shapes(model)
    candidates = [arch] if arch in list_models() else ([] if arch else list_models())
    first = next(iter(shapes.values()), None)
    last = list(shapes.values())[-1] if shapes else None
    if first is not None:
        for name in candidates:
            kwargs = {"num_classes": last[0], "in_channels": first[1] if len(first) > 2 else 1}
            if name == "mlp":
                side = math.isqrt(first[1])
                if side * side != first[1]:
                    continue
                kwargs = {"num_classes": last[0], "in_size": side}
            try:
                ref = create_model(name, **kwargs)
            except Exception:  # noqa: BLE001 - a candidate that cannot be built simply does not match
                continue
            if _layer_shapes(ref) == shapes and type(ref) is _float_class(model):
                return {"zoo": name, "kwargs": kwargs}
    if arch in list_models():
        raise ExportError(f"the model does not match the zoo architecture {arch!r} layer for layer; pass arch= "
                          "a descriptive name instead, and the float model to lowbit.load_export")
    return {"zoo": None, "name": arch or f"{type(model).__module__}.{type(model).__qualname__}"}


def _float_class(model: nn.Module) -> type:
    return type(model)


def _layer_shapes(model: nn.Module) -> dict[str, tuple]:
    return {n: tuple(m.weight.shape) for n, m in model.named_modules()
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))}


def build_export(qmodel: nn.Module, *, arch: str | None = None, input_shape=None) -> Exported:
    """Trace ``qmodel`` and read every layer's integers and grids (the model is put in eval mode)."""
    was_training = qmodel.training
    qmodel.eval()  # eval re-derives dynamic weight grids from the current weights, as evaluation uses
    try:
        graph = trace_graph(qmodel)
        report = getattr(qmodel, "lowbit_report", None)
        folded = {conv: bn for conv, bn in (report.folded if report is not None else [])}
        layers = extract_layers(qmodel, graph, folded_at_quantize=folded)
    finally:
        qmodel.train(was_training)
    left_float = {}
    for name, layer in layers.items():
        if layer.weight_grid is None or layer.input_grid is None:
            why = (report.left_float.get(name) if report is not None else None) or \
                ("weights and input float" if layer.weight_grid is None and layer.input_grid is None else
                 "weights float" if layer.weight_grid is None else "input (activations) float")
            left_float[name] = why
    recipe = report.recipe.to_dict() if report is not None else None
    return Exported(graph, layers, infer_architecture(qmodel, arch), recipe,
                    list(input_shape) if input_shape is not None else None, left_float)


# ----- writing ----------------------------------------------------------------------------
class _Arena:
    def __init__(self):
        self.parts: dict[str, list[torch.Tensor]] = {k: [] for k in _ARENA_DTYPES}
        self.count = {k: 0 for k in _ARENA_DTYPES}

    def add(self, key: str, t: torch.Tensor) -> dict:
        flat = t.detach().reshape(-1).to(_ARENA_DTYPES[key]).cpu()
        ref = [key, self.count[key], int(flat.numel())]
        self.parts[key].append(flat)
        self.count[key] += int(flat.numel())
        return ref

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: torch.cat(v).contiguous() for k, v in self.parts.items() if v}


def _nbytes(ref: dict | None) -> int:
    if ref is None:
        return 0
    return ref[2] * torch.tensor([], dtype=_ARENA_DTYPES[ref[0]]).element_size()


def _write_grid(arena: _Arena, g: GridData, side: str) -> dict:
    d = g.describe()
    d["scale_shape"] = list(g.scale.shape)
    d["scale"] = arena.add(f"{side}.scale", g.scale)
    z = g.zero_point
    if z.numel() > 1 and bool((z == z.reshape(-1)[0]).all()):
        z = z.reshape(-1)[:1]  # one value for every channel (SAWB's (2^b - 1) / 2): stored once, broadcast
    d["zero_point"] = arena.add(f"{side}.zero_point", z) if bool((z != 0).any()) else None
    d["channel_bits"] = arena.add(f"{side}.channel_bits", pack_bits(g.channel_bits, CHANNEL_BITS_WIDTH)) \
        if g.channel_bits is not None else None
    return d


def _weight_storage(layer: LayerData) -> tuple[str, torch.Tensor, object]:
    """``("int8", codes)`` or ``("packed", bytes, widths)`` for a quantized weight."""
    g, q = layer.weight_grid, layer.weight_codes
    if g.channel_bits is None and g.bits == 8 and int(g.qmin) >= -128 and int(g.qmax) <= 127:
        return "int8", q, 8
    lo, hi = g.qrange_tensors()
    widths = g.channel_bits if g.channel_bits is not None else g.bits
    span_ok = bool(((hi - lo) < (torch.as_tensor(2, dtype=torch.int64) ** torch.as_tensor(widths))).all())
    if not span_ok:
        raise ExportError(f"layer {layer.name!r}: its weight range [{g.qmin}, {g.qmax}] does not fit {widths} bits")
    u = q - (lo.reshape([-1] + [1] * (q.dim() - 1)) if lo.dim() else lo)
    return "packed", pack_bits(u, widths), widths


def write_export(exp: Exported, path: str | os.PathLike, *, float_bias: bool = True) -> Path:
    """Write ``exp`` to the folder ``path`` (created); returns the folder."""
    from lowbit.checkpoint import write_safetensors

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    arena = _Arena()
    layers_meta: dict[str, dict] = {}
    for name in exp.graph.layers:
        layer = exp.layers[name]
        entry: dict = {"type": layer.kind, "weight_shape": list(layer.weight_shape), "attrs": layer.attrs,
                       "quantized": layer.quantized}
        if layer.weight_grid is not None:
            w = _write_grid(arena, layer.weight_grid, "weight")
            storage, data, _ = _weight_storage(layer)
            w["storage"] = storage
            w["data"] = arena.add("weight.int8" if storage == "int8" else "weight.packed", data)
            entry["weight"] = w
        else:
            entry["weight"] = {"float": True, "data": arena.add("float.weight", layer.weight_float)}
        entry["input"] = _write_grid(arena, layer.input_grid, "input") if layer.input_grid is not None else None
        if layer.bias is not None:
            keep_float = float_bias or layer.bias_int32 is None
            entry["bias"] = {
                "int32": arena.add("bias.int32", layer.bias_int32) if layer.bias_int32 is not None else None,
                "float": arena.add("bias.float", layer.bias) if keep_float else None,
            }
        else:
            entry["bias"] = None
        entry["bn_folded"] = {"module": layer.bn, "at": layer.bn_folded_at} if layer.bn else None
        refs = [entry["weight"].get("data"), entry["weight"].get("scale"), entry["weight"].get("zero_point"),
                entry["weight"].get("channel_bits")]
        if entry["input"]:
            refs += [entry["input"]["scale"], entry["input"]["zero_point"], entry["input"]["channel_bits"]]
        if entry["bias"]:
            refs += [entry["bias"]["int32"], entry["bias"]["float"]]
        entry["stored_bytes"] = sum(_nbytes(r) for r in refs)
        layers_meta[name] = _drop_none(entry)
    tensors = arena.tensors()
    tmp = folder / (TENSOR_FILE + ".tmp")
    write_safetensors(tensors, tmp, metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    os.replace(tmp, folder / TENSOR_FILE)
    data = (folder / TENSOR_FILE).read_bytes()
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "lowbit_version": _lowbit_version(),
        "architecture": exp.architecture,
        "input_shape": exp.input_shape,
        "tensors": {"file": TENSOR_FILE, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)},
        "conventions": {
            "weight_codes": "q = clamp(round(w / s + z), qmin, qmax); w_hat = (q - z) * s",
            "packing": "offset codes q - qmin, little-endian bit stream, channel by channel, per layer byte-aligned",
            "bias_int32": "round_half_even(b / (s_w * max(s_x))) in float64: the accumulator's scale",
            "absent": "a reference left out (zero_point, channel_bits, bias int32/float) means none is stored",
            "references": "[tensor, offset, count], offset and count in elements of that tensor",
        },
        "recipe": exp.recipe,
        "left_float": exp.left_float,
        "float_bias": bool(float_bias),
        "layers": layers_meta,
        "graph": exp.graph.to_list(),
        "sizes": {"tensor_file_bytes": len(data),
                  "weight_bytes": sum(_nbytes(e["weight"]["data"]) for e in layers_meta.values())},
    }
    tmp = folder / (MANIFEST_FILE + ".tmp")
    tmp.write_text(_dumps(manifest))
    os.replace(tmp, folder / MANIFEST_FILE)
    return folder


def _drop_none(d):
    if isinstance(d, dict):
        return {k: _drop_none(v) for k, v in d.items() if v is not None}
    return d


def _dumps(manifest: dict) -> str:
    """JSON with one line per top-level key, per layer and per graph node (readable, and compact)."""
    def one(v) -> str:
        return json.dumps(v, separators=(",", ":"))

    parts = []
    for k, v in manifest.items():
        if k == "layers":
            body = ",\n".join(f"  {json.dumps(n)}: {one(e)}" for n, e in v.items())
            parts.append(f" {json.dumps(k)}: {{\n{body}\n }}")
        elif k == "graph":
            body = ",\n".join(f"  {one(n)}" for n in v)
            parts.append(f" {json.dumps(k)}: [\n{body}\n ]")
        else:
            parts.append(f" {json.dumps(k)}: {json.dumps(v)}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def export(qmodel: nn.Module, path: str | os.PathLike, *, arch: str | None = None, input_shape=None,
           float_bias: bool = True) -> Path:
    """Write ``qmodel`` (from :func:`lowbit.quantize`, possibly fine-tuned) as a deployment folder.

    ``arch``: a zoo model name or any descriptive string (default: found by matching the zoo,
    else the class name; :func:`load` rebuilds zoo models by name and needs the float model
    otherwise). ``input_shape``: recorded in the manifest (e.g. ``[1, 1, 28, 28]``).
    Every layer's bias is stored as int32 in the accumulator's scale (what integer runtimes add)
    and, with ``float_bias=True`` (default), also as float32: :func:`load` then gives bit-identical
    outputs and the integer engine adds the bias exactly instead of rounded to the accumulator
    grid (half an accumulator unit is enough to move ~3% of W4A4 ResNet-20 predictions).
    ``float_bias=False`` writes the smallest file; the rebuilt model then uses
    ``bias_int32 * s_w * s_x``.
    """
    return write_export(build_export(qmodel, arch=arch, input_shape=input_shape), path, float_bias=float_bias)


# ----- reading ----------------------------------------------------------------------------
def read_manifest(path: str | os.PathLike) -> dict:
    folder = Path(path)
    mpath = folder / MANIFEST_FILE
    if not mpath.is_file():
        if (folder / "lowbit.json").is_file():
            raise ExportFileError(f"{folder} is a quantized-model checkpoint (lowbit.json), not a deployment export; "
                                  "load it with lowbit.load(folder)")
        raise ExportFileError(f"{folder}: no {MANIFEST_FILE}; not a folder written by lowbit.export")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ExportFileError(f"{mpath}: not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExportFileError(f"{mpath}: format {manifest.get('format') if isinstance(manifest, dict) else None!r} "
                              f"is not {FORMAT!r}")
    version = manifest.get("format_version")
    if version not in SUPPORTED_VERSIONS:
        raise ExportFileError(f"{mpath}: format version {version!r} is unknown to lowbit {_lowbit_version()} "
                              f"(it reads version(s) {list(SUPPORTED_VERSIONS)}); upgrade lowbit or re-export "
                              "the model")
    return manifest


def read_tensors(path: str | os.PathLike, manifest: dict) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    folder = Path(path)
    info = manifest.get("tensors") or {}
    tpath = folder / info.get("file", TENSOR_FILE)
    if not tpath.is_file():
        raise ExportFileError(f"{folder}: the tensor file {tpath.name} is missing")
    data = tpath.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != info.get("sha256"):
        raise ExportFileError(f"{tpath}: SHA-256 {digest[:16]}... does not match the manifest's "
                              f"{str(info.get('sha256'))[:16]}...: the file was modified, truncated or belongs to "
                              "another export; re-export the model")
    try:
        tensors = load(data)
    except (SafetensorError, ValueError) as exc:
        raise ExportFileError(f"{tpath}: not a valid safetensors file ({exc})") from exc
    for key, t in tensors.items():
        if key not in _ARENA_DTYPES or t.dtype != _ARENA_DTYPES[key]:
            raise ExportFileError(f"{tpath}: unexpected tensor {key!r} ({t.dtype})")
    return tensors


def _slice(tensors, ref: dict | None, what: str) -> torch.Tensor | None:
    if ref is None:
        return None
    try:
        key, off, n = ref[0], int(ref[1]), int(ref[2])
    except (TypeError, ValueError, IndexError, KeyError):
        raise ExportFileError(f"{what}: malformed tensor reference {ref!r}") from None
    t = tensors.get(key)
    if t is None or off < 0 or off + n > t.numel():
        raise ExportFileError(f"{what}: the manifest points outside the tensor {key!r}")
    return t[off:off + n]


def _read_grid(tensors, d: dict, where: str) -> GridData:
    shape = tuple(d["scale_shape"])
    scale = _slice(tensors, d["scale"], where).reshape(shape).clone()
    z = _slice(tensors, d.get("zero_point"), where)
    if z is None:
        zero = torch.zeros(shape)
    elif z.numel() == 1:
        zero = z.reshape(()).expand(shape).clone()
    else:
        zero = z.reshape(shape).clone()
    cb = _slice(tensors, d.get("channel_bits"), where)
    if cb is not None:
        from lowbit.quant.grid import channel_int_range
        cb = unpack_bits(cb, CHANNEL_BITS_WIDTH, tuple(shape[:1]))
        lo, hi = channel_int_range(cb, d["signed"], d["restricted"])
        qmin, qmax, bits = lo.to(torch.int64), hi.to(torch.int64), int(d["nominal_bits"])
    else:
        qmin, qmax, bits = int(d["qmin"]), int(d["qmax"]), int(d["bits"])
    return GridData(scale, zero, qmin, qmax, bits, cb, bool(d["signed"]), bool(d["restricted"]), d["granularity"],
                    int(d.get("axis", 0)), d.get("group_size"), d.get("round_mode", "half_even"), d.get("method", ""))


def read_export(path: str | os.PathLike) -> Exported:
    """Read and check an export folder (format, version, checksum) into an :class:`Exported`."""
    manifest = read_manifest(path)
    tensors = read_tensors(path, manifest)
    graph = Graph.from_list(manifest["graph"])
    layers: dict[str, LayerData] = {}
    try:
        for name, e in manifest["layers"].items():
            where = f"{path}: layer {name!r}"
            layer = LayerData(name, e["type"], tuple(e["weight_shape"]), dict(e.get("attrs") or {}))
            w = e["weight"]
            if w.get("float"):
                layer.weight_float = _slice(tensors, w["data"], where).reshape(layer.weight_shape).clone()
            else:
                g = _read_grid(tensors, w, where)
                raw = _slice(tensors, w["data"], where)
                if w["storage"] == "int8":
                    q = raw.to(torch.int64).reshape(layer.weight_shape)
                else:
                    widths = g.channel_bits if g.channel_bits is not None else g.bits
                    lo = g.qrange_tensors()[0]
                    q = unpack_bits(raw, widths, layer.weight_shape)
                    q = q + (lo.reshape([-1] + [1] * (q.dim() - 1)) if lo.dim() else lo)
                layer.weight_grid, layer.weight_codes = g, q
            if e.get("input"):
                layer.input_grid = _read_grid(tensors, e["input"], where)
            b = e.get("bias")
            if b:
                bi = _slice(tensors, b.get("int32"), where)
                bf = _slice(tensors, b.get("float"), where)
                layer.bias_int32 = bi.clone() if bi is not None else None
                if bf is not None:
                    layer.bias, layer.bias_exact = bf.clone(), True
                else:
                    layer.bias, layer.bias_exact = (layer.bias_int32.double() * layer.acc_scale()).float(), False
            if e.get("bn_folded"):
                layer.bn, layer.bn_folded_at = e["bn_folded"]["module"], e["bn_folded"]["at"]
            layers[name] = layer
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, ExportFileError):
            raise
        raise ExportFileError(f"{path}: the manifest is malformed ({type(exc).__name__}: {exc})") from exc
    missing = [n for n in graph.layers if n not in layers]
    if missing:
        raise ExportFileError(f"{path}: the graph uses layers the manifest does not describe: {missing}")
    return Exported(graph, layers, manifest.get("architecture") or {}, manifest.get("recipe"),
                    manifest.get("input_shape"), manifest.get("left_float") or {}, manifest)


# ----- rebuilding a torch model -------------------------------------------------------------
def load(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Rebuild the quantized model of an export folder, in eval mode.

    Zoo models are built by name; for other models pass the float architecture as ``model``
    (a copy is modified; yours is left alone). The rebuilt model has the exported batch norms
    replaced by ``Identity``, each quantized layer holds its exported integer codes and grids
    (:class:`~lowbit.deploy.fixed.FixedQuantizer`), float layers their float weights. Its
    structure is traced and compared with the exported graph first: a different architecture
    raises instead of computing something else. Outputs equal the exported model's bit for
    bit when the export holds float biases (``float_bias=True``, the default) and the
    batch norms were folded at quantization; otherwise they differ by float rounding (and the
    bias rounding, at most half an accumulator unit).
    """
    from lowbit.nn.modules import QUANT_MODULES
    from lowbit.prepare import _set_submodule

    exp = read_export(path)
    arch = exp.architecture
    if model is None:
        if not arch.get("zoo"):
            raise ExportFileError(f"{path}: the export is of {arch.get('name')!r}, not a zoo model; pass its float "
                                  "architecture: lowbit.load_export(path, model)")
        from lowbit.zoo import create_model
        model = create_model(arch["zoo"], **(arch.get("kwargs") or {}))
    else:
        model = copy.deepcopy(model)
    model.eval()
    for layer in exp.layers.values():
        if layer.bn:
            try:
                bn = model.get_submodule(layer.bn)
            except AttributeError:
                raise ExportFileError(f"{path}: the model has no module {layer.bn!r} (a batch norm folded into "
                                      f"{layer.name!r}); is it the exported architecture?") from None
            if not isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d, nn.Identity)):
                raise ExportFileError(f"{path}: {layer.bn!r} is a {type(bn).__name__}, the export folded a batch norm "
                                      "there")
            _set_submodule(model, layer.bn, nn.Identity())
    try:
        graph = trace_graph(model)
    except ExportError as exc:
        raise ExportFileError(f"{path}: the model passed to load cannot be the exported one: {exc}") from exc
    if graph.bn_folds or graph.to_list() != exp.graph.to_list():
        raise ExportFileError(f"{path}: the model's structure differs from the exported graph "
                              f"({_first_difference(graph, exp.graph)}); pass the architecture the model was "
                              "exported from")
    for name in exp.graph.layers:
        layer = exp.layers[name]
        m = model.get_submodule(name)
        if tuple(m.weight.shape) != layer.weight_shape:
            raise ExportFileError(f"{path}: layer {name!r} has weight shape {tuple(m.weight.shape)}, the export "
                                  f"{layer.weight_shape}")
        with torch.no_grad():
            m.weight.data = layer.dequantized_weight().to(m.weight.dtype).clone()
            if layer.bias is not None:
                m.bias = nn.Parameter(layer.bias.clone())
            elif m.bias is not None:
                raise ExportFileError(f"{path}: layer {name!r} has a bias the export does not")
        if layer.weight_grid is not None or layer.input_grid is not None:
            from lowbit.deploy.fixed import FixedQuantizer
            wq = FixedQuantizer(layer.weight_grid, "weight", layer.weight_codes, f"{name}.weight") \
                if layer.weight_grid is not None else None
            aq = FixedQuantizer(layer.input_grid, "activation", None, f"{name}.input") \
                if layer.input_grid is not None else None
            _set_submodule(model, name, QUANT_MODULES[type(m)].from_float(m, wq, aq))
    model.lowbit_export = exp.manifest
    model.lowbit_report = _report(exp)
    return model.eval()


def _report(exp: Exported):
    from lowbit.prepare import QuantReport
    from lowbit.recipe import Recipe, load_recipe

    try:
        recipe = load_recipe(exp.recipe) if exp.recipe else Recipe()
    except Exception:  # noqa: BLE001 - a recipe this lowbit cannot parse is informational only
        recipe = Recipe()
    report = QuantReport(recipe, left_float=dict(exp.left_float))
    report.quantized = {n: {} for n, layer in exp.layers.items()
                        if layer.weight_grid is not None or layer.input_grid is not None}
    report.folded = [(n, layer.bn) for n, layer in exp.layers.items() if layer.bn]
    return report


def _first_difference(a: Graph, b: Graph) -> str:
    if a.bn_folds:
        name = next(iter(a.bn_folds.values()))
        return f"the model has a batch norm {name!r} the export does not"
    for x, y in zip(a.to_list(), b.to_list()):
        if x != y:
            return f"model node {x} vs exported node {y}"
    return f"the model has {len(a.nodes)} operations, the export {len(b.nodes)}"


def fp32_checkpoint_bytes(model: nn.Module) -> int:
    """Size of ``model``'s state dict written as a safetensors checkpoint (what save_checkpoint writes)."""
    from safetensors.torch import save

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    return len(save(state))


def export_sizes(path: str | os.PathLike) -> dict:
    """Bytes of the tensor file, the manifest, and the packed weights of each layer."""
    folder = Path(path)
    manifest = read_manifest(folder)
    return {"tensor_file": (folder / TENSOR_FILE).stat().st_size, "manifest": (folder / MANIFEST_FILE).stat().st_size,
            "layers": {n: e["stored_bytes"] for n, e in manifest["layers"].items()},
            "weights": manifest["sizes"]["weight_bytes"]}


def expected_packed_bytes(layer: LayerData) -> int:
    """Bytes the weight codes of ``layer`` take: numel at int8, or the dense bit stream."""
    g = layer.weight_grid
    n = int(torch.tensor(layer.weight_shape).prod())
    if g.channel_bits is None and g.bits == 8 and int(g.qmin) >= -128 and int(g.qmax) <= 127:
        return n
    if g.channel_bits is not None:
        return packed_nbytes(g.channel_bits, n // layer.weight_shape[0])
    return packed_nbytes(g.bits, n)
