"""The KV-cache quantization point: keys (after the rotary embedding) and values on a grid before
they are written to the cache.

    k_hat = key_quantizer(k),  v_hat = value_quantizer(v)       # k, v: (batch, kv heads, tokens, head dim)
    cache.update(k_hat, v_hat, layer_idx, ...)                   # the cache holds grid values

Each supported attention block (:mod:`lowbit.llm.families`) is swapped for a subclass of its own
class (as ``prepare`` swaps ``nn.Linear`` for ``QuantLinear``, sharing every parameter and child)
whose forward runs the family's own forward with one change: the ``cache`` argument is wrapped in
:class:`QuantizingCache`, whose ``update`` quantizes keys and values and then calls the real
cache's. With no cache (training, ``use_cache=False``) the wrapper still quantizes and stores
nothing, so training sees exactly the attention that generation runs, and during ``generate()``
HF's own cache classes (dynamic, static, sliding) hold grid values: nothing else in the graph
changes. Steps are per KV head by default (``granularity: head``: a Granularity along axis 1 of the
``(batch, kv heads, tokens, head dim)`` tensors), or one per tensor.
"""

from __future__ import annotations

import inspect

from torch import nn

from lowbit.errors import RecipeError
from lowbit.llm.families import check_attention
from lowbit.nn.modules import rebind
from lowbit.prepare import build_quantizer
from lowbit.quant.base import Quantizer
from lowbit.quant.grid import Granularity

CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value")  # its name in transformers 5.x, then 4.x


class QuantizingCache:
    """Stands in for an attention block's cache argument: ``update`` quantizes keys and values
    with the block's quantizers, then stores them in the real cache (if any) and returns what it
    returns. Anything else the forward reads from the cache comes from the real one."""

    def __init__(self, attention: nn.Module, cache):
        self.attention, self.cache = attention, cache

    def update(self, key_states, value_states, *args, **kwargs):
        key_states = self.attention.key_quantizer(key_states)
        value_states = self.attention.value_quantizer(value_states)
        if self.cache is None:
            return key_states, value_states
        return self.cache.update(key_states, value_states, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.cache, name)


class KVQuantMixin:
    """Holds ``key_quantizer`` and ``value_quantizer``; runs the family's forward through a
    :class:`QuantizingCache`."""

    key_quantizer: Quantizer
    value_quantizer: Quantizer
    _cache_argument: str  # the forward's name for its cache argument
    _cache_position: int  # and its position after self
    _float_class: type

    def forward(self, *args, **kwargs):
        position = self._cache_position
        if position < len(args):
            args = (*args[:position], QuantizingCache(self, args[position]), *args[position + 1:])
        else:
            kwargs[self._cache_argument] = QuantizingCache(self, kwargs.get(self._cache_argument))
        return super().forward(*args, **kwargs)

    @classmethod
    def from_float(cls, attention: nn.Module, key_quantizer: Quantizer, value_quantizer: Quantizer) -> nn.Module:
        """A quantized block sharing ``attention``'s parameters, children and attributes."""
        q = rebind(attention, cls)
        q.key_quantizer, q.value_quantizer = key_quantizer, value_quantizer
        return q.train(attention.training)

    def to_float(self) -> nn.Module:
        """The float attention block (same parameters and children) without the cache quantizers."""
        return rebind(self, self._float_class, drop=("key_quantizer", "value_quantizer")).train(self.training)


_QUANT_CLASSES: dict[type, type] = {}


def cache_argument(cls: type) -> tuple[str, int]:
    """The name of ``cls.forward``'s cache argument and its position after ``self``."""
    params = list(inspect.signature(cls.forward).parameters)
    name = next((n for n in CACHE_ARGUMENTS if n in params), None)
    if name is None:
        raise RecipeError(f"{cls.__name__}.forward takes none of {CACHE_ARGUMENTS}; lowbit cannot reach its "
                          "cache with this version of transformers")
    return name, params.index(name) - 1


def kv_quant_class(base: type) -> type:
    """``KVQuant<Base>``: the subclass of an attention class that quantizes its cache (made once)."""
    if base not in _QUANT_CLASSES:
        name, position = cache_argument(base)
        _QUANT_CLASSES[base] = type(f"KVQuant{base.__name__}", (KVQuantMixin, base),
                                    {"_cache_argument": name, "_cache_position": position,
                                     "_float_class": base, "__module__": __name__})
    return _QUANT_CLASSES[base]


def is_kv_quantized(module: nn.Module) -> bool:
    return isinstance(module, KVQuantMixin)


def kv_quantizer(spec: dict, name: str) -> Quantizer:
    """One cache quantizer from the recipe's ``kv_cache`` spec (signed unless the spec says otherwise)."""
    per_head = spec.get("granularity", "head") == "head"
    spec = {**{k: v for k, v in spec.items() if k != "sink_prefix"},  # the cache's content, not a quantizer's
            "granularity": Granularity("channel", axis=1) if per_head else "tensor", "signed": spec.get("signed", True)}
    return build_quantizer(spec, "activation", name)


def kv_cache_replacements(model: nn.Module, spec: dict) -> dict[str, nn.Module]:
    """``{name: cache-quantizing block}`` for every attention block of ``model`` (the recipe's
    ``kv_cache`` section; registered with :func:`lowbit.prepare.register_points`).

    Raises :class:`~lowbit.errors.RecipeError` when an attention block is of a family lowbit does
    not know, or the model has none.
    """
    out = {}
    for name in check_attention(model):
        attention = model.get_submodule(name)
        prefix = f"{name}." if name else ""
        out[name] = kv_quant_class(type(attention)).from_float(
            attention, kv_quantizer(spec, f"{prefix}key"), kv_quantizer(spec, f"{prefix}value"))
    return out
