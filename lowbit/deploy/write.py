"""Writing an export folder: the arenas of ``model.safetensors``, the manifest, and the seal binding them.

:func:`export` is ``lowbit.export``. :func:`write_export` lays an :class:`~lowbit.deploy.format.Exported`
out as tensor references into the arenas of :mod:`lowbit.deploy.format`; :func:`write_files` is the
generic last step any writer of the format uses (it computes the digests that bind the two files and
publishes both atomically), so another model family can build its own per-layer entries and arenas
and hand them over.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from lowbit.checkpoint import write_safetensors
from lowbit.deploy.build import build_export
from lowbit.deploy.errors import ExportError
from lowbit.deploy.format import (ARENA_DTYPES, CHANNEL_BITS_WIDTH, FORMAT, FORMAT_VERSION, MANIFEST_DIGEST_KEY,
                                  MANIFEST_FILE, TENSOR_FILE, Exported, arena_element_bytes, manifest_digest)
from lowbit.deploy.layers import GridData, LayerData
from lowbit.deploy.pack import pack_bits
from lowbit.files import temporary_path, write_text_atomic
from lowbit.version import __version__

CONVENTIONS = {
    "weight_codes": "q = clamp(round(w / s + z), qmin, qmax); w_hat = (q - z) * s",
    "packing": "offset codes q - qmin, little-endian bit stream, channel by channel, per layer byte-aligned",
    "bias_int32": "round_half_even(b / (s_w * max(s_x))) in float64: the accumulator's scale",
    "absent": "a reference left out (zero_point, channel_bits, bias int32/float) means none is stored",
    "references": "[tensor, offset, count], offset and count in elements of that tensor",
    "integrity": f"tensors.sha256 covers {TENSOR_FILE}; its header's {MANIFEST_DIGEST_KEY} covers this manifest "
                 "(sorted compact JSON without tensors.sha256 and tensors.bytes)",
}


class Arena:
    """The flat tensors of ``model.safetensors`` as they fill up; :meth:`add` returns a tensor reference."""

    def __init__(self):
        self.parts: dict[str, list[torch.Tensor]] = {k: [] for k in ARENA_DTYPES}
        self.count = {k: 0 for k in ARENA_DTYPES}

    def add(self, key: str, t: torch.Tensor) -> list:
        flat = t.detach().reshape(-1).to(ARENA_DTYPES[key]).cpu()
        ref = [key, self.count[key], int(flat.numel())]
        self.parts[key].append(flat)
        self.count[key] += int(flat.numel())
        return ref

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: torch.cat(v).contiguous() for k, v in self.parts.items() if v}


def reference_bytes(ref: list | None) -> int:
    """Bytes of the slice a tensor reference names (0 for none)."""
    return 0 if ref is None else ref[2] * arena_element_bytes(ref[0])


def write_grid(arena: Arena, g: GridData, side: str) -> dict:
    d = g.describe()
    if g.kind == "token":
        return d  # steps computed from each input at run time: nothing to store
    d["scale_shape"] = list(g.scale.shape)
    d["scale"] = arena.add(f"{side}.scale", g.scale)
    z = g.zero_point
    if z.numel() > 1 and bool((z == z.reshape(-1)[0]).all()):
        z = z.reshape(-1)[:1]  # one value for every channel (SAWB's (2^b - 1) / 2): stored once, broadcast
    d["zero_point"] = arena.add(f"{side}.zero_point", z) if bool((z != 0).any()) else None
    d["channel_bits"] = arena.add(f"{side}.channel_bits", pack_bits(g.channel_bits, CHANNEL_BITS_WIDTH)) \
        if g.channel_bits is not None else None
    return d


def is_int8_storage(g: GridData) -> bool:
    """Whether a weight grid is stored as plain ``int8`` codes (uniform 8 bits inside [-128, 127])."""
    return g.channel_bits is None and g.bits == 8 and int(g.qmin) >= -128 and int(g.qmax) <= 127


def weight_storage(layer: LayerData) -> tuple[str, torch.Tensor]:
    """``("int8", codes)`` or ``("packed", bytes)`` for a quantized weight."""
    g, q = layer.weight_grid, layer.weight_codes
    if is_int8_storage(g):
        return "int8", q
    lo, hi = g.qrange_tensors()
    widths = g.channel_bits if g.channel_bits is not None else g.bits
    if g.channel_bits is not None and not bool(g.channel_bits.any()):
        raise ExportError(f"layer {layer.name!r}: every output channel has 0 bits, so its weight stores nothing; "
                          "give the layer a width of at least 1 bit on average")
    span_ok = bool(((hi - lo) < (torch.as_tensor(2, dtype=torch.int64) ** torch.as_tensor(widths))).all())
    if not span_ok:
        raise ExportError(f"layer {layer.name!r}: its weight range [{g.qmin}, {g.qmax}] does not fit {widths} bits")
    u = q - (lo.reshape([-1] + [1] * (q.dim() - 1)) if lo.dim() else lo)
    return "packed", pack_bits(u, widths)


def layer_entry(arena: Arena, layer: LayerData, float_bias: bool) -> dict:
    entry: dict = {"type": layer.kind, "weight_shape": list(layer.weight_shape), "attrs": layer.attrs,
                   "quantized": layer.quantized}
    if layer.weight_grid is not None:
        w = write_grid(arena, layer.weight_grid, "weight")
        storage, data = weight_storage(layer)
        w["storage"] = storage
        w["data"] = arena.add("weight.int8" if storage == "int8" else "weight.packed", data)
        entry["weight"] = w
    else:
        entry["weight"] = {"float": True, "data": arena.add("float.weight", layer.weight_float)}
    entry["input"] = write_grid(arena, layer.input_grid, "input") if layer.input_grid is not None else None
    if layer.bias is not None:
        keep_float = float_bias or layer.bias_int32 is None
        entry["bias"] = {
            "int32": arena.add("bias.int32", layer.bias_int32) if layer.bias_int32 is not None else None,
            "float": arena.add("bias.float", layer.bias) if keep_float else None,
        }
    else:
        entry["bias"] = None
    entry["bn_folded"] = {"module": layer.bn, "at": layer.bn_folded_at} if layer.bn else None
    refs = [entry["weight"].get(k) for k in ("data", "scale", "zero_point", "channel_bits")]
    if entry["input"]:
        refs += [entry["input"].get(k) for k in ("scale", "zero_point", "channel_bits")]
    if entry["bias"]:
        refs += [entry["bias"]["int32"], entry["bias"]["float"]]
    entry["stored_bytes"] = sum(reference_bytes(r) for r in refs)
    return _drop_none(entry)


def write_export(exp: Exported, path: str | os.PathLike, *, float_bias: bool = True) -> Path:
    """Write ``exp`` to the folder ``path`` (created); returns the folder. See :func:`export`."""
    arena = Arena()
    layers_meta = {name: layer_entry(arena, exp.layers[name], float_bias) for name in exp.graph.layers}
    manifest = manifest_of(exp, layers_meta, float_bias, input_shape=exp.input_shape, graph=exp.graph.to_list(),
                           sizes={"weight_bytes": weight_bytes(layers_meta)})
    return write_files(path, arena.tensors(), manifest)


def manifest_of(exp, layers_meta: dict, float_bias: bool, **fields) -> dict:
    """The manifest fields every export kind writes (format, versions, architecture, recipe, layers), then
    ``fields``: what this kind adds (a CNN's graph and input shape, a language model's config and cache)."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "lowbit_version": __version__,
            "architecture": exp.architecture, "tensors": {"file": TENSOR_FILE}, "conventions": CONVENTIONS,
            "recipe": exp.recipe, "left_float": exp.left_float, "float_bias": bool(float_bias),
            "layers": layers_meta, **fields}


def weight_bytes(layers_meta: dict) -> int:
    """Bytes of the integer weights the manifest's layers reference."""
    return sum(reference_bytes(e["weight"]["data"]) for e in layers_meta.values())


def write_files(path: str | os.PathLike, tensors: dict[str, torch.Tensor], manifest: dict) -> Path:
    """Seal and publish an export: ``tensors`` (flat arenas) to ``model.safetensors``, ``manifest`` to
    ``manifest.json``, in the folder ``path`` (created).

    The tensor file's metadata gets the digest of the canonical ``manifest``
    (:func:`~lowbit.deploy.format.manifest_digest`), then ``manifest["tensors"]`` gets the tensor
    file's SHA-256 and size (``manifest`` is updated in place). Each file is written to a temporary
    name and moved into place, the tensor file first.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensor_path = folder / manifest.get("tensors", {}).get("file", TENSOR_FILE)
    manifest["tensors"] = {"file": tensor_path.name}
    metadata = {"format": FORMAT, "format_version": str(manifest["format_version"]),
                MANIFEST_DIGEST_KEY: manifest_digest(manifest)}
    tmp = temporary_path(tensor_path)
    write_safetensors(tensors, tmp, metadata=metadata)
    data = tmp.read_bytes()
    os.replace(tmp, tensor_path)
    manifest["tensors"].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    write_text_atomic(folder / MANIFEST_FILE, _dumps(manifest))
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

    ``arch``: a name for the architecture. Zoo models need none: they carry their architecture
    record (``lowbit_architecture``), which the manifest stores, and :func:`lowbit.load_export`
    rebuilds them by it; any other model is recorded by ``arch`` (default: its class name) and
    is loaded with its float architecture passed in. ``input_shape``: recorded in the manifest
    (e.g. ``[1, 1, 28, 28]``).

    Every layer's bias is stored as int32 in the accumulator's scale (what integer runtimes add)
    and, with ``float_bias=True`` (default), also as float32: :func:`lowbit.load_export` then gives
    bit-identical outputs and the integer engine adds the bias exactly instead of rounded to the
    accumulator grid (half an accumulator unit is enough to move ~3% of W4A4 ResNet-20
    predictions). ``float_bias=False`` writes the smallest file; the rebuilt model then uses
    ``bias_int32 * s_w * s_x``.

    Raises :class:`~lowbit.deploy.errors.ExportError` naming the module and op the format cannot
    hold.
    """
    return write_export(build_export(qmodel, arch=arch, input_shape=input_shape), path, float_bias=float_bias)
