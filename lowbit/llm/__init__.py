"""Hugging Face language models: the KV-cache quantization point, SiLQ fine-tuning, evaluation; encoders
(BERT) fine-tune by embedding distillation (:mod:`lowbit.llm.encoder`).

    import lowbit
    qmodel = lowbit.quantize(hf_model, "silq-w4a8kv8", calib_data=windows)

Importing this package registers the recipe's ``kv_cache`` section with :func:`lowbit.prepare.quantize`
(and the cache's sink prefix, :mod:`lowbit.llm.sink_prefix`) and next-token distillation as the
fine-tuning objective of causal LMs with :func:`lowbit.finetune`; it does not import transformers
(the functions that need it import it when called).
"""

from lowbit.llm.encoder import SentenceEncoder, embedding_agreement, is_encoder, sentence_embeddings
from lowbit.llm.evaluate import measure, perplexity
from lowbit.llm.families import FAMILIES, family_of
from lowbit.llm.kv_cache import is_kv_quantized, kv_cache_replacements
from lowbit.llm.objective import CausalLM, is_causal_lm
from lowbit.llm.sink_prefix import attach_sink_prefix, has_sink_prefix
from lowbit.prepare import register_model_change, register_points
from lowbit.qat.objective import register_objective

register_points("kv_cache", kv_cache_replacements)
register_model_change("kv_cache", attach_sink_prefix)
register_objective(is_causal_lm, CausalLM)
register_objective(is_encoder, SentenceEncoder)

__all__ = ["FAMILIES", "CausalLM", "SentenceEncoder", "embedding_agreement", "family_of", "has_sink_prefix",
           "is_causal_lm", "is_encoder", "is_kv_quantized", "measure", "perplexity", "sentence_embeddings"]
