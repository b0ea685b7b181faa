"""evaluate() and the per-layer SQNR report."""

import math

import pytest
import torch
from torch import nn

import lowbit
from lowbit.evaluate import evaluate, sqnr_db, sqnr_report


class FixedLogits(nn.Module):
    """Returns the logits stored for each sample index (the input holds the index)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits[x.long().view(-1)]


def test_evaluate_top1_top5_loss_by_hand():
    logits = torch.tensor([[5.0, 4, 3, 2, 1, 0], [0.0, 1, 2, 3, 4, 5], [1.0, 0, 0, 0, 0, 0]])
    labels = torch.tensor([0, 0, 5])  # right at top-1; outside top-5; rank 2..6 tie -> check below
    batches = [(torch.tensor([[0.0], [1.0]]), labels[:2]), (torch.tensor([[2.0]]), labels[2:])]
    m = evaluate(FixedLogits(logits), batches)
    expected_loss = nn.functional.cross_entropy(logits, labels).item()
    assert m["n"] == 3
    assert m["top1"] == pytest.approx(100 / 3)
    top5 = logits.topk(5, 1).indices
    assert m["top5"] == pytest.approx(100 * (top5 == labels[:, None]).any(1).float().mean().item())
    assert m["loss"] == pytest.approx(expected_loss, rel=1e-6)


def test_evaluate_empty_loader_raises():
    with pytest.raises(ValueError, match="no batches"):
        evaluate(nn.Linear(2, 2), [])


def test_sqnr_db_values():
    assert sqnr_db(100.0, 1.0) == pytest.approx(20.0)
    assert sqnr_db(1.0, 0.0) == math.inf


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(inplace=True), nn.Linear(32, 8)).eval()


def test_sqnr_report_grows_with_bits_and_is_infinite_without_quantization():
    model = _mlp()
    data = [torch.randn(64, 16) for _ in range(3)]
    rows = {}
    for bits in (4, 8):
        recipe = {"weights": {"method": "minmax", "bits": bits}, "activations": {"method": "minmax", "bits": bits}}
        q = lowbit.quantize(model, recipe, calib_data=data)
        rows[bits] = sqnr_report(model, q, data)
    for r4, r8 in zip(rows[4], rows[8]):
        assert r4["layer"] == r8["layer"]
        # each extra bit buys about 6 dB; 4 extra bits comfortably more than 15 dB
        assert r8["weight_sqnr_db"] > r4["weight_sqnr_db"] + 15
        assert r8["output_sqnr_db"] > r4["output_sqnr_db"] + 10
    q = lowbit.quantize(model, {"weights": {"method": "minmax", "bits": 8}, "activations": None}, calib_data=data)
    for m in q.modules():
        if hasattr(m, "weight_quantizer") and m.weight_quantizer is not None:
            m.weight_quantizer.enabled = False
    assert all(r["output_sqnr_db"] == math.inf for r in sqnr_report(model, q, data))


def test_sqnr_report_in_place_relu_does_not_corrupt_reference():
    model = _mlp()
    data = [torch.randn(64, 16)]
    q = lowbit.quantize(model, {"weights": {"method": "minmax", "bits": 8},
                                "activations": {"method": "minmax", "bits": 8}}, calib_data=data)
    first = sqnr_report(model, q, data)[0]
    assert first["output_sqnr_db"] > 30  # 8-bit: high SQNR, not the garbage an in-place ReLU would cause


def test_sqnr_report_rejects_unrelated_float_model():
    model = _mlp()
    q = lowbit.quantize(model, None, calib_data=[torch.randn(8, 16)])
    with pytest.raises(ValueError, match="float model has no layer"):
        sqnr_report(nn.Sequential(nn.Linear(16, 8)), q, [torch.randn(8, 16)])


def test_sqnr_report_compares_folded_layers_with_the_batch_norm_output():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    with torch.no_grad():  # a norm far from identity: comparing against the raw conv output would read ~0 dB
        model[1].running_mean.uniform_(-2, 2)
        model[1].running_var.uniform_(0.1, 4)
        model[1].weight.uniform_(0.5, 3)
    data = [torch.randn(16, 3, 10, 10) for _ in range(2)]
    recipe = {"weights": {"method": "minmax", "bits": 12}, "activations": {"method": "minmax", "bits": 12},
              "ptq": {"fold_bn": True}}
    q = lowbit.quantize(model, recipe, calib_data=data)
    assert q.lowbit_report.folded == [("0", "1")]
    rows = sqnr_report(model, q, data)
    assert [r["layer"] for r in rows] == ["0", "3"]
    assert all(r["output_sqnr_db"] > 50 for r in rows)  # 12 bits: about 6 dB per bit
