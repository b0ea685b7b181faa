"""Mixed precision cost model: MACs against hand counts, stored bits, bit-operations, totals."""

import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import RecipeError
from lowbit.mixed.cost import CostModel, count_macs, parse_precision, precision_label

torch.set_num_threads(1)


class Zoo(nn.Module):
    """One of each: strided padded conv, depthwise conv, grouped 1x1 conv, conv1d, linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)               # 10x10 -> 5x5
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)     # depthwise, 5x5
        self.gconv = nn.Conv2d(8, 4, 1, groups=2)                         # 2 groups of 4 -> 2
        self.unpadded = nn.Conv2d(4, 6, (3, 2), stride=(1, 2))            # 5x5 -> 3x2
        self.c1 = nn.Conv1d(6, 5, 3, dilation=2)                          # length 6 -> 2
        self.fc = nn.Linear(10, 7)

    def forward(self, x):
        x = self.unpadded(self.gconv(self.dw(self.conv(x))))              # [N, 6, 3, 2]
        x = self.c1(x.flatten(2))                                         # [N, 5, 2]
        return self.fc(x.flatten(1))


HAND = {  # out elements per example * (in_channels / groups) * kernel elements
    "conv": 8 * 5 * 5 * 3 * 9,
    "dw": 8 * 5 * 5 * 1 * 9,
    "gconv": 4 * 5 * 5 * 4 * 1,
    "unpadded": 6 * 3 * 2 * 4 * 6,
    "c1": 5 * 2 * 6 * 3,
    "fc": 7 * 10,
}


@pytest.mark.parametrize("batch", [1, 3])
def test_macs_match_hand_counts(batch):
    macs = count_macs(Zoo(), torch.randn(batch, 3, 10, 10))
    assert macs == HAND


def test_linear_counts_every_leading_position():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    macs = count_macs(model, torch.randn(2, 5, 16))  # 5 tokens per example
    assert macs == {"0": 5 * 16 * 32, "2": 5 * 32 * 4}


def test_layer_called_twice_counts_twice():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(self.fc(x))

    assert count_macs(Twice(), torch.randn(1, 4)) == {"fc": 2 * 16}


def test_stored_bits_bitops_and_totals():
    cm = CostModel.from_model(Zoo(), torch.randn(1, 3, 10, 10))
    conv, fc = cm.layers["conv"], cm.layers["fc"]
    assert conv.params == 8 * 3 * 9 and conv.kind == "Conv2d"
    assert conv.size_bits((4, 8)) == 8 * 3 * 9 * 4
    assert conv.bitops((4, 8)) == HAND["conv"] * 32
    assignment = {"conv": 8, "fc": "w2a4"}
    assert cm.cost(assignment, "bitops") == HAND["conv"] * 64 + HAND["fc"] * 8
    assert cm.cost(assignment, "size") == conv.params * 8 + fc.params * 2
    t = cm.totals(assignment)
    assert t["macs"] == HAND["conv"] + HAND["fc"]
    assert t["mean_w_bits"] == pytest.approx((conv.params * 8 + fc.params * 2) / (conv.params + fc.params))


def test_tracing_changes_no_state():
    """Tracing a quantized model: quantizers disabled (no self-initialisation), BN statistics kept."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
    qmodel = lowbit.quantize(model, {"weights": {"method": "lsq", "bits": 4}, "activations": {"method": "lsq",
                                                                                               "bits": 4}})
    qmodel.train()
    bn = qmodel[1].running_mean.clone()
    macs = count_macs(qmodel, torch.randn(2, 1, 8, 8))
    assert macs == {"0": 4 * 36 * 9, "4": 3 * 144}
    assert not bool(qmodel[0].input_quantizer.initialized)
    assert torch.equal(qmodel[1].running_mean, bn) and qmodel.training


def test_unreached_layer_warns_and_counts_zero():
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x):
            return self.used(x)

    with pytest.warns(UserWarning, match="unused"):
        assert count_macs(Skip(), torch.randn(1, 3)) == {"used": 9, "unused": 0}


def test_bitops_need_an_example_for_conv_models():
    with pytest.raises(RecipeError, match="example_input"):
        CostModel.from_model(Zoo(), None, metric="bitops")
    cm = CostModel.from_model(Zoo(), None, metric="size")  # size needs only parameter counts
    assert cm.layers["fc"].params == 70
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 2))
    assert CostModel.from_model(mlp).layers["1"].macs == 64 * 8  # an MLP gets zeros(1, in_features)


@pytest.mark.parametrize("text, expected", [(4, (4, 4)), ("2", (2, 2)), ("w4a8", (4, 8)), ("W2A4", (2, 4)),
                                            ("4/8", (4, 8)), ((3, 5), (3, 5))])
def test_parse_precision(text, expected):
    assert parse_precision(text) == expected
    assert precision_label(expected) == f"w{expected[0]}a{expected[1]}"


@pytest.mark.parametrize("bad", [0, 17, "four", (4,), True, 4.0])
def test_parse_precision_rejects(bad):
    with pytest.raises(RecipeError):
        parse_precision(bad)
