"""Batch-norm folding keeps the function and removes the norms."""

import pytest
import torch
from torch import nn

from lowbit.nn.fold import find_conv_bn_pairs, fold_batchnorm
from lowbit.zoo import create_model


def randomise_bn(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))
    return model.eval()


@pytest.mark.parametrize("name,expected_pairs", [("resnet20", 21), ("mobilenet", 13), ("vgg", 6)])
def test_fold_zoo_models_exactly(name, expected_pairs):
    torch.manual_seed(0)
    model = randomise_bn(create_model(name))
    x = torch.randn(4, 1, 28, 28)
    ref = model(x)
    pairs = fold_batchnorm(model, x)
    assert len(pairs) == expected_pairs
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert torch.allclose(model(x), ref, atol=1e-5)


def test_fold_formula_by_hand():
    conv, bn = nn.Conv2d(2, 3, 1, bias=True), nn.BatchNorm2d(3)
    model = randomise_bn(nn.Sequential(conv, bn))
    w, b = conv.weight.detach().clone(), conv.bias.detach().clone()
    factor = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    expected_b = bn.bias.detach() + (b - bn.running_mean) * factor
    fold_batchnorm(model, torch.randn(2, 2, 4, 4))
    assert torch.allclose(model[0].weight, w * factor.view(-1, 1, 1, 1))
    assert torch.allclose(model[0].bias, expected_b)
    assert isinstance(model[1], nn.Identity)


class SharedOutput(nn.Module):
    """The conv output feeds its BN and also a second path: folding would change the function."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_fold_refuses_and_restores_when_function_changes():
    model = randomise_bn(SharedOutput())
    x = torch.randn(2, 1, 5, 5)
    ref = model(x)
    w = model.conv.weight.detach().clone()
    assert find_conv_bn_pairs(model, x) == [("conv", "bn")]
    with pytest.raises(RuntimeError, match="restored"):
        fold_batchnorm(model, x)
    assert isinstance(model.bn, nn.BatchNorm2d) and torch.equal(model.conv.weight, w)
    assert torch.equal(model(x), ref)


def test_no_pairs_in_mlp():
    model = create_model("mlp").eval()
    assert fold_batchnorm(model, torch.randn(2, 1, 28, 28)) == []
