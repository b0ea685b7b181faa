"""The deployment format: what ``model.safetensors`` and ``manifest.json`` hold, and what binds them.

``lowbit.export(qmodel, "out/")`` writes two files (docs/DEPLOYMENT.md has the full table).

``model.safetensors`` — a few flat tensors ("arenas"), one per kind of data (:data:`ARENA_DTYPES`),
so the file carries almost no header overhead. Each layer's slice is named in the manifest as a
*tensor reference* ``[arena, offset, count]`` (offset and count in elements of that arena):

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
    bias.float           F32  float biases (by default every layer's; see lowbit.deploy.write)
    float.weight         F32  weights of layers left in float (causal LMs: also every other float tensor,
                              norms and the like)
    kv.scale             F32  causal LMs: KV-cache steps (keys and values, per KV head or per tensor)
    kv.zero_point        F32  causal LMs: KV-cache zero points, only where non-zero

``manifest.json`` — format name and version, lowbit version, the architecture record (a zoo
model and its constructor arguments, or a name), the recipe, per layer its type, shape, weight
and input grids (method, bits or per-channel widths, range, granularity, round mode), bias
storage and any batch norm folded into it, which layers stay float and why, the graph of
operations (:mod:`lowbit.deploy.graph`) and sizes. The per-layer entries and the tensor
references are generic: a new kind of layer adds entries that point into the same arenas.

Integrity: both files are covered, and each names the other. The safetensors header's metadata
holds ``manifest_sha256``, the SHA-256 of the *canonical manifest* (:func:`manifest_digest`: the
manifest as sorted, compact JSON, without the tensor file's own digest and size); the manifest's
``tensors`` entry holds the SHA-256 and byte count of the whole tensor file, header included. Editing
any manifest field (``bits``, ``qmin``, ``signed``, a tensor reference, the graph, ...) breaks the
first; editing, truncating or swapping the tensor file breaks the second. These digests detect damage
and edits, not forgery: anyone can recompute them, so the reader also validates every field it uses
(:mod:`lowbit.deploy.read`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lowbit.deploy.graph import Graph
from lowbit.deploy.layers import LayerData
from lowbit.files import canonical_sha256

FORMAT = "lowbit-export"
FORMAT_VERSION = 2  # 2: the manifest is bound to the tensor file (manifest_sha256 in its header)
SUPPORTED_VERSIONS = (2,)
TENSOR_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
MANIFEST_DIGEST_KEY = "manifest_sha256"  # in the tensor file's safetensors metadata
CHANNEL_BITS_WIDTH = 5  # per-channel widths 0..16, bit-packed

ARENA_DTYPES = {
    "weight.int8": torch.int8, "weight.packed": torch.uint8, "weight.channel_bits": torch.uint8,
    "weight.scale": torch.float32, "weight.zero_point": torch.float32,
    "input.scale": torch.float32, "input.zero_point": torch.float32, "input.channel_bits": torch.uint8,
    "bias.int32": torch.int32, "bias.float": torch.float32, "float.weight": torch.float32,
    "kv.scale": torch.float32, "kv.zero_point": torch.float32,
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


def manifest_digest(manifest: dict) -> str:
    """SHA-256 (hex) of the canonical manifest: sorted keys, compact separators, ASCII, and the
    ``tensors`` entry without ``sha256`` and ``bytes`` (which describe the tensor file that stores this
    digest). Raises ``ValueError`` for a manifest JSON cannot encode (NaN, infinity)."""
    body = dict(manifest)
    tensors = body.get("tensors")
    if isinstance(tensors, dict):
        body["tensors"] = {k: v for k, v in tensors.items() if k not in ("sha256", "bytes")}
    return canonical_sha256(body)


def arena_element_bytes(arena: str) -> int:
    """Bytes per element of the arena ``arena``."""
    return torch.empty(0, dtype=ARENA_DTYPES[arena]).element_size()
