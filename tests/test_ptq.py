"""Post-training quantization: bias correction, bit allocation in quantizers, ACIQ auto, folding in quantize(), save/load."""

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import lowbit
from lowbit.cli import main
from lowbit.errors import RecipeError
from lowbit.quant import make_quantizer
from lowbit.quant.bias_correction import bias_correct
from lowbit.serialize import load, save
from lowbit.zoo import checkpoint_path, create_model


def weight(seed=0, shape=(6, 3, 3, 3)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * torch.rand(shape[0], 1, 1, 1, generator=g) + 0.05


def channel_moments(w):
    flat = w.reshape(w.shape[0], -1).double()
    return flat.mean(1), flat.std(1, unbiased=False)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_code_bias_correction_restores_mean_and_spread_exactly(bits):
    w = weight()
    q = make_quantizer("minmax", bits=bits, role="weight", granularity="channel", bias_correction=True)
    q.init_from(w)
    out = q(w)
    mean, std = channel_moments(w)
    qmean, qstd = channel_moments(out)
    assert torch.allclose(qmean, mean, atol=1e-6) and torch.allclose(qstd, std, rtol=1e-5)
    plain = make_quantizer("minmax", bits=bits, role="weight", granularity="channel")
    plain.init_from(w)
    assert (channel_moments(plain(w))[0] - mean).abs().max() > 1e-4  # there was a shift to correct
    # still the integer grid: the output is (codes - z) * s with codes in range
    codes = q.quantize_int(w)
    assert torch.equal(out, q.dequantize(codes)) and q.frozen
    assert codes.min() >= q.qmin and codes.max() <= q.qmax


def test_eq13_and_mean_modes_follow_their_formulas():
    w = weight(1)
    base = make_quantizer("minmax", bits=3, role="weight", granularity="channel")
    base.init_from(w)
    wq = base(w).reshape(6, -1).double()
    wf = w.reshape(6, -1).double()
    mu = wf.mean(1) - wq.mean(1)
    xi = (wf - wf.mean(1, keepdim=True)).norm(dim=1) / (wq - wq.mean(1, keepdim=True)).norm(dim=1)
    eq13 = make_quantizer("minmax", bits=3, role="weight", granularity="channel", bias_correction="eq13")
    eq13.init_from(w)
    assert torch.allclose(eq13(w).reshape(6, -1).double(), xi[:, None] * (wq + mu[:, None]), atol=1e-5)
    mean_only = make_quantizer("minmax", bits=3, role="weight", granularity="channel", bias_correction="mean")
    mean_only.init_from(w)
    assert torch.allclose(mean_only(w).reshape(6, -1).double(), wq + mu[:, None], atol=1e-5)


def test_bias_correction_of_a_per_tensor_grid_becomes_per_channel_and_frozen_ignores_new_weights():
    w = weight(2)
    q = make_quantizer("minmax", bits=4, role="weight", bias_correction=True)
    q.init_from(w)
    assert q.granularity.kind == "channel" and q.get_scale().shape == (6,)
    out = q(w)
    with pytest.raises(Exception, match="frozen codes"):
        q(torch.randn(2, 2))
    q.unfreeze()
    assert not q.frozen
    with pytest.raises(ValueError, match="weights only"):
        make_quantizer("minmax", bits=4, role="activation", bias_correction=True)
    with pytest.raises(ValueError, match="does not take"):
        make_quantizer("lsq", bits=4, role="weight", bias_correction=True)
    assert out.shape == w.shape


def test_bias_correction_constant_channel_is_its_mean():
    w = weight(3)
    w[2] = 0.3
    q = make_quantizer("minmax", bits=2, role="weight", granularity="channel")
    q.init_from(w)
    bias_correct(q, w)
    assert torch.allclose(q(w)[2], torch.full_like(w[2], 0.3), atol=1e-6)


def test_bit_allocation_in_a_quantizer_meets_the_budget_and_lowers_error():
    g = torch.Generator().manual_seed(0)
    spread = torch.logspace(-1.5, 0.5, 32)
    w = torch.randn(32, 64, generator=g) * spread[:, None]
    errs = {}
    for alloc in (False, "paper", "exact"):
        q = make_quantizer("minmax", bits=3, role="weight", granularity="channel", bit_allocation=alloc)
        q.init_from(w)
        errs[alloc] = (q(w) - w).pow(2).sum().item()
        if alloc:
            assert abs(q.mean_bits - 3) <= 0.05 and q.channel_bits.min() >= 0 and q.channel_bits.max() <= 8
            widest = q.channel_bits[spread.argmax()].item()
            assert widest > q.channel_bits[spread.argmin()].item()
            codes = q.quantize_int(w)
            qmin, qmax = q.qrange
            assert bool((codes >= qmin[:, None]).all() and (codes <= qmax[:, None]).all())
    assert errs["paper"] < errs[False] and errs["exact"] <= errs["paper"] * 1.05
    with pytest.raises(ValueError, match="granularity 'channel'"):
        make_quantizer("minmax", bits=3, role="weight", bit_allocation=True)
    with pytest.raises(ValueError, match="does not take"):
        make_quantizer("lsq", bits=3, role="weight", granularity="channel", bit_allocation=True)


def test_aciq_auto_picks_laplace_on_laplace_data_and_never_clips_uniform_data():
    g = torch.Generator().manual_seed(0)
    lap = torch.distributions.Laplace(0.0, 1.0)
    torch.manual_seed(0)
    laplace_batches = [lap.sample((4096,)) for _ in range(3)]
    q = make_quantizer("aciq", bits=3, role="activation", prior="auto", signed=True)
    for b in laplace_batches:
        q.observe(b)
    q.finalize()
    assert q.chosen_prior == "laplace"
    u = make_quantizer("aciq", bits=6, role="activation", prior="auto", signed=True)
    u.observe(torch.rand(8192, generator=g) * 2 - 1)
    u.finalize()
    # a bounded uniform: every candidate clip lies past the data, so the grid is the min-max one
    assert u.get_scale().item() == pytest.approx(2.0 / (2**6 - 1), rel=1e-3)


def tiny_cnn():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    return m.eval()


def test_quantize_folds_batch_norm_only_on_the_copy():
    model = tiny_cnn()
    data = [torch.randn(4, 1, 8, 8) for _ in range(2)]
    ref = model(data[0])
    q = lowbit.quantize(model, "ptq-w8a8" if False else {"weights": {"method": "minmax", "bits": 8},
                                                          "activations": {"method": "minmax", "bits": 8},
                                                          "ptq": {"fold_bn": True}}, calib_data=iter(data))
    assert q.lowbit_report.folded == [("0", "1"), ("3", "4")]
    assert q.lowbit_report.calibration_batches == 2  # the generator's first batch was not lost
    assert isinstance(model[1], nn.BatchNorm2d) and model[0].bias is None  # caller's model untouched
    assert torch.equal(model(data[0]), ref)
    assert (q(data[0]) - ref).abs().max() < 0.05 * ref.abs().max()
    with pytest.raises(RecipeError, match="needs calib_data"):
        lowbit.quantize(model, {"ptq": {"fold_bn": True}})
    with pytest.raises(RecipeError, match="'ptq' section"):
        lowbit.quantize(model, {"ptq": {"fold": True}}, calib_data=data)


def test_failed_inplace_quantize_unfolds():
    model = tiny_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = [torch.randn(4, 1, 8, 8), torch.full((4, 1, 8, 8), math.nan)]
    with pytest.raises(Exception, match="NaN"):
        lowbit.quantize(model, {"ptq": {"fold_bn": True}}, calib_data=bad, inplace=True)
    assert isinstance(model[1], nn.BatchNorm2d) and model[0].bias is None
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_save_and_load_quantized_round_trip(tmp_path):
    model = create_model("resnet20", in_size=8).eval()
    x = torch.randn(8, 1, 8, 8)
    q = lowbit.quantize(model, "ptq-w4a4-aciq", calib_data=[x, x * 0.5])
    save(q, tmp_path, model_name="resnet20", dataset="digits")
    back = load(tmp_path)
    assert torch.equal(back(x), q(x))
    assert back.layer1[0].conv1.input_quantizer.channel_bits.numel() == 16
    assert back.layer1[0].conv1.weight_quantizer.frozen
    (tmp_path / "lowbit.json").write_text('{"format": "other", "version": 9}')
    with pytest.raises(Exception, match="format"):
        load(tmp_path)


needs_fmnist = pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir()
                                  or not checkpoint_path("resnet20").is_file(),
                                  reason="Fashion-MNIST or the resnet20 checkpoint missing")


@needs_fmnist
def test_w4a4_all_methods_within_3_points_of_fp_and_above_min_max_on_real_data():
    """Issue 4's W4A4 target on ResNet-20, and the issue's test that PTQ beats min-max at 4 bits
    (measured on these 2,000 images: FP 94.80, min-max 94.00, all methods 94.25; deterministic)."""
    from lowbit.data import make_loader
    from lowbit.evaluate import evaluate
    from lowbit.zoo import pretrained
    model = pretrained("resnet20")
    calib = make_loader("fashion-mnist", "calib", 128, limit=256)
    test = make_loader("fashion-mnist", "test", 500, limit=2000)
    fp = evaluate(model, test)["top1"]
    naive = evaluate(lowbit.quantize(model, "ptq-w4a4-minmax", calib_data=calib), test)["top1"]
    best = evaluate(lowbit.quantize(model, "ptq-w4a4-aciq", calib_data=calib), test)["top1"]
    assert best > fp - 3.0 and best > naive


@needs_fmnist
def test_cli_ptq_prints_accuracy_and_saves(tmp_path, capsys):
    assert main(["ptq", "--model", "mlp", "--recipe", "ptq-w4a4-aciq", "--calib-images", "256",
                 "--no-evaluate", "--out", str(tmp_path / "q")]) == 0
    out = capsys.readouterr().out
    assert "aciq/ch" in out and "calibration + quantization" in out
    assert (tmp_path / "q" / "model.safetensors").is_file() and load(tmp_path / "q") is not None
