"""Hugging Face transformers (causal language models and encoders) in the deployment format.

    qmodel = lowbit.quantize(hf_model, "silq-w4a8kv8", calib_data=windows)
    lowbit.export(qmodel, "out/")                           # packed weights, activation and KV-cache steps
    qmodel2 = lowbit.load_export("out/", model=hf_float)    # the quantized model again (hf_float is not changed)

An encoder (BERT-style, :func:`lowbit.llm.encoder.is_encoder`) goes the same way, without a cache.

A transformer's forward is not a graph lowbit's engine runs (attention, norms, rotary embeddings), so
this export holds no graph: it holds what the quantizers hold, in the same two sealed files, arenas
and per-layer entries as a CNN export (:mod:`lowbit.deploy.format`, :mod:`lowbit.deploy.write`), and
the reader applies the same checks (:mod:`lowbit.deploy.read`). Manifest fields beyond the common ones:

    model_kind     "causal-lm" or "encoder" (a CNN export has none)
    architecture   {"zoo": null, "name": "<module>.<class>"} of the model, e.g. ...LlamaForCausalLM
    config         the transformers config (``config.to_dict()``), checked against the model handed to
                   load on the fields that change the computation (:data:`CONFIG_KEYS`)
    layers         every Linear and Embedding the quantizers touch, entries as in a CNN export (type
                   ``linear`` or ``embedding``): the weight grid (per-channel steps) and its codes, 8-bit
                   as int8, every other width bit-packed (4-bit: two per byte, low nibble first), the
                   input grid (the activation step), the bias; Linear layers left float hold float weights
    kv_cache       per attention block: its family, the cache's ``shape`` (kv heads, head dim) and the key
                   and value grids (steps per KV head in ``kv.scale``)
    sink_prefix    (a model quantized with ``kv_cache.sink_prefix``) its ``tokens`` and, per attention block
                   in order, the float ``keys`` and ``values`` ``{"shape": [1, kv heads, tokens, head dim],
                   "data"}`` the cache starts with (:mod:`lowbit.llm.sink_prefix`)
    float_tensors  every other tensor of the state dict (norm weights ...): ``{name: {"shape", "data"}}``

Loading rebuilds the quantized model from a copy of the float architecture handed in: each quantized
Linear/Embedding holds its exported codes and grids (:class:`~lowbit.deploy.fixed.FixedQuantizer`),
each attention block quantizes its cache with the exported steps (:mod:`lowbit.llm.kv_cache`), and
every float tensor is the exported one, so the handed model's own weights do not matter (a
freshly initialised model of the same config will do). The rebuilt model runs the very fake-quant
arithmetic of the exported one: ``(q - z) * s`` for weights from the same integer codes,
``fake_quant`` with the same steps for activations and the cache, so its logits equal the exported
model's **bit for bit** (tests/test_llm_export.py checks ``torch.equal``).
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lowbit.deploy.errors import ExportError, ExportFileError
from lowbit.deploy.fixed import FixedQuantizer
from lowbit.deploy.format import MANIFEST_FILE
from lowbit.deploy.layers import GridData, LayerData, grid_from_quantizer, layer_from_module, set_int32_bias
from lowbit.deploy.packed import check_plain_tables, packed_layers
from lowbit.deploy.read import Fields, read_grid, read_layer, read_manifest, read_metadata, read_tensors
from lowbit.deploy.rebuild import report_of
from lowbit.deploy.write import Arena, layer_entry, manifest_of, reference_bytes, weight_bytes, write_files, write_grid
from lowbit.errors import RecipeError
from lowbit.llm.encoder import is_encoder
from lowbit.llm.families import FAMILIES, check_attention, family_of
from lowbit.llm.kv_cache import is_kv_quantized, kv_quant_class
from lowbit.llm.objective import is_causal_lm
from lowbit.llm.sink_prefix import SinkPrefix, has_sink_prefix, install_sink_prefix
from lowbit.nn.modules import QuantLinear, QuantMixin, quant_embedding_class
from lowbit.quant.base import Quantizer
from lowbit.recipe import check_sink_prefix

CAUSAL_LM, ENCODER = "causal-lm", "encoder"
SINK = "lowbit_sink_prefix"  # the child holding a sink prefix; exported in its own manifest field
LAYER_KINDS = ("linear", "embedding")
SUPPORTED = ("the weights and inputs of Linear layers, the weights of Embedding tables, and the keys and values "
             f"of the KV cache of the attention families {', '.join(FAMILIES)}")
# config fields that change what the model computes beyond the tensor shapes the reader checks anyway
CONFIG_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps",
               "rope_theta", "rope_parameters", "rope_scaling", "tie_word_embeddings", "sliding_window",
               "attention_bias", "mlp_bias", "query_pre_attn_scalar", "final_logit_softcapping",
               "attn_logit_softcapping", "layer_norm_eps", "type_vocab_size", "position_embedding_type")


@dataclass
class KVGrids:
    """One attention block's cache grids."""

    family: str
    shape: tuple[int, int]  # (kv heads, head dim)
    key: GridData
    value: GridData


@dataclass
class ExportedTransformer:
    """A transformer export in memory (what the files hold); ``kind``: :data:`CAUSAL_LM` or :data:`ENCODER`."""

    layers: dict[str, LayerData]
    kv_cache: dict[str, KVGrids]
    float_tensors: dict[str, torch.Tensor]
    architecture: dict
    config: dict
    recipe: dict | None = None
    left_float: dict[str, str] = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)  # as read from disk (empty for a fresh build)
    sink_prefix: SinkPrefix | None = None
    kind: str = CAUSAL_LM


def kind_of(model: nn.Module) -> str | None:
    """:data:`CAUSAL_LM` or :data:`ENCODER` for a Hugging Face model of either kind, else None."""
    return CAUSAL_LM if is_causal_lm(model) else ENCODER if is_encoder(model) else None


def _unsupported(name: str, what: str) -> ExportError:
    return ExportError(f"module {name!r}: {what}; the transformer export holds {SUPPORTED}")


def _layer_tensors(layer_names) -> set[str]:
    """State-dict keys of the quantized layers' own weights and biases (stored as grids, not float tensors)."""
    return {f"{n}.{p}" for n in layer_names for p in ("weight", "bias")}


def _kv_shape(model: nn.Module, attention: nn.Module) -> tuple[int, int]:
    config = model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(attention, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(heads), int(head_dim)


@torch.no_grad()
def build_transformer(qmodel: nn.Module) -> ExportedTransformer:
    """Read ``qmodel``'s integer codes, grids and float tensors (the model is put back in its mode).

    Raises :class:`~lowbit.deploy.errors.ExportError` for a model that is neither a Hugging Face causal LM nor an
    encoder, one with nothing quantized, and naming the module for any quantizer the format cannot hold
    (:data:`SUPPORTED`): a query or attention-probability quantizer, a disabled half of a KV pair.
    """
    kind = kind_of(qmodel)
    if kind is None:
        raise ExportError(f"{type(qmodel).__name__} is neither a Hugging Face causal language model nor an encoder")
    was_training = qmodel.training
    qmodel.eval()  # eval re-derives dynamic weight grids from the current weights, as evaluation uses
    try:
        layers: dict[str, LayerData] = {}
        kv: dict[str, KVGrids] = {}
        held: set[int] = set()  # the quantizers the export accounts for
        for name, m in qmodel.named_modules():
            if isinstance(m, QuantMixin):
                if not isinstance(m, (nn.Linear, nn.Embedding)):
                    raise _unsupported(name, f"a quantized {type(m).__name__}")
                layers[name] = layer_from_module(name, m)
                set_int32_bias(layers[name])
                held |= {id(q) for q in (m.weight_quantizer, m.input_quantizer) if q is not None}
            elif is_kv_quantized(m):
                on = (m.key_quantizer.enabled, m.value_quantizer.enabled)
                if on[0] != on[1]:
                    raise _unsupported(name, "quantizes only one of its keys and values")
                held |= {id(m.key_quantizer), id(m.value_quantizer)}
                if on[0]:
                    kv[name] = KVGrids(family_of_class(m), _kv_shape(qmodel, m),
                                       grid_from_quantizer(m.key_quantizer, f"{name} keys"),
                                       grid_from_quantizer(m.value_quantizer, f"{name} values"))
        for name, m in qmodel.named_modules():
            if isinstance(m, Quantizer) and id(m) not in held:
                raise _unsupported(name, f"a {m.method} quantizer outside a Linear, Embedding or KV cache")
        if not any(layer.weight_grid is not None or layer.input_grid is not None for layer in layers.values()) \
                and not kv:
            raise ExportError(f"{type(qmodel).__name__} has nothing quantized; quantize it first: "
                              "lowbit.quantize(model, recipe, calib_data=...)")
        quantizer_names = [n for n, m in qmodel.named_modules() if isinstance(m, Quantizer)]
        in_layers = _layer_tensors(layers)
        float_tensors = {}
        for key, t in qmodel.state_dict().items():
            if key in in_layers or any(key.startswith(q + ".") for q in quantizer_names + [SINK]):
                continue
            if not t.is_floating_point():
                raise _unsupported(key.rpartition(".")[0], f"holds the non-float tensor {key!r} ({t.dtype})")
            float_tensors[key] = t.detach().float().cpu().clone()
    finally:
        qmodel.train(was_training)
    report = getattr(qmodel, "lowbit_report", None)
    left_float = dict(report.left_float) if report is not None else {}  # their weights are float_tensors
    left_float.update({n: "weights and input float" for n, layer in layers.items()
                       if layer.weight_grid is None and layer.input_grid is None and n not in left_float})
    config = json.loads(qmodel.config.to_json_string(use_diff=False))
    prefixed = has_sink_prefix(qmodel)
    cls = type(qmodel)._float_class if prefixed else type(qmodel)
    arch = {"zoo": None, "name": f"{cls.__module__}.{cls.__qualname__}"}
    return ExportedTransformer(layers, kv, float_tensors, arch, config,
                               report.recipe.to_dict() if report is not None else None, left_float,
                               sink_prefix=copy.deepcopy(qmodel.lowbit_sink_prefix).cpu().float() if prefixed
                               else None, kind=kind)


def family_of_class(attention: nn.Module) -> str:
    """The family of a cache-quantizing attention block (that of the float class it was made from)."""
    return family_of(attention.to_float())


def write_transformer(exp: ExportedTransformer, path: str | os.PathLike, *, float_bias: bool = True) -> Path:
    """Write ``exp`` to the folder ``path`` (created) through :func:`~lowbit.deploy.write.write_files`."""
    arena = Arena()
    layers_meta = {name: layer_entry(arena, layer, float_bias) for name, layer in exp.layers.items()}
    kv_meta = {name: {"family": g.family, "shape": list(g.shape), "key": write_grid(arena, g.key, "kv"),
                      "value": write_grid(arena, g.value, "kv")} for name, g in exp.kv_cache.items()}
    float_meta = {name: {"shape": list(t.shape), "data": arena.add("float.weight", t)}
                  for name, t in exp.float_tensors.items()}
    extra = {}
    if exp.sink_prefix is not None:
        p = exp.sink_prefix
        extra["sink_prefix"] = {"tokens": p.token_ids.tolist(), **{
            f"{side}s": [{"shape": list(t.shape), "data": arena.add("float.weight", t)} for t in p.tensors(side)]
            for side in ("key", "value")}}
    manifest = manifest_of(exp, layers_meta, float_bias, model_kind=exp.kind, config=exp.config, kv_cache=kv_meta,
                           float_tensors=float_meta, **extra,
                           sizes={"weight_bytes": weight_bytes(layers_meta),
                                  "float_tensor_bytes": sum(reference_bytes(e["data"]) for e in float_meta.values())})
    return write_files(path, arena.tensors(), manifest)


def export_transformer(qmodel: nn.Module, path: str | os.PathLike, *, float_bias: bool = True) -> Path:
    """``lowbit.export`` for a quantized causal LM or encoder: the folder ``path`` (see the module docstring).
    Raises :class:`~lowbit.deploy.errors.ExportError` as :func:`build_transformer` does; ``qmodel`` is only read."""
    return write_transformer(build_transformer(qmodel), path, float_bias=float_bias)


# ----- reading ------------------------------------------------------------------------------
def is_transformer_manifest(manifest: dict) -> bool:
    return manifest.get("model_kind") in (CAUSAL_LM, ENCODER)


def read_transformer(path: str | os.PathLike) -> ExportedTransformer:
    """Read and check a transformer export folder: the integrity checks of :mod:`lowbit.deploy.read` (seal, sizes
    before reading, digests), then every field before use (element counts of every declared shape match the
    tensor slices actually present). Raises :class:`~lowbit.deploy.errors.ExportFileError` naming the field."""
    manifest = read_manifest(path)
    mpath = Path(path) / MANIFEST_FILE
    if not is_transformer_manifest(manifest):
        raise ExportFileError(f"{mpath}: not a transformer export (model_kind {manifest.get('model_kind')!r}); "
                              "load it with lowbit.load_export(path)")
    f = Fields(mpath, read_tensors(path, manifest))
    layers = {}
    for name, e in f.get(manifest, "layers", "", dict).items():
        layers[name] = read_layer(f, name, e, {}, LAYER_KINDS)
    kv = {}
    for name, e in f.get(manifest, "kv_cache", "", dict).items():
        where = f"kv_cache[{name!r}]"
        if not isinstance(e, dict):
            raise f.error(where, f"an object with family, shape, key and value, got {e!r}")
        family = f.get(e, "family", where, tuple(FAMILIES))
        shape = f.shape(e.get("shape"), f"{where}.shape", (2,))
        grids = [read_grid(f, e.get(side), f"{where}.{side}", "kv", "kv", shape, {}) for side in ("key", "value")]
        kv[name] = KVGrids(family, shape, *grids)
    float_tensors = {}
    for name, e in f.get(manifest, "float_tensors", "", dict).items():
        where = f"float_tensors[{name!r}]"
        if not isinstance(e, dict):
            raise f.error(where, f"an object with shape and data, got {e!r}")
        shape = f.shape(e.get("shape"), f"{where}.shape", tuple(range(1, 9)))
        data = f.ref(e, "data", where, "float.weight", math.prod(shape))
        float_tensors[name] = f.finite(data, f"{where}.data").reshape(shape).clone()
    config = f.get(manifest, "config", "", dict)
    arch, _, recipe, left_float = read_metadata(f, manifest)
    return ExportedTransformer(layers, kv, float_tensors, arch, config, recipe, left_float, manifest,
                               _read_sink_prefix(f, manifest), manifest["model_kind"])


def _read_sink_prefix(f: Fields, manifest: dict) -> SinkPrefix | None:
    e = f.get(manifest, "sink_prefix", "", dict, optional=True)
    if e is None:
        return None
    try:
        tokens = check_sink_prefix(e.get("tokens"))
    except RecipeError as err:
        raise f.error("sink_prefix.tokens", str(err)) from None
    sides = {}
    for side in ("keys", "values"):
        entries = e.get(side)
        if not isinstance(entries, list) or not entries or (side == "values" and len(entries) != len(sides["keys"])):
            raise f.error(f"sink_prefix.{side}", "a non-empty list of {shape, data}, one per attention block, as many "
                                                 f"keys as values; got {type(entries).__name__}")
        sides[side] = []
        for i, t in enumerate(entries):
            where = f"sink_prefix.{side}[{i}]"
            if not isinstance(t, dict):
                raise f.error(where, f"an object with shape and data, got {t!r}")
            shape = f.shape(t.get("shape"), f"{where}.shape", (4,))
            if shape[0] != 1 or shape[2] != len(tokens):
                raise f.error(f"{where}.shape", f"[1, kv heads, {len(tokens)} tokens, head dim], got {list(shape)}")
            data = f.ref(t, "data", where, "float.weight", math.prod(shape))
            sides[side].append(f.finite(data, f"{where}.data").reshape(shape).clone())
    return SinkPrefix(torch.tensor(tokens), sides["keys"], sides["values"])


# ----- loading ------------------------------------------------------------------------------
def _check_model(exp: ExportedTransformer, model: nn.Module, where) -> None:
    name = f"{type(model).__module__}.{type(model).__qualname__}"
    if name != exp.architecture.get("name"):
        raise ExportFileError(f"{where}: the export is of {exp.architecture.get('name')}, the model passed is a {name}")
    config = getattr(model, "config", None)
    mine = config.to_dict() if config is not None else {}
    for key in CONFIG_KEYS:
        if key in exp.config and json.loads(json.dumps(mine.get(key))) != exp.config[key]:
            raise ExportFileError(f"{where}: config field {key} is {exp.config[key]!r} in the export, "
                                  f"{mine.get(key)!r} in the model passed; pass a model of the exported config")


def _module(model: nn.Module, name: str, where, kind: type) -> nn.Module:
    try:
        m = model.get_submodule(name)
    except AttributeError:
        raise ExportFileError(f"{where}: the model has no module {name!r}; is it the exported architecture?") from None
    if not isinstance(m, kind) or isinstance(m, QuantMixin) or is_kv_quantized(m):
        raise ExportFileError(f"{where}: {name!r} is a {type(m).__name__}, the export holds a float "
                              f"{kind.__name__} there; pass the float model")
    return m


def _check_fits(exp: ExportedTransformer, model: nn.Module, where) -> None:
    """Every difference between the export and the (float) ``model`` that would stop the rebuild: checked on
    the caller's model, read only, before anything is copied."""
    _check_model(exp, model, where)
    for layer in exp.layers.values():
        m = _module(model, layer.name, where, nn.Embedding if layer.kind == "embedding" else nn.Linear)
        if tuple(m.weight.shape) != layer.weight_shape:
            raise ExportFileError(f"{where}: layer {layer.name!r} has weight shape {tuple(m.weight.shape)}, the "
                                  f"export {layer.weight_shape}")
        if (getattr(m, "bias", None) is None) != (layer.bias is None):
            raise ExportFileError(f"{where}: layer {layer.name!r} {'has no' if layer.bias is not None else 'has a'} "
                                  "bias, unlike the export")
    state = model.state_dict()
    in_layers = _layer_tensors(exp.layers)
    for key, t in exp.float_tensors.items():
        if key not in state or tuple(state[key].shape) != tuple(t.shape):
            have = tuple(state[key].shape) if key in state else "no such tensor"
            raise ExportFileError(f"{where}: float tensor {key!r} of shape {tuple(t.shape)}; the model has {have}")
    extra = sorted(k for k in state if k not in exp.float_tensors and k not in in_layers)
    if extra:
        raise ExportFileError(f"{where}: the model has tensors the export does not hold ({', '.join(extra[:3])}"
                              f"{', ...' if len(extra) > 3 else ''}); pass the exported architecture")
    if exp.kv_cache and set(check_attention(model)) != set(exp.kv_cache):
        raise ExportFileError(f"{where}: the model's attention blocks {sorted(check_attention(model))} are not the "
                              f"exported {sorted(exp.kv_cache)}")
    if exp.sink_prefix is not None:
        _check_sink_prefix(exp.sink_prefix, model, where)
    for name, g in exp.kv_cache.items():
        attention = model.get_submodule(name)
        if family_of(attention) != g.family:
            raise ExportFileError(f"{where}: {name!r} is a {type(attention).__name__}, the export quantized the "
                                  f"cache of a {g.family} attention block there")
        if _kv_shape(model, attention) != g.shape:
            raise ExportFileError(f"{where}: {name!r} caches {_kv_shape(model, attention)} (kv heads, head dim), "
                                  f"the export {g.shape}")


def _check_sink_prefix(prefix: SinkPrefix, model: nn.Module, where) -> None:
    vocab = model.get_input_embeddings().weight.shape[0]
    if int(prefix.token_ids.max()) >= vocab:
        raise ExportFileError(f"{where}: sink prefix token {int(prefix.token_ids.max())} is outside the model's "
                              f"vocabulary of {vocab}")
    blocks = check_attention(model)
    if prefix.layers != len(blocks):
        raise ExportFileError(f"{where}: the sink prefix holds keys and values for {prefix.layers} attention blocks, "
                              f"the model has {len(blocks)}")
    for side in ("key", "value"):
        for name, t in zip(blocks, prefix.tensors(side)):
            heads, dim = _kv_shape(model, model.get_submodule(name))
            have = tuple(t.shape)
            if have != (1, heads, prefix.length, dim):
                raise ExportFileError(f"{where}: sink prefix {side}s of {name!r} have shape {have}, the model caches "
                                      f"{(1, heads, prefix.length, dim)}")


def _install_layer(model: nn.Module, layer: LayerData) -> None:
    """Put the exported codes, grids and float tensors into the (checked) copy's layer."""
    m = model.get_submodule(layer.name)
    with torch.no_grad():  # a tied table (lm_head = embed_tokens) keeps one shared tensor: codes drive the forward
        m.weight.data = layer.dequantized_weight().to(m.weight.dtype).clone()
        if layer.bias is not None:
            m.bias = nn.Parameter(layer.bias.clone())
    wq = FixedQuantizer(layer.weight_grid, "weight", layer.weight_codes, f"{layer.name}.weight") \
        if layer.weight_grid is not None else None
    aq = FixedQuantizer(layer.input_grid, "activation", None, f"{layer.name}.input") \
        if layer.input_grid is not None else None
    if wq is not None or aq is not None:
        quant = quant_embedding_class(type(m)) if layer.kind == "embedding" else QuantLinear
        model.set_submodule(layer.name, quant.from_float(m, wq, aq))


def _install_kv(model: nn.Module, name: str, g: KVGrids) -> None:
    attention = model.get_submodule(name)
    key = FixedQuantizer(g.key, "activation", None, f"{name}.key")
    value = FixedQuantizer(g.value, "activation", None, f"{name}.value")
    model.set_submodule(name, kv_quant_class(type(attention)).from_float(attention, key, value))


def load_transformer(source: str | os.PathLike | ExportedTransformer, model: nn.Module | None, *,
                     packed: str | None = None) -> nn.Module:
    """The quantized causal LM or encoder of an export (a folder, or an :class:`ExportedTransformer` already read), in
    eval mode.

    ``model``: the float Hugging Face model of the exported class and config; a copy is modified, yours is
    left alone, and every tensor of the copy comes from the export (module docstring). Logits equal the
    exported model's bit for bit. ``packed``: ``"int4"`` or ``"int8"`` builds the quantized layers as
    :mod:`lowbit.deploy.packed` layers straight from the exported codes (what :func:`~lowbit.deploy.packed.pack_model`
    of the default result gives, without building the fake-quant layers first, and without copying the
    float weights they replace). Raises :class:`~lowbit.deploy.errors.ExportFileError` for a damaged folder, a
    missing ``model``, or a model of another class, config, module layout or tensor shape (naming the first
    difference), :class:`~lowbit.deploy.errors.ExportError` for a layer ``packed`` cannot run, all before
    anything is copied.
    """
    exp = source if isinstance(source, ExportedTransformer) else read_transformer(source)
    where = "the export" if isinstance(source, ExportedTransformer) else source
    if model is None:
        raise ExportFileError(f"{where}: a transformer export is loaded into its float architecture: "
                              f"lowbit.load_export(path, model=<a float {exp.architecture.get('name')}>)")
    _check_fits(exp, model, where)
    if packed is not None:
        check_plain_tables(model, [layer.name for layer in exp.layers.values() if layer.kind == "embedding"])
    swaps = packed_layers(exp.layers.values(), packed) if packed is not None else {}
    memo = {id(model.get_submodule(name).weight): None for name in swaps}  # weights the swaps replace: not copied
    model = copy.deepcopy(model, memo).eval()
    state = model.state_dict()
    with torch.no_grad():
        for key, t in exp.float_tensors.items():
            state[key].copy_(t)
    for layer in exp.layers.values():
        if layer.name in swaps:
            model.set_submodule(layer.name, swaps[layer.name])
        else:
            _install_layer(model, layer)
    for name, g in exp.kv_cache.items():
        _install_kv(model, name, g)
    if exp.sink_prefix is not None:
        install_sink_prefix(model, copy.deepcopy(exp.sink_prefix))
    model.lowbit_export = exp.manifest
    model.lowbit_report = report_of(exp)
    return model.eval()
