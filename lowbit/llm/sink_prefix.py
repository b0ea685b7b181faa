"""A float sink prefix in the KV cache (PrefixQuant: Chen et al. 2024, arXiv:2410.05265).

Many language models park an *attention sink* on the first token of a sequence, and there a few
MLP inputs reach hundreds of times their RMS (SmolLM2-135M: 2,949, 618x RMS, at the input of
``layers.11.mlp.down_proj``, only at position 0; RESULTS 'llm'). One static step per tensor must
then clip that token or round every other token coarsely. PrefixQuant's remedy: put the sink
token(s) in front of every sequence once, offline, keep their keys and values in the cache, and no
later token becomes the sink, so the static quantizers never meet those values.

    kv_cache: {method: lsq, bits: 8, granularity: head, sink_prefix: bos}    # a recipe's cache section

With ``sink_prefix`` (token ids, or ``bos``: the model config's ``bos_token_id``) :func:`lowbit.quantize`
runs those tokens through the model with every quantizer off (float keys and values: our choice, the
cache's few prefix rows stay float like a system prompt computed once), stores them as buffers of a
:class:`SinkPrefix` child named ``lowbit_sink_prefix`` (saved with the model), and gives the model a
subclass of its own class (:func:`sink_prefixed_class`) whose

- ``forward`` starts from a cache holding the prefix whenever the call brings no cache (evaluation,
  fine-tuning, calibration): the prefix is context, its positions come first, the logits are those
  of the caller's tokens only;
- ``generate`` prepends the prefix tokens and a cache holding them, and returns only the caller's
  tokens and the new ones.

Nothing is added to the graph. The float model, the teacher of fine-tuning and the "float" rows of
lowbit's tables stay without the prefix. Gradient checkpointing re-runs each layer's forward, which
would write the cache twice, so the two are refused together.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.errors import LowbitError, RecipeError
from lowbit.llm.kv_cache import CACHE_ARGUMENTS, cache_argument
from lowbit.quant.base import Quantizer


class SinkPrefix(nn.Module):
    """The prefix's token ids and, per layer, its keys and values ``(1, kv heads, tokens, head dim)``."""

    def __init__(self, token_ids: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor]):
        super().__init__()
        self.register_buffer("token_ids", token_ids.clone())
        for i, (k, v) in enumerate(zip(keys, values)):
            self.register_buffer(f"key_{i}", k.detach().clone())
            self.register_buffer(f"value_{i}", v.detach().clone())
        self.layers = len(keys)

    @property
    def length(self) -> int:
        return int(self.token_ids.numel())

    def tensors(self, side: str) -> list[torch.Tensor]:
        """The ``"key"`` or ``"value"`` tensors, one per layer in order."""
        return [getattr(self, f"{side}_{i}") for i in range(self.layers)]

    def fill(self, cache, batch: int):
        """Write the prefix, repeated for ``batch`` sequences, into an empty HF cache; returns it."""
        for i, (k, v) in enumerate(zip(self.tensors("key"), self.tensors("value"))):
            cache.update(k.expand(batch, *k.shape[1:]), v.expand(batch, *v.shape[1:]), i)
        return cache


def _new_cache(model: nn.Module):
    from transformers import DynamicCache  # deferred: optional dependency (lowbit.llm does not import transformers)

    return DynamicCache(config=model.config)


def _checkpointing(model: nn.Module) -> bool:
    """Whether HF activation checkpointing is on (``is_gradient_checkpointing`` before transformers 5.x)."""
    name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else \
        "is_gradient_checkpointing"
    return bool(getattr(model, name, False))


class SinkPrefixMixin:
    """``forward`` and ``generate`` with the prefix in front (module docstring)."""

    _cache_argument: str
    _float_class: type  # the model's own class (exports name it)

    def forward(self, *args, **kwargs):
        if all(kwargs.get(n) is None for n in CACHE_ARGUMENTS):  # the call brings no cache, under any name
            if self.training and _checkpointing(self):
                raise LowbitError("a sink prefix (kv_cache.sink_prefix) and gradient checkpointing do not combine: "
                                  "checkpointing re-runs each layer, which would write the prefix cache twice; "
                                  "turn one of them off")
            ids = kwargs.get("input_ids", args[0] if args else None)
            embeds = kwargs.get("inputs_embeds")
            batch = (ids if ids is not None else embeds).shape[0]
            prefix = self.lowbit_sink_prefix
            kwargs[self._cache_argument] = prefix.fill(_new_cache(self), batch)
            mask = kwargs.get("attention_mask")
            if mask is not None:
                kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, prefix.length), mask], 1)
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = kwargs["position_ids"] + prefix.length
        return super().forward(*args, **kwargs)

    def generate(self, input_ids: torch.Tensor, **kwargs):
        prefix = self.lowbit_sink_prefix
        batch = input_ids.shape[0]
        head = prefix.token_ids.to(input_ids.device).expand(batch, -1)
        mask = kwargs.pop("attention_mask", None)
        if mask is None:
            mask = torch.ones_like(input_ids)
        kwargs[self._cache_argument] = prefix.fill(_new_cache(self), batch)
        out = super().generate(torch.cat([head, input_ids], 1),
                               attention_mask=torch.cat([mask.new_ones(batch, prefix.length), mask], 1), **kwargs)
        if isinstance(out, torch.Tensor):
            return out[:, prefix.length:]
        out.sequences = out.sequences[:, prefix.length:]  # return_dict_in_generate: the cache keeps the prefix
        return out


_CLASSES: dict[type, type] = {}


def sink_prefixed_class(base: type) -> type:
    """``SinkPrefixed<Base>``: the subclass of a causal LM class that runs with a sink prefix (made once)."""
    if base not in _CLASSES:
        _CLASSES[base] = type(f"SinkPrefixed{base.__name__}", (SinkPrefixMixin, base),
                              {"_cache_argument": cache_argument(base)[0], "_float_class": base,
                               "__module__": __name__})
    return _CLASSES[base]


def has_sink_prefix(model: nn.Module) -> bool:
    return isinstance(model, SinkPrefixMixin)


@torch.no_grad()
def attach_sink_prefix(model: nn.Module, spec: dict):
    """Give ``model`` the recipe's ``kv_cache.sink_prefix`` (module docstring), in place; returns the undo.

    The prefix's keys and values come from ``model`` with every lowbit quantizer switched off, so
    they are the float model's (the quantizers of a model being quantized are not calibrated yet).
    """
    tokens = spec.get("sink_prefix")
    if tokens is None or has_sink_prefix(model):
        return None
    if not hasattr(model, "generate") or not hasattr(getattr(model, "config", None), "vocab_size"):
        raise RecipeError(f"kv_cache.sink_prefix needs a Hugging Face causal language model, got "
                          f"{type(model).__name__}")
    if tokens == "bos":
        bos = getattr(model.config, "bos_token_id", None)
        if not isinstance(bos, int):
            raise RecipeError(f"kv_cache.sink_prefix: bos, but the model's config has no bos_token_id ({bos!r}); "
                              "give the prefix as token ids, e.g. sink_prefix: [1]")
        tokens = [bos]
    vocab = model.get_input_embeddings().weight.shape[0]
    if max(tokens) >= vocab:
        raise RecipeError(f"kv_cache.sink_prefix: token id {max(tokens)} is outside the model's vocabulary of "
                          f"{vocab}")
    quantizers = [m for m in model.modules() if isinstance(m, Quantizer)]
    states = [q.enabled for q in quantizers]
    mode = model.training
    device = model.get_input_embeddings().weight.device
    ids = torch.tensor([tokens], device=device)
    try:
        for q in quantizers:
            q.enabled = False
        model.eval()
        cache = _new_cache(model)
        model(input_ids=ids, **{cache_argument(type(model))[0]: cache}, use_cache=True)
    finally:
        for q, state in zip(quantizers, states):
            q.enabled = state
        model.train(mode)
    return install_sink_prefix(model, SinkPrefix(ids[0], [layer.keys for layer in cache.layers],
                                                 [layer.values for layer in cache.layers]))


def install_sink_prefix(model: nn.Module, prefix: SinkPrefix):
    """Give ``model`` (in place) ``prefix`` and the class that runs with it; returns the undo."""
    old_class = model.__class__
    model.lowbit_sink_prefix = prefix
    model.__class__ = sink_prefixed_class(old_class)

    def undo():
        model.__class__ = old_class
        del model.lowbit_sink_prefix
    return undo
