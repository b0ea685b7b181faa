"""The attention families whose KV cache lowbit quantizes, recognised by class.

Every family here writes its attention forward the same way in transformers 5.x (read in each
``modeling_<family>.py``): project with ``k_proj``/``v_proj``, reshape to ``(batch, kv heads,
tokens, head dim)``, apply the rotary embedding to queries and keys, then hand keys and values to
``cache.update(key_states, value_states, layer_idx, ...)`` before the attention function reads
them. :mod:`lowbit.llm.kv_cache` quantizes at that call. A class is recognised by its exact module
and name (a subclass may write another forward), without importing transformers; each family has
a test that runs a small random model of it (tests/test_llm_kv_cache.py).

An attention block of any other class makes :func:`check_attention` raise, naming the module and
these families: quantizing the Linear layers of a model while its cache stays silently float would
be a partial quantization the recipe did not ask for.
"""

from __future__ import annotations

from torch import nn

from lowbit.errors import RecipeError

# family -> attention class, in transformers.models.<family>.modeling_<family>
FAMILIES: dict[str, str] = {
    "llama": "LlamaAttention",
    "mistral": "MistralAttention",
    "qwen2": "Qwen2Attention",
    "qwen3": "Qwen3Attention",
    "gemma": "GemmaAttention",
    "gemma2": "Gemma2Attention",
    "gemma3": "Gemma3Attention",
}
_CLASSES = {(f"transformers.models.{family}.modeling_{family}", name): family for family, name in FAMILIES.items()}


def family_of(module: nn.Module) -> str | None:
    """The family of an attention module (``"llama"``, ...), or None for any other module."""
    cls = type(module)
    return _CLASSES.get((cls.__module__, cls.__name__))


def looks_like_attention(module: nn.Module) -> bool:
    """An attention block by transformers' naming (``...Attention``) or torch's own."""
    return isinstance(module, nn.MultiheadAttention) or type(module).__name__.endswith("Attention")


def supported() -> str:
    return ", ".join(f"{family} ({name})" for family, name in FAMILIES.items())


def check_attention(model: nn.Module) -> dict[str, str]:
    """``{module name: family}`` of every attention block of ``model``.

    Raises :class:`~lowbit.errors.RecipeError` naming the first block of an unknown class (and
    the supported families), or when ``model`` has no attention block at all.
    """
    found = {}
    for name, m in model.named_modules():
        family = family_of(m)
        if family is not None:
            found[name] = family
        elif looks_like_attention(m):
            raise RecipeError(f"{name or type(model).__name__} is a {type(m).__module__}.{type(m).__name__}, "
                              f"whose KV cache lowbit cannot quantize; supported attention families: "
                              f"{supported()}. Drop the recipe's kv_cache section to quantize the "
                              "Linear layers only")
    if not found:
        raise RecipeError(f"the recipe quantizes the KV cache but {type(model).__name__} has no attention block; "
                          f"supported attention families: {supported()}. Drop the recipe's kv_cache section")
    return found
