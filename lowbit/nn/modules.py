"""Quantized Conv1d / Conv2d / Linear, and Embedding (a quantized table, integer ids in).

Each is a subclass of the float layer it replaces, sharing that layer's weight and bias
``Parameter`` objects (so the float parameters stay, and state-dict keys stay ``conv1.weight``),
plus two quantizers:

    y = layer(input_quantizer(x), weight_quantizer(W), b)

Either quantizer may be ``None`` (that side stays float). In training, the quantized input a convolution or linear
layer keeps for its backward is stored as integer codes (lowbit.nn.saved_codes: same values, a quarter of the
memory or less); ``compact_saved_input = False`` on a layer keeps it in float32. ``isinstance(m, nn.Conv2d)`` still
holds, so code that walks a model by layer type keeps working.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from lowbit.nn.saved_codes import saved_as_codes
from lowbit.quant.base import Quantizer


class QuantMixin:
    weight_quantizer: Quantizer | None
    input_quantizer: Quantizer | None
    compact_saved_input = True  # the input saved for the backward kept as integer codes (module docstring)

    def _init_quant(self, weight_quantizer: Quantizer | None, input_quantizer: Quantizer | None) -> None:
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer

    @classmethod
    def from_float(cls, module: nn.Module, weight_quantizer: Quantizer | None,
                   input_quantizer: Quantizer | None):
        """A quantized layer sharing ``module``'s parameters and buffers (hooks are copied, not shared)."""
        q = rebind(module, cls)
        q._init_quant(weight_quantizer, input_quantizer)
        q.train(module.training)  # after the quantizers are attached, so that they follow the layer's mode
        if weight_quantizer is not None and not bool(weight_quantizer.initialized):
            weight_quantizer.init_from(q.weight.detach())
        return q

    def train(self, mode: bool = True):
        """Set the mode; leaving training re-derives a dynamic weight grid from the current weight.

        A dynamic weight quantizer (min-max, SAWB, ACIQ) sets its step at every training forward, so
        after an optimizer step its stored grid belongs to the previous weights; eval and export
        must use the grid of the weights they hold.
        """
        super().train(mode)
        wq = self.weight_quantizer
        if (not mode and wq is not None and wq.dynamic and bool(wq.initialized)
                and bool(torch.isfinite(self.weight).all())):
            wq.init_from(self.weight.detach())
        return self

    def quantized_weight(self) -> torch.Tensor:
        return self.weight if self.weight_quantizer is None else self.weight_quantizer(self.weight)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        q = self.input_quantizer
        if q is None:
            return x
        q.output_grid, q.output_codes, q.keep_codes = None, None, self.compact_saved_input
        return q(x)

    def quantized_call(self, x: torch.Tensor, op) -> torch.Tensor:
        """``op(x_hat, w_hat, bias)`` on the quantized input and weight, the input saved as codes
        (:meth:`saving_input`)."""
        x_hat = self.quantized_input(x)
        w_hat = self.quantized_weight()
        with self.saving_input(x_hat):
            return op(x_hat, w_hat, self.bias)

    def saving_input(self, x_hat: torch.Tensor):
        """The context in which the layer's op runs on ``x_hat``, the output of :meth:`quantized_input` just before:
        it saves ``x_hat`` as integer codes where the input quantizer put it on its grid (lowbit.nn.saved_codes)."""
        q = self.input_quantizer
        grid = None if q is None else q.output_grid
        if grid is None or not self.compact_saved_input or q.granularity.kind == "group":
            return contextlib.nullcontext()
        codes, q.output_codes = q.output_codes, None  # held by the hook from here on, not by the quantizer
        return saved_as_codes(x_hat, *grid, *q.qrange, codes=codes)

    def to_float(self) -> nn.Module:
        """The float layer (same parameters) without the quantizers, of :func:`float_class`."""
        return rebind(self, float_class(type(self)), drop=("weight_quantizer", "input_quantizer")).train(self.training)


def float_class(cls: type) -> type:
    """The float class a layer class stands for: the first class in its method order that is not lowbit's
    (``nn.Linear`` for QuantLinear; the model's own class for a quantized embedding subclass; ``cls`` itself
    for a float class)."""
    return next(c for c in cls.__mro__ if not issubclass(c, QuantMixin))


def rebind(module: nn.Module, cls: type, drop: tuple[str, ...] = ()) -> nn.Module:
    """An instance of ``cls`` (without calling its ``__init__``) that shares ``module``'s parameters,
    buffers and children, less the attributes and children named in ``drop``. Plain attributes
    are carried over; hook dicts, sets and lists are copied, not shared, so a hook registered on one
    module does not appear on the other. The training flag is left to the caller."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    skip = {"_parameters", "_buffers", "_modules", "training", *drop}
    new.__dict__.update({k: (copy.copy(v) if isinstance(v, (dict, set, list)) else v)
                         for k, v in module.__dict__.items() if k not in skip})
    new._parameters, new._buffers = dict(module._parameters), dict(module._buffers)
    new._modules = {k: v for k, v in module._modules.items() if k not in drop}
    return new


class QuantConv1d(QuantMixin, nn.Conv1d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantized_call(x, self._conv_forward)


class QuantConv2d(QuantMixin, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantized_call(x, self._conv_forward)


class QuantLinear(QuantMixin, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantized_call(x, nn.functional.linear)


class QuantEmbedding(QuantMixin, nn.Embedding):
    """An embedding table on a grid (``input_quantizer`` is always None: the inputs are token ids).
    With per-channel granularity each row (token) has its own step."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.quantized_weight(), self.padding_idx, self.max_norm, self.norm_type,
                                       self.scale_grad_by_freq, self.sparse)


_EMBEDDING_CLASSES: dict[type, type] = {nn.Embedding: QuantEmbedding}


def quant_embedding_class(base: type) -> type:
    """The quantized class for a table of class ``base`` (``nn.Embedding`` or a subclass of it).

    ``QuantEmbedding`` for ``nn.Embedding`` itself. A subclass may do more than the lookup (Gemma 3's
    ``Gemma3TextScaledWordEmbedding`` multiplies it by sqrt(hidden size)); for it, ``Quant<Base>`` (made once)
    derives from ``base`` first and ``QuantEmbedding`` second, so the method order is base, QuantEmbedding,
    nn.Embedding: ``base.forward`` runs unchanged and its ``super().forward(ids)`` looks the ids up in the
    quantized table. A subclass that reads its table some other way is not quantized by this class;
    :func:`lowbit.prepare.quantize` checks that the quantized table was read and refuses such a subclass.
    """
    if base not in _EMBEDDING_CLASSES:
        if not issubclass(base, nn.Embedding) or issubclass(base, QuantMixin):
            raise TypeError(f"{base.__name__} is not a float nn.Embedding class")
        _EMBEDDING_CLASSES[base] = type(f"Quant{base.__name__}", (base, QuantEmbedding), {"__module__": __name__})
    return _EMBEDDING_CLASSES[base]


QUANT_MODULES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear,
}  # nn.Embedding -> QuantEmbedding is not here: an embedding has no input quantizer (prepare swaps it alone,
# with quant_embedding_class)


def is_quantized(module: nn.Module) -> bool:
    return isinstance(module, QuantMixin)
