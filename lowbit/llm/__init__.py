"""Hugging Face causal language models: the KV-cache quantization point, SiLQ fine-tuning, evaluation.

    import lowbit
    qmodel = lowbit.quantize(hf_model, "silq-w4a8kv8", calib_data=windows)

Importing this package registers the recipe's ``kv_cache`` section with :func:`lowbit.prepare.quantize`;
it does not import transformers (the functions that need it import it when called).
"""

from lowbit.llm.families import FAMILIES, family_of
from lowbit.llm.kv_cache import is_kv_quantized, kv_cache_replacements
from lowbit.prepare import register_points

register_points("kv_cache", kv_cache_replacements)

__all__ = ["FAMILIES", "family_of", "is_kv_quantized"]
