"""The input a quantized layer keeps for its backward, stored as integer codes (lowbit.nn.saved_codes) and the eager
fake-quant's saved codes (lowbit.quant.grid): the same values and gradients bit for bit, in less memory."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from lowbit.nn import QuantConv2d, QuantLinear
from lowbit.nn.saved_codes import saved_as_codes
from lowbit.quant import Granularity, make_quantizer
from lowbit.quant.grid import code_dtype

torch.set_num_threads(1)

INPUT_QUANTIZERS = [  # (method, options): signed and unsigned codes, a learned zero point, SAWB-style half-integer
    ("lsq", dict(bits=4)),                                   # zero point, 8-bit unsigned codes (int16), per-channel
    ("lsq", dict(bits=2, asymmetric=True)),
    ("pact", dict(bits=3)),
    ("minmax", dict(bits=8)),
    ("minmax", dict(bits=8, granularity="channel")),       # conv: per channel (axis 1); linear: per feature
    ("minmax", dict(bits=8, granularity="token", symmetric=False)),  # linear only: a step per token, at run time
]


def _layer(kind: str, method: str, options: dict, x: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    float_layer = nn.Conv2d(4, 6, 3, padding=1) if kind == "conv" else nn.Linear(12, 5)
    options = dict(options, role="activation")
    if kind == "linear" and options.get("granularity") == "channel":
        options["granularity"] = Granularity("channel", axis=-1)
    wq = make_quantizer("lsq", bits=4, role="weight", granularity="channel")
    layer_class = QuantConv2d if kind == "conv" else QuantLinear
    layer = layer_class.from_float(float_layer, wq, make_quantizer(method, **options))
    layer.input_quantizer.init_from(x)
    return layer.train()


def _grads(layer: nn.Module, x0: torch.Tensor, compact: bool):
    layer.compact_saved_input = compact
    layer.zero_grad(set_to_none=True)
    x = x0.clone().requires_grad_()
    y = layer(x)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(2)))
    return y.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("method,options", INPUT_QUANTIZERS,
                         ids=[f"{m}-{i}" for i, (m, _) in enumerate(INPUT_QUANTIZERS)])
def test_codes_saved_for_the_backward_give_the_same_gradients(kind, method, options):
    if kind == "conv" and options.get("granularity") == "token":
        pytest.skip("per-token steps apply to Linear inputs only")
    x0 = torch.randn((2, 4, 5, 5) if kind == "conv" else (3, 7, 12), generator=torch.Generator().manual_seed(1))
    if method == "pact" or (method == "minmax" and "granularity" not in options):
        x0 = x0.relu()  # unsigned codes
    layer = _layer(kind, method, options, x0)
    y0, gx0, gp0 = _grads(layer, x0, compact=False)
    y1, gx1, gp1 = _grads(layer, x0, compact=True)
    assert layer.input_quantizer.output_grid is not None  # the compact path was taken
    assert torch.equal(y0, y1) and torch.equal(gx0, gx1)
    assert gp0.keys() == gp1.keys() and len(gp0) >= 3  # weight, bias and the learned steps
    for name in gp0:
        assert torch.equal(gp0[name], gp1[name]), name


@pytest.mark.parametrize("qmin,qmax,zero,dtype,halves", [
    (-8, 7, 0.0, torch.int8, 1),       # signed 4-bit
    (0, 255, 0.0, torch.uint8, 1),     # unsigned 8-bit
    (-128, 127, 5.0, torch.int16, 1),  # a zero point pushes signed 8-bit codes past int8
    (0, 3, 1.5, torch.int8, 2),        # SAWB's even level set: codes are multiples of 1/2
    (0, 15, 3.0, torch.int8, 1),       # an integer zero point shifts the range
])
def test_the_pack_hook_keeps_the_narrowest_integer_codes_and_unpacks_exactly(qmin, qmax, zero, dtype, halves):
    step = torch.tensor(0.0371)
    z = torch.tensor(zero)
    x = 0.5 * torch.randn(64, generator=torch.Generator().manual_seed(3)) / 0.0371 * 4
    x_hat = (torch.round(x + z).clamp(qmin, qmax) - z) * step
    hooks = saved_as_codes(x_hat, step, z, qmin, qmax)
    packed = hooks.pack_hook(x_hat)
    codes, _, m = packed
    assert codes.dtype == dtype and m == halves
    assert torch.equal(hooks.unpack_hook(packed), x_hat)  # bit for bit
    other = torch.randn(64)
    assert hooks.pack_hook(other) is other  # any other saved tensor passes through


def test_codes_from_the_fake_quant_are_kept_as_they_are():
    step = torch.tensor(0.25)
    codes = torch.randint(-8, 8, (5, 6), dtype=torch.int8)
    x_hat = codes.float() * step
    hooks = saved_as_codes(x_hat, step, torch.zeros(()), -8, 7, codes=codes)
    packed = hooks.pack_hook(x_hat)
    assert packed[0] is codes  # no second copy
    assert torch.equal(hooks.unpack_hook(packed), x_hat)


def test_no_hook_where_no_code_type_holds_the_range_or_no_gradient_is_recorded():
    x_hat = torch.zeros(4)
    assert code_dtype(0, 2**16) is None
    assert not hasattr(saved_as_codes(x_hat, torch.tensor(1.0), torch.tensor(0.0), 0, 2**16 - 1 + 2**16), "pack_hook")
    with torch.no_grad():
        assert not hasattr(saved_as_codes(x_hat, torch.tensor(1.0), torch.tensor(0.0), -8, 7), "pack_hook")
    assert not hasattr(saved_as_codes(x_hat.double(), torch.tensor(1.0), torch.tensor(0.0), -8, 7), "pack_hook")


def _bytes_kept_by_the_forward(layer: nn.Module, x: torch.Tensor, trace) -> int:
    """Bytes allocated and not freed during the forward (the output and what autograd saved): the sum of the
    allocator's events in the profiler's trace."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        y = layer(x)
    prof.export_chrome_trace(str(trace))
    kept = sum(e["args"]["Bytes"] for e in json.loads(trace.read_text())["traceEvents"] if e.get("name") == "[memory]")
    del y
    return kept


def test_the_forward_keeps_a_quarter_of_the_input_bytes_or_less(tmp_path):
    x0 = torch.randn(8, 4, 32, 32, generator=torch.Generator().manual_seed(4))
    layer = _layer("conv", "lsq", dict(bits=4), x0)
    x = x0.clone().requires_grad_()
    kept = {}
    for compact in (False, True):
        layer.compact_saved_input = compact
        kept[compact] = _bytes_kept_by_the_forward(layer, x, tmp_path / f"{compact}.json")
    # float: the fake-quantized input (4 bytes per element) kept for the convolution; compact: its int8 codes
    assert kept[False] - kept[True] >= 0.74 * x0.numel() * 4


@pytest.mark.slow
@pytest.mark.parametrize("method,options", [("lsq", dict(bits=4)), ("lsq", dict(bits=2, asymmetric=True))],
                         ids=["codes-from-the-kernel", "codes-recomputed"])
def test_compiled_fake_quant_hands_over_the_same_codes(method, options):
    x0 = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(1)).relu()
    layer = _layer("conv", method, options, x0)
    layer.input_quantizer.fused = layer.weight_quantizer.fused = True
    y0, gx0, gp0 = _grads(layer, x0, compact=False)
    y1, gx1, gp1 = _grads(layer, x0, compact=True)
    assert torch.equal(y0, y1) and torch.equal(gx0, gx1)
    for name in gp0:
        assert torch.equal(gp0[name], gp1[name]), name
