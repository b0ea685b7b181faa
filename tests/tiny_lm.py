"""Small random causal language models of each supported attention family, for fast tests."""

from __future__ import annotations

import torch

FAMILY_MODELS = {  # family -> (config class, model class)
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
}
VOCAB = 64


def tiny_lm(family: str = "llama", *, layers: int = 2, seed: int = 0, **overrides):
    """A random ``<Family>ForCausalLM``: hidden 32, 4 heads of 8, 2 KV heads (grouped queries), in eval mode."""
    import transformers

    config_cls, model_cls = (getattr(transformers, n) for n in FAMILY_MODELS[family])
    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256)
    kw.update(overrides)
    torch.manual_seed(seed)
    return model_cls(config_cls(**kw)).eval()


def token_batch(batch: int = 2, length: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
