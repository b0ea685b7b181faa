"""Quantized layers: float Conv/Linear layers with a weight quantizer and an input quantizer, and
embedding tables with a weight quantizer."""

from lowbit.nn.modules import (QUANT_MODULES, QuantConv1d, QuantConv2d, QuantEmbedding, QuantLinear, QuantMixin,
                               is_quantized)

__all__ = ["QUANT_MODULES", "QuantConv1d", "QuantConv2d", "QuantEmbedding", "QuantLinear", "QuantMixin",
           "is_quantized"]
