"""Batch-norm folding: ``Conv -> BatchNorm`` becomes one Conv with adjusted weight and bias.

For a conv ``y = W * x + b`` followed by batch norm in eval mode
``z = gamma (y - mu) / sqrt(var + eps) + beta``:

    W' = W * gamma / sqrt(var + eps)        (per output channel)
    b' = beta + (b - mu) * gamma / sqrt(var + eps)

so the folded model computes the same function and the weight quantizer sees the weights
that integer inference will actually use (Jacob et al., CVPR 2018, section 3.2).

Pairs are found by running one example batch with hooks (a tensor, or a dict of keyword inputs
such as a tokenizer's batch): a BatchNorm whose input *is* the output tensor of a Conv/Linear is
folded into it. The folded model's output is then checked
against the original's on the same batch; a mismatch (e.g. the conv output was also used
elsewhere) undoes the fold and raises.
"""

from __future__ import annotations

import torch
from torch import nn

FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Linear)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


@torch.no_grad()
def find_conv_bn_pairs(model: nn.Module, example: torch.Tensor | dict) -> list[tuple[str, str]]:
    """``(conv name, bn name)`` for every BatchNorm fed directly by a Conv/Linear output."""
    produced: dict[int, tuple[str, torch.Tensor]] = {}  # holds the tensors so their ids stay unique
    pairs: list[tuple[str, str]] = []
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, FOLDABLE):
            hooks.append(m.register_forward_hook(lambda mod, i, o, name=name: produced.__setitem__(id(o), (name, o))))
        elif isinstance(m, NORMS) and m.track_running_stats and m.running_mean is not None:
            def pre(mod, inputs, name=name):
                src = produced.get(id(inputs[0]), (None,))[0]
                if src is not None and (src, name) not in pairs:
                    pairs.append((src, name))
            hooks.append(m.register_forward_pre_hook(pre))
    was_training = model.training
    model.eval()
    try:
        _run(model, example)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    seen_convs = [c for c, _ in pairs]
    return [(c, b) for c, b in pairs if seen_convs.count(c) == 1]


class Folded(list):
    """The folded ``(conv, bn)`` pairs; :meth:`undo` puts the original weights and norms back."""

    def __init__(self, pairs, restore=None):
        super().__init__(pairs)
        self._restore = restore

    def undo(self) -> None:
        if self._restore is not None:
            self._restore()
            self._restore = None


@torch.no_grad()
def fold_batchnorm(model: nn.Module, example: torch.Tensor | dict, *, atol: float = 1e-4) -> Folded:
    """Fold every ``Conv -> BN`` pair of ``model`` in place; BNs become ``nn.Identity``. Returns the pairs."""
    pairs = find_conv_bn_pairs(model, example)
    if not pairs:
        return Folded([])
    was_training = model.training
    model.eval()
    reference = _run(model, example)
    modules = dict(model.named_modules())
    saved = {}
    for conv_name, bn_name in pairs:
        conv, bn = modules[conv_name], modules[bn_name]
        saved[conv_name] = (conv.weight.detach().clone(), None if conv.bias is None else conv.bias.detach().clone())
        factor = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1.0 / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        conv.weight.mul_(factor.reshape(-1, *([1] * (conv.weight.dim() - 1))))
        new_bias = shift + (bias - bn.running_mean) * factor
        if conv.bias is None:
            conv.bias = nn.Parameter(new_bias)
        else:
            conv.bias.copy_(new_bias)
        _set(model, bn_name, nn.Identity())
    @torch.no_grad()
    def restore():
        for conv_name, bn_name in pairs:
            w, b = saved[conv_name]
            modules[conv_name].weight.copy_(w)
            if b is None:
                modules[conv_name].bias = None
            else:
                modules[conv_name].bias.copy_(b)
            _set(model, bn_name, modules[bn_name])

    folded = _run(model, example)
    model.train(was_training)
    if not all(torch.allclose(f, r, atol=atol * max(1.0, r.abs().max().item()), rtol=1e-4)
               for f, r in zip(folded, reference, strict=True)):
        restore()
        raise RuntimeError("batch-norm folding changed the model's output (a conv output feeds more than its "
                           "batch norm?); the model was restored; quantize without folding (fold_bn: false)")
    return Folded(pairs, restore)


def _run(model: nn.Module, example) -> list[torch.Tensor]:
    """The floating-point tensors ``model`` returns for ``example`` (keyword inputs if a dict), in order."""
    out = model(**example) if isinstance(example, dict) else model(example)
    items = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else [out]
    return [t for t in items if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)
