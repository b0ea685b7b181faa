"""The quantization core: one integer grid, one fake-quant op, one quantizer per method.

``make_quantizer("lsq", bits=4, role="weight", granularity="channel")`` builds any of them
by name; :data:`QUANTIZERS` is the registry.
"""

from __future__ import annotations

import inspect

from lowbit.quant.aciq import ACIQQuantizer, clip_mse, optimal_clip
from lowbit.quant.base import Grid, Quantizer
from lowbit.quant.faq import FAQQuantizer
from lowbit.quant.grid import Granularity, fake_quant, int_range, pow2ceil, quantize_int
from lowbit.quant.lsq import LSQQuantizer
from lowbit.quant.minmax import MinMaxQuantizer, PercentileQuantizer
from lowbit.quant.pact import PACTQuantizer
from lowbit.quant.sawb import SAWBQuantizer, fit_coefficients, sawb_coefficients

QUANTIZERS: dict[str, type[Quantizer]] = {
    q.method: q for q in (MinMaxQuantizer, PercentileQuantizer, FAQQuantizer, PACTQuantizer, SAWBQuantizer,
                          LSQQuantizer, ACIQQuantizer)
}
ROLES = ("weight", "activation")


def make_granularity(spec, role: str) -> Granularity:
    """``"tensor"``, ``"channel"`` (axis 0 for weights, 1 for activations), ``"group:128"``, ``"token"``
    (activations), or a Granularity."""
    if isinstance(spec, Granularity):
        return spec
    if spec is None or spec == "tensor":
        return Granularity()
    if spec == "channel":
        return Granularity("channel", axis=0 if role == "weight" else 1)
    if spec == "token":
        if role != "activation":
            raise ValueError("token granularity (one step per token, computed at run time) applies to activations only")
        return Granularity("token", axis=-1)
    if isinstance(spec, str) and spec.startswith("group:"):
        if role != "weight":
            raise ValueError("group granularity applies to weights only")
        try:
            size = int(spec.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"group granularity is written 'group:SIZE', got {spec!r}") from None
        return Granularity("group", group_size=size)
    raise ValueError(f"granularity must be 'tensor', 'channel', 'group:SIZE' or 'token', got {spec!r}")


def quantizer_options(method: str) -> set[str]:
    """Keyword options a method accepts (beyond bits, signed, granularity, role)."""
    cls = QUANTIZERS[method]
    names = set()
    for klass in cls.__mro__:
        if klass is object or not issubclass(klass, Quantizer):
            continue
        names |= {p for p in inspect.signature(klass.__init__).parameters if p not in ("self", "kw")}
    if not cls.supports_bit_allocation:
        names.discard("bit_allocation")
    if getattr(cls, "learnable", False):
        names.discard("bias_correction")
    return names


def make_quantizer(method: str, *, bits: int, role: str, signed: bool | None = None, granularity=None,
                   **options) -> Quantizer:
    """Build the quantizer ``method`` for a weight or an activation, checking every option by name."""
    if method not in QUANTIZERS:
        raise ValueError(f"unknown quantization method {method!r}; choose one of {sorted(QUANTIZERS)}")
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    unknown = set(options) - quantizer_options(method)
    if unknown:
        raise ValueError(f"{method} does not take option(s) {sorted(unknown)}; it takes "
                         f"{sorted(quantizer_options(method) - {'bits', 'signed', 'granularity', 'role'})}")
    if role == "weight" and signed is None:
        signed = True
    kw = dict(options)
    if "role" in quantizer_options(method):
        kw["role"] = role
    if role == "activation" and options.get("bias_correction"):
        raise ValueError("bias_correction applies to weights only")
    quantizer = QUANTIZERS[method](bits, signed, make_granularity(granularity, role), **kw)
    quantizer.role = role
    return quantizer


__all__ = ["QUANTIZERS", "Grid", "Granularity", "Quantizer", "ACIQQuantizer", "FAQQuantizer", "LSQQuantizer",
           "MinMaxQuantizer", "PACTQuantizer", "PercentileQuantizer", "SAWBQuantizer", "clip_mse", "fake_quant",
           "fit_coefficients", "int_range", "make_granularity", "make_quantizer", "optimal_clip", "pow2ceil",
           "quantize_int", "quantizer_options", "sawb_coefficients"]
