"""Reading an export folder back: integrity first, then every field checked before it is used.

:func:`read_export` is what the integer engine, the ONNX writer and :func:`lowbit.deploy.load` read.
It treats the folder as untrusted input:

1. ``manifest.json`` parses as JSON (no NaN/Infinity), names this format and a version this lowbit
   reads;
2. the tensor file is a plain file name inside the folder (no ``..``, no path, no absolute name), of
   the size the manifest says (checked before reading it), with the SHA-256 the manifest says;
3. the tensor file's header carries the digest of the canonical manifest
   (:func:`~lowbit.deploy.format.manifest_digest`): an edited manifest is refused here;
4. every field is checked before use: types, a known layer type and graph op
   (:meth:`~lowbit.deploy.graph.Graph.from_list`), bit widths in 1..16 (per-channel widths 0..16),
   ``qmin <= qmax`` inside what the width can hold, steps finite and non-zero, zero points finite,
   shapes whose element counts match the tensor slices actually present (so a declared shape can never
   make lowbit allocate more than the file holds), references inside their tensor, codes inside their
   grid.

Everything wrong raises :class:`~lowbit.deploy.errors.ExportFileError` naming the file and the field.
Steps 1-3 detect damage and edits; step 4 also stops a forger who recomputed the digests.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from lowbit.deploy.errors import ExportError, ExportFileError
from lowbit.deploy.format import (ARENA_DTYPES, CHANNEL_BITS_WIDTH, FORMAT, MANIFEST_DIGEST_KEY, MANIFEST_FILE,
                                  SUPPORTED_VERSIONS, Exported, manifest_digest)
from lowbit.deploy.graph import LAYER_OPS, Graph, check_attrs
from lowbit.deploy.layers import GridData, LayerData
from lowbit.deploy.pack import MAX_BITS, packed_nbytes, unpack_bits
from lowbit.files import is_file_record, loads_json, read_listed, safetensors_metadata
from lowbit.quant.grid import ROUND_MODES, channel_int_range, int_range
from lowbit.version import __version__

MAX_ZERO_POINT = 2.0 ** (MAX_BITS + 1)  # twice the widest grid: no grid's zero point lies beyond
MAX_DIM = 2**31 - 1


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of the export folder ``path``: valid JSON naming this format and a version this lowbit
    reads (its fields are checked by :func:`read_export`). Raises :class:`ExportFileError`."""
    folder = Path(path)
    mpath = folder / MANIFEST_FILE
    if not mpath.is_file():
        if (folder / "lowbit.json").is_file():
            raise ExportFileError(f"{folder} is a quantized-model checkpoint (lowbit.json), not a deployment export; "
                                  "load it with lowbit.load(folder)")
        raise ExportFileError(f"{folder}: no {MANIFEST_FILE}; not a folder written by lowbit.export")
    try:
        manifest = loads_json(mpath.read_bytes())
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ExportFileError(f"{mpath}: not valid JSON ({exc}); re-export the model") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExportFileError(f"{mpath}: format {manifest.get('format') if isinstance(manifest, dict) else None!r} "
                              f"is not {FORMAT!r}")
    version = manifest.get("format_version")
    if isinstance(version, bool) or version not in SUPPORTED_VERSIONS:
        raise ExportFileError(f"{mpath}: format version {version!r} is unknown to lowbit {__version__} "
                              f"(it reads version(s) {list(SUPPORTED_VERSIONS)}); upgrade lowbit or re-export "
                              "the model")
    return manifest


def _tensor_file_name(mpath: Path, info) -> str:
    if not isinstance(info, dict):
        raise ExportFileError(f"{mpath}: field tensors: an object with file, sha256 and bytes, got {info!r}")
    name = info.get("file")
    if not isinstance(name, str) or not name or name in (".", "..") or Path(name).name != name or \
            any(c in name for c in "/\\\0:") or os.path.isabs(name):
        raise ExportFileError(f"{mpath}: field tensors.file: {name!r} is not a plain file name inside the export "
                              "folder (no folders, '..' or absolute paths); re-export the model")
    if not is_file_record(info):
        raise ExportFileError(f"{mpath}: field tensors: sha256 (64 lowercase hex digits) and bytes (a size), got "
                              f"{info!r}")
    return name


def read_tensors(path: str | os.PathLike, manifest: dict) -> dict[str, torch.Tensor]:
    """The arenas of the export's tensor file, after the integrity checks of the module docstring (2, 3)."""
    folder = Path(path)
    mpath = folder / MANIFEST_FILE
    name = _tensor_file_name(mpath, manifest.get("tensors"))
    tpath = folder / name
    data = read_listed(tpath, manifest["tensors"], listed_in=MANIFEST_FILE, field="tensors", error=ExportFileError,
                       fix="re-export the model")
    try:
        sealed = safetensors_metadata(data).get(MANIFEST_DIGEST_KEY)
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError, UnicodeDecodeError, RecursionError, RuntimeError) as exc:
        raise ExportFileError(f"{tpath}: not a valid safetensors file ({exc})") from exc
    try:
        expected = manifest_digest(manifest)
    except ValueError as exc:
        raise ExportFileError(f"{mpath}: cannot be put in canonical form ({exc})") from exc
    if sealed != expected:
        raise ExportFileError(f"{mpath}: its content does not match the digest sealed into {name} at export "
                              f"({MANIFEST_DIGEST_KEY}): the manifest was edited (a bit width, range, grid, tensor "
                              "reference or graph node) or belongs to another export; re-export the model")
    for key, t in tensors.items():
        if key not in ARENA_DTYPES or t.dtype != ARENA_DTYPES[key] or t.dim() != 1:
            raise ExportFileError(f"{tpath}: unexpected tensor {key!r} ({t.dtype}, shape {list(t.shape)}); this "
                                  f"format's tensors are the 1-D arenas {sorted(ARENA_DTYPES)}")
    return tensors


# ----- field checks -------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class Fields:
    """Reads fields of one manifest, raising an :class:`ExportFileError` that names the file and the field."""

    def __init__(self, mpath: Path, tensors: dict[str, torch.Tensor]):
        self.mpath, self.tensors = mpath, tensors

    def error(self, field: str, problem: str) -> ExportFileError:
        return ExportFileError(f"{self.mpath}: field {field}: {problem}")

    def get(self, d: dict, key: str, field: str, kind, *, optional: bool = False):
        """``d[key]`` of ``kind`` (a type, or a tuple of allowed values); None when optional and absent.
        ``field`` names ``d`` ("" for the top level)."""
        v = d.get(key)
        if v is None and optional:
            return None
        where = f"{field}.{key}" if field else key
        if isinstance(kind, tuple):
            if isinstance(v, bool) != any(isinstance(k, bool) for k in kind) or v not in kind:
                raise self.error(where, f"one of {list(kind)}, got {v!r}")
        elif kind is int:
            if not _is_int(v):
                raise self.error(where, f"an integer, got {v!r}")
        elif not isinstance(v, kind):
            raise self.error(where, f"expected {kind.__name__}, got {v!r}")
        return v

    def int_in(self, d: dict, key: str, field: str, lo: int, hi: int) -> int:
        v = self.get(d, key, field, int)
        if not lo <= v <= hi:
            raise self.error(f"{field}.{key}", f"an integer from {lo} to {hi}, got {v}")
        return v

    def shape(self, v, field: str, ndims: tuple[int, ...]) -> tuple[int, ...]:
        if not isinstance(v, list) or len(v) not in ndims or not all(_is_int(x) and 1 <= x <= MAX_DIM for x in v):
            raise self.error(field, f"a list of {' or '.join(map(str, ndims))} positive integers, got {v!r}")
        return tuple(v)

    def ref(self, d: dict, key: str, field: str, arena: str, count: int, *, optional: bool = False):
        """The slice ``[arena, offset, count]`` names: ``arena`` as expected, ``count`` elements, inside the tensor."""
        ref = d.get(key)
        if ref is None and optional:
            return None
        where = f"{field}.{key}"
        if not isinstance(ref, list) or len(ref) != 3 or not isinstance(ref[0], str) or \
                not all(_is_int(x) and x >= 0 for x in ref[1:]):
            raise self.error(where, f"a tensor reference [tensor, offset, count], got {ref!r}")
        if ref[0] != arena:
            raise self.error(where, f"points into {ref[0]!r}, this field is stored in {arena!r}")
        if ref[2] != count:
            raise self.error(where, f"names {ref[2]} elements, the declared shape needs {count}")
        t = self.tensors.get(arena)
        if t is None or ref[1] + ref[2] > t.numel():
            have = 0 if t is None else t.numel()
            raise self.error(where, f"elements [{ref[1]}, {ref[1] + ref[2]}) lie outside the tensor {arena!r} "
                                    f"({have} elements)")
        return t[ref[1]:ref[1] + ref[2]]

    def finite(self, t: torch.Tensor, field: str, *, nonzero: bool = False, bound: float = math.inf) -> torch.Tensor:
        bad = ~torch.isfinite(t) | (t.abs() > bound)
        if nonzero:
            bad |= t == 0
        if bool(bad.any()):
            what = "finite and non-zero" if nonzero else "finite"
            raise self.error(field, f"holds {t[bad][0].item()!r}; every value must be {what}"
                             + (f" and within +-{bound:g}" if bound != math.inf else ""))
        return t


def _grid_channels(layer_type: str, shape: tuple[int, ...], attrs: dict, side: str) -> int:
    """Channels a per-channel grid of ``side`` has: output channels (weights), input channels (input), or KV
    heads (``kv``, a causal LM's cache, whose ``shape`` is ``(kv heads, head dim)``)."""
    if side in ("weight", "kv"):
        return shape[0]
    return shape[1] * (attrs.get("groups", 1) if layer_type == "conv" else 1)


def read_grid(f: Fields, d, field: str, side: str, layer_type: str, shape: tuple[int, ...], attrs: dict
               ) -> GridData:
    if not isinstance(d, dict):
        raise f.error(field, f"a grid object, got {d!r}")
    kinds = {"weight": ("tensor", "channel", "group"), "input": ("tensor", "channel", "token")}.get(
        side, ("tensor", "channel"))
    kind = f.get(d, "granularity", field, kinds)
    if kind == "token":
        return _read_token_grid(f, d, field)
    signed, restricted = f.get(d, "signed", field, bool), f.get(d, "restricted", field, bool)
    round_mode = f.get(d, "round_mode", field, ROUND_MODES)
    method = f.get(d, "method", field, str)
    channels = _grid_channels(layer_type, shape, attrs, side)
    axis, group_size = 0, None
    if kind == "tensor":
        scale_shape: tuple[int, ...] = ()
    elif kind == "channel":
        # weights: output channels; inputs: a conv's channel axis, a linear layer's features (prepare uses -1);
        # the KV cache: heads, axis 1 of (batch, kv heads, tokens, head dim)
        axis = f.get(d, "axis", field, (0,) if side == "weight" else (1,) if layer_type == "conv" or side == "kv"
                     else (-1, 1))
        scale_shape = (channels,)
    else:
        per_channel = math.prod(shape) // shape[0]
        group_size = f.int_in(d, "group_size", field, 1, per_channel)
        if per_channel % group_size:
            raise f.error(f"{field}.group_size", f"{group_size} does not divide the {per_channel} weights of a channel")
        scale_shape = (shape[0], per_channel // group_size)
    if d.get("scale_shape") != list(scale_shape):
        raise f.error(f"{field}.scale_shape", f"{list(scale_shape)} for {kind} steps of a {list(shape)} {layer_type} "
                                              f"weight, got {d.get('scale_shape')!r}")
    n = math.prod(scale_shape)
    scale = f.finite(f.ref(d, "scale", field, f"{side}.scale", n), f"{field}.scale", nonzero=True).reshape(scale_shape)
    zref = d.get("zero_point")
    shared = isinstance(zref, list) and len(zref) == 3 and zref[2] == 1  # one value for every channel
    zero = f.ref(d, "zero_point", field, f"{side}.zero_point", 1 if shared else n, optional=True)
    if zero is None:
        zero = torch.zeros(scale_shape)
    else:
        zero = f.finite(zero, f"{field}.zero_point", bound=MAX_ZERO_POINT).reshape(-1)
        zero = zero.reshape(()).expand(scale_shape) if zero.numel() == 1 else zero.reshape(scale_shape)
    if d.get("bits") == "per-channel":
        if kind != "channel":
            raise f.error(f"{field}.bits", "per-channel widths need channel granularity")
        bits = f.int_in(d, "nominal_bits", field, 1, MAX_BITS)
        packed = f.ref(d, "channel_bits", field, f"{side}.channel_bits", packed_nbytes(CHANNEL_BITS_WIDTH, channels))
        widths = unpack_bits(packed, CHANNEL_BITS_WIDTH, (channels,))
        if bool((widths > MAX_BITS).any()):
            raise f.error(f"{field}.channel_bits", f"holds a width of {int(widths.max())} bits; widths lie in "
                                                   f"0..{MAX_BITS}")
        lo, hi = channel_int_range(widths, signed, restricted)
        qmin, qmax, cb = lo.to(torch.int64), hi.to(torch.int64), widths
    else:
        bits = f.int_in(d, "bits", field, 1, MAX_BITS)
        qmin = f.int_in(d, "qmin", field, -(2 ** (bits - 1)), 2**bits - 1)
        qmax = f.int_in(d, "qmax", field, qmin, 2**bits - 1)
        if qmax - qmin > 2**bits - 1:
            raise f.error(f"{field}.qmax", f"the range [{qmin}, {qmax}] does not fit {bits} bits")
        if d.get("channel_bits") is not None:
            raise f.error(f"{field}.channel_bits", "present, but bits is not 'per-channel'")
        cb = None
    return GridData(scale.clone(), zero.clone(), qmin, qmax, bits, cb, signed, restricted, kind, axis, group_size,
                    round_mode, method)


def _read_token_grid(f: Fields, d: dict, field: str) -> GridData:
    """An input grid whose steps are computed per token at run time: widths and flags only."""
    if d.get("method") != "minmax":
        raise f.error(f"{field}.method", f"per-token steps are min-max steps, got {d.get('method')!r}")
    signed, restricted = f.get(d, "signed", field, bool), f.get(d, "restricted", field, bool)
    bits = f.int_in(d, "bits", field, 1, MAX_BITS)
    qmin, qmax = int_range(bits, signed, restricted)
    if (d.get("qmin"), d.get("qmax")) != (qmin, qmax):
        raise f.error(f"{field}.qmin", f"[{qmin}, {qmax}] for {bits}-bit codes, got [{d.get('qmin')}, {d.get('qmax')}]")
    return GridData(torch.ones(()), torch.zeros(()), qmin, qmax, bits, None, signed, restricted, "token", -1, None,
                    f.get(d, "round_mode", field, ROUND_MODES), "minmax", f.get(d, "symmetric", field, bool))


def read_weight(f: Fields, w, field: str, layer: LayerData) -> None:
    shape, numel = layer.weight_shape, math.prod(layer.weight_shape)
    if not isinstance(w, dict):
        raise f.error(field, f"a weight object, got {w!r}")
    if w.get("float") is not None:
        f.get(w, "float", field, (True,))
        data = f.ref(w, "data", field, "float.weight", numel)
        layer.weight_float = f.finite(data, f"{field}.data").reshape(shape).clone()
        return
    g = read_grid(f, w, field, "weight", layer.kind, shape, layer.attrs)
    lo, hi = (t.reshape([-1] + [1] * (len(shape) - 1)) if t.dim() else t for t in g.qrange_tensors())
    storage = f.get(w, "storage", field, ("int8", "packed"))
    if storage == "int8":
        if g.channel_bits is not None or g.bits != 8 or int(g.qmin) < -128 or int(g.qmax) > 127:
            raise f.error(f"{field}.storage", "int8 storage holds uniform 8-bit codes in [-128, 127] only")
        q = f.ref(w, "data", field, "weight.int8", numel).to(torch.int64).reshape(shape)
    else:
        if g.channel_bits is not None:
            if not bool(g.channel_bits.any()):
                raise f.error(f"{field}.channel_bits", "every channel has 0 bits: the layer stores no weight")
            count = packed_nbytes(g.channel_bits, numel // shape[0])
        else:
            count = packed_nbytes(g.bits, numel)
        raw = f.ref(w, "data", field, "weight.packed", count)
        q = unpack_bits(raw, g.channel_bits if g.channel_bits is not None else g.bits, shape) + lo
    if bool(((q < lo) | (q > hi)).any()):
        raise f.error(f"{field}.data", f"holds codes outside the grid's range [{g.qmin}, {g.qmax}]")
    layer.weight_grid, layer.weight_codes = g, q


def read_bias(f: Fields, b, field: str, layer: LayerData) -> None:
    if not isinstance(b, dict) or not b or set(b) - {"int32", "float"}:
        raise f.error(field, f"an object with int32 and/or float references, got {b!r}")
    channels = layer.out_channels
    bi = f.ref(b, "int32", field, "bias.int32", channels, optional=True)
    bf = f.ref(b, "float", field, "bias.float", channels, optional=True)
    if bi is None and bf is None:
        raise f.error(field, "names neither an int32 nor a float bias")
    if bi is not None and layer.acc_scale() is None:
        raise f.error(f"{field}.int32", "an int32 bias needs quantized weights and input with per-tensor or "
                                        "per-channel weight steps (the accumulator's scale)")
    layer.bias_int32 = bi.clone() if bi is not None else None
    if bf is not None:
        layer.bias, layer.bias_exact = f.finite(bf, f"{field}.float").clone(), True
    else:
        layer.bias, layer.bias_exact = (layer.bias_int32.double() * layer.acc_scale()).float(), False


def read_layer(f: Fields, name: str, e, node_attrs: dict, kinds: tuple[str, ...] = LAYER_OPS) -> LayerData:
    """One ``layers`` entry, every field checked; ``node_attrs``: what its graph node says (``{}`` for a causal
    LM's layers, which have no graph); ``kinds``: the layer types this export may hold."""
    field = f"layers[{name!r}]"
    if not isinstance(e, dict):
        raise f.error(field, f"a layer object, got {e!r}")
    kind = f.get(e, "type", field, kinds)
    attrs = e.get("attrs", {})
    try:
        check_attrs(kind, attrs, f"{field}.attrs")
    except ExportError as exc:
        raise ExportFileError(f"{f.mpath}: field {exc}") from None
    if attrs != node_attrs:
        raise f.error(f"{field}.attrs", f"{attrs!r} differ from its graph node's {node_attrs!r}")
    ndims = (attrs["dims"] + 2,) if kind == "conv" else (2,)
    layer = LayerData(name, kind, f.shape(e.get("weight_shape"), f"{field}.weight_shape", ndims), dict(attrs))
    read_weight(f, e.get("weight"), f"{field}.weight", layer)
    if e.get("input") is not None:
        if kind == "embedding":
            raise f.error(f"{field}.input", "an embedding's inputs are token ids: it has no input grid")
        layer.input_grid = read_grid(f, e["input"], f"{field}.input", "input", kind, layer.weight_shape, attrs)
    if f.get(e, "quantized", field, bool) != layer.quantized:
        raise f.error(f"{field}.quantized", f"says {e['quantized']}, its weight and input grids say {layer.quantized}")
    if e.get("bias") is not None:
        read_bias(f, e["bias"], f"{field}.bias", layer)
    bn = e.get("bn_folded")
    if bn is not None:
        if not isinstance(bn, dict) or set(bn) != {"module", "at"}:
            raise f.error(f"{field}.bn_folded", f"an object with module and at, got {bn!r}")
        layer.bn = f.get(bn, "module", f"{field}.bn_folded", str)
        layer.bn_folded_at = f.get(bn, "at", f"{field}.bn_folded", ("quantize", "export"))
    return layer


def _read_architecture(f: Fields, arch) -> dict:
    if not isinstance(arch, dict):
        raise f.error("architecture", f"an object, got {arch!r}")
    if arch.get("zoo") is None:
        f.get(arch, "name", "architecture", str)
        return arch
    f.get(arch, "zoo", "architecture", str)
    kwargs = f.get(arch, "kwargs", "architecture", dict)
    if not all(isinstance(k, str) and _is_int(v) for k, v in kwargs.items()):
        raise f.error("architecture.kwargs", f"constructor arguments are named integers, got {kwargs!r}")
    return arch


def read_metadata(f: Fields, manifest: dict) -> tuple[dict, list | None, dict | None, dict]:
    arch = _read_architecture(f, manifest.get("architecture"))
    shape = manifest.get("input_shape")
    if shape is not None:
        shape = list(f.shape(shape, "input_shape", tuple(range(1, 9))))
    recipe = f.get(manifest, "recipe", "", dict, optional=True)
    left_float = manifest.get("left_float") or {}
    if not isinstance(left_float, dict) or not all(isinstance(v, str) for v in left_float.values()):
        raise f.error("left_float", f"layer name -> reason, got {left_float!r}")
    return arch, shape, recipe, left_float


def decode_export(path: str | os.PathLike, manifest: dict, tensors: dict[str, torch.Tensor]) -> Exported:
    """The :class:`Exported` of a manifest and its arenas, every field checked (module docstring, step 4)."""
    f = Fields(Path(path) / MANIFEST_FILE, tensors)
    try:
        graph = Graph.from_list(manifest.get("graph"))
    except ExportError as exc:
        raise ExportFileError(f"{f.mpath}: field {exc}") from None
    entries = f.get(manifest, "layers", "", dict)
    node_of = {n.layer: n for n in graph.nodes if n.layer is not None}
    if set(entries) != set(node_of):
        raise f.error("layers", f"describes {sorted(entries)}, the graph uses {sorted(node_of)}")
    layers = {}
    for name in graph.layers:
        layers[name] = read_layer(f, name, entries[name], node_of[name].attrs)
        if layers[name].input_grid is not None and layers[name].input_grid.kind == "token":
            raise f.error(f"layers[{name!r}].input.granularity", "'token': per-token steps are computed at run time, "
                                                                 "which the integer engine does not do")
        if layers[name].kind != node_of[name].op:
            raise f.error(f"layers[{name!r}].type", f"{layers[name].kind!r}, its graph node runs {node_of[name].op!r}")
    arch, shape, recipe, left_float = read_metadata(f, manifest)
    return Exported(graph, layers, arch, recipe, shape, left_float, manifest)


def read_export(path: str | os.PathLike) -> Exported:
    """Read and check an export folder (see the module docstring) into an :class:`Exported`.

    Raises :class:`~lowbit.deploy.errors.ExportFileError` (a ``CheckpointError``) naming the file and the
    field for anything missing, damaged, edited or out of range.
    """
    manifest = read_manifest(path)
    return decode_export(path, manifest, read_tensors(path, manifest))

