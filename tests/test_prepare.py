"""lowbit.quantize: copies, in-place, four model kinds, calibration forms, bad input, signedness, summary."""

import math

import pytest
import torch
from torch import nn

import lowbit
from lowbit.data import make_loader
from lowbit.errors import CalibrationError, RecipeError
from lowbit.nn import QuantMixin
from lowbit.prepare import input_quantizers
from lowbit.zoo import create_model



def minmax(bits, wgran="channel"):
    return {"weights": {"method": "minmax", "bits": bits, "granularity": wgran},
            "activations": {"method": "minmax", "bits": bits}}


W4_FIRST_LAST_8 = {"weights": {"method": "sawb", "bits": 4, "granularity": "channel"},
                   "activations": {"method": "pact", "bits": 4},
                   "layers": {"@first": {"weights": {"bits": 8}, "activations": {"bits": 8}},
                              "@last": {"weights": {"bits": 8}, "activations": {"bits": 8}}}}


# ----- models ---------------------------------------------------------------------------------

def randomize_bn(model, seed=0):
    """Give batch norms non-trivial running statistics (as a trained model has)."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model


class TinyEncoder(nn.Module):
    """torch's own transformer encoder (MultiheadAttention + linear1/linear2 feed-forward)."""

    def __init__(self, d=16, heads=2, layers=2, in_features=8, classes=4):
        super().__init__()
        self.embed = nn.Linear(in_features, d)
        layer = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers)
        self.head = nn.Linear(d, classes)

    def forward(self, x, mask=None):
        return self.head(self.encoder(self.embed(x), src_key_padding_mask=mask).mean(1))


class Attention(nn.Module):
    """Hand-written multi-head self-attention: four Linear layers and a softmax."""

    def __init__(self, d=16, heads=2):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        b, t, d = x.shape
        split = lambda y: y.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), dim=-1)
        return self.out((att @ v).transpose(1, 2).reshape(b, t, d))


def make(kind):
    torch.manual_seed(0)
    if kind == "resnet20":
        return randomize_bn(create_model("resnet20", in_size=8)).eval()
    if kind == "mobilenet":
        return randomize_bn(create_model("mobilenet", in_size=8)).eval()
    if kind == "encoder":
        return TinyEncoder().eval()
    return Attention().eval()


def batches(kind, n=3, size=16, seed=1):
    gen = torch.Generator().manual_seed(seed)
    shape = (size, 1, 8, 8) if kind in ("resnet20", "mobilenet") else (size, 5, 8 if kind == "encoder" else 16)
    return [torch.randn(*shape, generator=gen) for _ in range(n)]


KINDS = ["resnet20", "mobilenet", "encoder", "attention"]
EXPECTED_QUANTIZED = {
    "encoder": {"embed", "head", "encoder.layers.0.linear1", "encoder.layers.0.linear2",
                "encoder.layers.1.linear1", "encoder.layers.1.linear2"},
    "attention": {"q", "k", "v", "out"},
}


def conv_linear_names(model):
    return [n for n, m in model.named_modules() if type(m) in (nn.Conv1d, nn.Conv2d, nn.Linear)]


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def snapshot(model):
    return {"modules": [(n, id(m), type(m)) for n, m in model.named_modules()],
            "state": {k: v.clone() for k, v in model.state_dict().items()},
            "params": [(n, id(p)) for n, p in model.named_parameters()],
            "training": [m.training for m in model.modules()],
            "flags": [(getattr(m, "activation_relu_or_gelu", None), getattr(m, "use_nested_tensor", None))
                      for m in model.modules()]}


def assert_unchanged(model, snap, x, want):
    assert snapshot(model)["modules"] == snap["modules"]
    assert snapshot(model)["params"] == snap["params"]
    assert snapshot(model)["training"] == snap["training"]
    assert snapshot(model)["flags"] == snap["flags"]
    state = model.state_dict()
    assert state.keys() == snap["state"].keys()
    assert all(torch.equal(state[k], snap["state"][k]) for k in state)
    assert not any(isinstance(m, QuantMixin) for m in model.modules())
    assert not hasattr(model, "lowbit_report")
    with torch.no_grad():
        assert torch.equal(model(x), want)


# ----- copy / in place ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_quantize_returns_a_copy_and_leaves_the_model_unchanged(kind):
    model = make(kind)
    x = batches(kind, 1, seed=5)[0]
    with torch.no_grad():
        want = model(x)
    snap = snapshot(model)
    q = lowbit.quantize(model, minmax(4), calib_data=batches(kind))
    assert q is not model
    assert_unchanged(model, snap, x, want)
    assert any(isinstance(m, QuantMixin) for m in q.modules())
    assert all(p is not p0 for p, p0 in zip(q.parameters(), model.parameters()))


def test_inplace_modifies_the_model():
    model = make("resnet20")
    names = conv_linear_names(model)
    weight = model.conv1.weight
    q = lowbit.quantize(model, minmax(8), calib_data=batches("resnet20"), inplace=True)
    assert q is model
    assert all(isinstance(model.get_submodule(n), QuantMixin) for n in names)
    assert model.conv1.weight is weight  # the float parameters are kept, not copied
    assert model.lowbit_report.calibration_batches == 3


# ----- four model kinds -----------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_model_kinds_accuracy_summary_and_calibration(kind):
    model = make(kind)
    x = batches(kind, 1, size=32, seed=7)[0]
    with torch.no_grad():
        ref = model(x)
    expected = EXPECTED_QUANTIZED.get(kind, set(conv_linear_names(model)))
    errors = {}
    for bits in (4, 8):
        q = lowbit.quantize(model, minmax(bits), calib_data=batches(kind))
        report = q.lowbit_report
        assert set(report.quantized) == expected
        assert report.calibration_batches == 3
        quantizers = input_quantizers(q)
        assert set(quantizers) == expected
        assert all(bool(aq.initialized) for aq in quantizers.values())
        with torch.no_grad():
            out = q(x)
        assert torch.isfinite(out).all()
        errors[bits] = rel_err(out, ref)
        # the summary lists every quantized layer with its bits and method
        s = lowbit.summary(q)
        rows = {r.name: r for r in s.rows}
        assert set(rows) == expected
        assert all(r.weight == f"{bits}b minmax/ch" and r.activation == f"{bits}b minmax" for r in rows.values())
        text = str(s)
        assert all(name in text for name in expected)
    assert errors[4] > 0.01, errors
    assert errors[8] < 0.05, errors
    assert errors[8] < errors[4] / 3, errors


def test_transformer_encoder_attention_projections_are_left_float():
    model = make("encoder")
    q = lowbit.quantize(model, minmax(8), calib_data=batches("encoder"))
    left = q.lowbit_report.left_float
    for i in range(2):
        attn = f"encoder.layers.{i}.self_attn"
        assert attn in left and "in_proj" in left[attn]
        assert f"{attn}.out_proj" in left
        assert not isinstance(q.get_submodule(f"{attn}.out_proj"), QuantMixin)
        assert isinstance(q.get_submodule(f"encoder.layers.{i}.linear1"), QuantMixin)
        assert isinstance(q.get_submodule(f"encoder.layers.{i}.linear2"), QuantMixin)
    text = str(lowbit.summary(q))
    assert "left float: encoder.layers.0.self_attn.out_proj" in text


def count_quantizer_calls(model):
    calls = []
    for name, m in model.named_modules():  # wrap forward on the instance: no hooks (hooks disable the fast path)
        if isinstance(m, QuantMixin) and m.input_quantizer is not None:
            original = m.input_quantizer.forward
            m.input_quantizer.forward = (lambda f, n: lambda x: (calls.append(n), f(x))[1])(original, name)
    return calls


def test_transformer_encoder_fast_path_does_not_bypass_quantization():
    """torch's TransformerEncoderLayer takes a fused kernel in eval mode under no_grad, reading linear1/linear2
    weights directly; lowbit.quantize must keep it from skipping the quantized forwards (and calibration)."""
    model = make("encoder")
    x = batches("encoder", 1, seed=9)[0]
    q = lowbit.quantize(model, minmax(3), calib_data=batches("encoder"))
    inner = [f"encoder.layers.{i}.linear{j}" for i in range(2) for j in (1, 2)]
    # calibration (eval + no_grad) reached the feed-forward layers
    assert all(bool(q.get_submodule(n).input_quantizer.initialized) for n in inner)
    # every quantized layer runs its input quantizer in an eval, no-grad forward
    calls = count_quantizer_calls(q)
    with torch.no_grad():
        out = q(x)
    assert sorted(calls) == sorted(EXPECTED_QUANTIZED["encoder"])
    # same as the reference slow path (fast paths off globally)
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        with torch.no_grad():
            slow = q(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    torch.testing.assert_close(out, slow, rtol=1e-5, atol=1e-5)
    # the feed-forward quantizers change the eval output
    for n in inner:
        q.get_submodule(n).input_quantizer.enabled = False
        q.get_submodule(n).weight_quantizer.enabled = False
    with torch.no_grad():
        without_inner = q(x)
    assert rel_err(out, without_inner) > 1e-3
    # a padding mask (torch's nested-tensor path) goes through the quantizers too
    for n in inner:
        q.get_submodule(n).input_quantizer.enabled = True
        q.get_submodule(n).weight_quantizer.enabled = True
    mask = torch.zeros(x.shape[0], x.shape[1], dtype=torch.bool)
    mask[:, -2:] = True
    calls.clear()
    with torch.no_grad():
        masked = q(x, mask)
    assert sorted(calls) == sorted(EXPECTED_QUANTIZED["encoder"]) and torch.isfinite(masked).all()
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        with torch.no_grad():
            torch.testing.assert_close(masked, q(x, mask), rtol=1e-5, atol=1e-5)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    # the float model keeps its fast path
    assert model.encoder.layers[0].activation_relu_or_gelu and model.encoder.use_nested_tensor


def test_hand_written_attention_all_four_linears_quantized():
    model = make("attention")
    q = lowbit.quantize(model, minmax(4), calib_data=batches("attention"))
    assert q.lowbit_report.left_float == {}
    for name in ("q", "k", "v", "out"):
        layer = getattr(q, name)
        assert isinstance(layer, QuantMixin) and layer.weight_quantizer.bits == 4
    assert q.q.input_quantizer.signed and q.out.input_quantizer.signed


# ----- calibration data forms -----------------------------------------------------------------

def test_calibration_forms_list_pairs_and_calib_batches():
    model = make("resnet20")
    data = batches("resnet20", 3)
    x = batches("resnet20", 1, seed=11)[0]
    q_list = lowbit.quantize(model, minmax(4), calib_data=data)
    q_pairs = lowbit.quantize(model, minmax(4), calib_data=[(b, torch.zeros(len(b), dtype=torch.long)) for b in data])
    q_gen = lowbit.quantize(model, minmax(4), calib_data=(b for b in data))
    assert q_list.lowbit_report.calibration_batches == q_pairs.lowbit_report.calibration_batches == 3
    assert q_gen.lowbit_report.calibration_batches == 3
    with torch.no_grad():
        assert torch.equal(q_list(x), q_pairs(x)) and torch.equal(q_list(x), q_gen(x))
    q_two = lowbit.quantize(model, minmax(4), calib_data=data, calib_batches=2)
    q_first_two = lowbit.quantize(model, minmax(4), calib_data=data[:2])
    q_one = lowbit.quantize(model, minmax(4), calib_data=data, calib_batches=1)
    assert q_two.lowbit_report.calibration_batches == 2 and q_one.lowbit_report.calibration_batches == 1
    with torch.no_grad():
        assert torch.equal(q_two(x), q_first_two(x))
    # min-max grids span every batch seen: the third batch widens at least one range
    scales3 = {n: aq.get_scale().clone() for n, aq in input_quantizers(q_list).items()}
    scales2 = {n: aq.get_scale().clone() for n, aq in input_quantizers(q_two).items()}
    assert all((scales3[n] >= scales2[n]).all() for n in scales3)
    assert any((scales3[n] > scales2[n]).any() for n in scales3)


def test_calibration_with_dict_batches():
    model = make("attention")
    data = batches("attention", 2)
    q = lowbit.quantize(model, minmax(8), calib_data=[{"x": b} for b in data])
    q_ref = lowbit.quantize(model, minmax(8), calib_data=data)
    assert q.lowbit_report.calibration_batches == 2
    x = batches("attention", 1, seed=3)[0]
    with torch.no_grad():
        assert torch.equal(q(x), q_ref(x))


def test_calibration_with_digits_loader():
    loader = make_loader("digits", "calib", 32)
    model = make("resnet20")
    q = lowbit.quantize(model, W4_FIRST_LAST_8, calib_data=loader)
    assert q.lowbit_report.calibration_batches == len(loader) == math.ceil(180 / 32)
    assert all(bool(aq.initialized) for aq in input_quantizers(q).values())
    q2 = lowbit.quantize(model, W4_FIRST_LAST_8, calib_data=loader, calib_batches=2)
    assert q2.lowbit_report.calibration_batches == 2
    x, _ = next(iter(loader))
    with torch.no_grad():
        out, ref = q(x), model(x)
    assert torch.isfinite(out).all() and rel_err(out, ref) < 0.5


# ----- signedness -----------------------------------------------------------------------------

def test_signedness_first_conv_signed_inner_unsigned():
    loader = make_loader("digits", "calib", 32)
    q = lowbit.quantize(make("resnet20"), minmax(8), calib_data=loader, calib_batches=2)
    quantizers = input_quantizers(q)
    assert quantizers["conv1"].signed is True and quantizers["conv1"].qrange == (-128, 127)
    inner = {n: aq for n, aq in quantizers.items() if n != "conv1"}
    assert len(inner) == 21
    assert all(aq.signed is False and aq.qrange == (0, 255) for aq in inner.values()), \
        {n: aq.signed for n, aq in inner.items()}
    # weights are signed grids whatever the data
    assert all(m.weight_quantizer.signed is True for m in q.modules() if isinstance(m, QuantMixin))


# ----- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("kind", ["resnet20", "encoder"])
def test_nan_in_calibration_data_names_layer_and_leaves_model(kind, inplace):
    model = make(kind)
    model.train()  # the failed call must restore the mode as well
    x = batches(kind, 1, seed=5)[0]
    model.eval()
    with torch.no_grad():
        want = model(x)
    model.train()
    snap = snapshot(model)
    data = batches(kind, 3)
    data[1] = data[1].clone()
    data[1][0, 0, 0] = float("nan")
    first = "conv1" if kind == "resnet20" else "embed"
    with pytest.raises(CalibrationError, match=first):
        lowbit.quantize(model, minmax(4), calib_data=data, inplace=inplace)
    assert [m.training for m in model.modules()] == snap["training"]
    model.eval()
    snap["training"] = [False] * len(snap["training"])
    assert_unchanged(model, snap, x, want)
    # the model still quantizes fine afterwards
    q = lowbit.quantize(model, minmax(4), calib_data=batches(kind, 2), inplace=inplace)
    assert q.lowbit_report.calibration_batches == 2


@pytest.mark.parametrize("inplace", [False, True])
def test_empty_calibration_data(inplace):
    model = make("resnet20")
    x = batches("resnet20", 1)[0]
    with torch.no_grad():
        want = model(x)
    snap = snapshot(model)
    for empty in ([], iter(()), ()):
        with pytest.raises(CalibrationError, match="no batches"):
            lowbit.quantize(model, minmax(8), calib_data=empty, inplace=inplace)
        assert_unchanged(model, snap, x, want)
    with pytest.raises(CalibrationError, match="no batches"):
        lowbit.quantize(model, minmax(8), calib_data=batches("resnet20"), calib_batches=0, inplace=inplace)
    assert_unchanged(model, snap, x, want)


def test_bad_batch_type():
    with pytest.raises(CalibrationError, match="int"):
        lowbit.quantize(make("attention"), minmax(8), calib_data=[3])


def test_model_without_conv_or_linear():
    with pytest.raises(RecipeError, match="no Conv1d/Conv2d/Linear"):
        lowbit.quantize(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)))
    # nothing swappable: only a MultiheadAttention
    with pytest.raises(RecipeError, match="MultiheadAttention"):
        lowbit.quantize(nn.MultiheadAttention(8, 2))


def test_quantizing_twice_is_refused():
    model = make("attention")
    q = lowbit.quantize(model, minmax(8), calib_data=batches("attention"))
    with pytest.raises(RecipeError, match="already quantized"):
        lowbit.quantize(q, minmax(4))
    with pytest.raises(RecipeError, match="already quantized"):
        lowbit.quantize(q, minmax(4), inplace=True)
    assert all(m.weight_quantizer.bits == 8 for m in q.modules() if isinstance(m, QuantMixin))


def test_bad_recipe_inplace_leaves_model():
    model = make("resnet20")
    x = batches("resnet20", 1)[0]
    with torch.no_grad():
        want = model(x)
    snap = snapshot(model)
    # fails while building the quantizer of a later layer, after earlier layers were swapped
    recipe = {"layers": {"fc": {"activations": {"method": "sawb"}}}}
    with pytest.raises(RecipeError, match="fc"):
        lowbit.quantize(model, recipe, inplace=True)
    assert_unchanged(model, snap, x, want)


@pytest.mark.parametrize("recipe", [minmax(4), W4_FIRST_LAST_8,
                                    {"weights": {"method": "lsq", "bits": 4},
                                     "activations": {"method": "lsq", "bits": 4}},
                                    {"weights": {"method": "minmax", "bits": 4},
                                     "activations": {"method": "percentile", "bits": 4}}],
                         ids=["minmax", "sawb-pact", "lsq", "percentile"])
@pytest.mark.parametrize("value", [0.0, 0.7, -1.3])
def test_constant_input_gives_finite_outputs(recipe, value):
    model = make("resnet20")
    const = [torch.full((8, 1, 8, 8), value) for _ in range(2)]
    q = lowbit.quantize(model, recipe, calib_data=const)
    assert all(torch.isfinite(aq.get_scale()).all() and (aq.get_scale() > 0).all()
               for aq in input_quantizers(q).values())
    with torch.no_grad():
        assert torch.isfinite(q(const[0])).all()
        assert torch.isfinite(q(batches("resnet20", 1)[0])).all()


# ----- summary and stored size ----------------------------------------------------------------

def test_summary_lists_layers_with_bits_and_methods():
    model = make("resnet20")
    q = lowbit.quantize(model, W4_FIRST_LAST_8, calib_data=batches("resnet20", 1))
    s = lowbit.summary(q)
    text = str(s)
    names = conv_linear_names(model)
    assert [r.name for r in s.rows] == names
    for r in s.rows:
        bits = 8 if r.name in ("conv1", "fc") else 4
        assert r.weight == f"{bits}b sawb/ch" and r.activation == f"{bits}b pact", r
        line = next(line for line in text.splitlines() if line.startswith(r.name + " "))
        assert r.weight in line and r.activation in line
        assert r.params == sum(p.numel() for p in model.get_submodule(r.name).parameters())
    assert s.rows[0].kind == "Conv2d" and s.rows[-1].kind == "Linear"


def expected_stored_bytes(model, weight_bits: dict[str, int]) -> int:
    """summary.py's formula, from the float model: quantized weights at their bits, one fp32 step and one fp32
    zero point per output channel (SAWB's even level set has z = (2^b - 1)/2 != 0), fp32 biases, one activation
    step + zero point (64 bits) per layer, every other float tensor at 32 bits."""
    bits, counted = 0.0, set()
    for name, bw in weight_bits.items():
        m = model.get_submodule(name)
        out_channels = m.weight.shape[0]
        bits += bw * m.weight.numel() + 32 * out_channels + 32 * out_channels + 64
        counted.add(id(m.weight))
        if m.bias is not None:
            bits += 32 * m.bias.numel()
            counted.add(id(m.bias))
    rest = sum(t.numel() for t in list(model.parameters()) + list(model.buffers())
               if t.is_floating_point() and id(t) not in counted)
    return int(round(bits / 8 + 4 * rest))


def test_stored_size_of_w4_resnet20():
    model = make("resnet20")
    q = lowbit.quantize(model, W4_FIRST_LAST_8, calib_data=batches("resnet20", 1))
    names = conv_linear_names(model)
    weight_bits = {n: 8 if n in ("conv1", "fc") else 4 for n in names}
    expected = expected_stored_bytes(model, weight_bits)
    assert lowbit.stored_size_bytes(q) == expected
    fp32 = 4 * sum(t.numel() for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point())
    assert lowbit.summary(q).fp32_bytes == fp32
    assert fp32 / 8 < expected < fp32 / 6
    # all-float recipe: the stored size is the fp32 size; 8 bits everywhere is a little over a quarter of it
    q8 = lowbit.quantize(model, {"weights": {"method": "minmax", "bits": 8, "granularity": "channel"},
                                 "activations": None}, calib_data=batches("resnet20", 1))
    size8 = lowbit.stored_size_bytes(q8)
    assert fp32 / 4 < size8 < fp32 / 3.5
    assert lowbit.stored_size_bytes(model) == fp32


# ----- embedding tables of nn.Embedding subclasses ----------------------------------------------

class ScaledEmbedding(nn.Embedding):
    """Gemma's kind of table: the lookup times a constant, through ``super().forward``."""

    def forward(self, ids):
        return super().forward(ids) * 3.0


class DirectEmbedding(nn.Embedding):
    """A table read around ``nn.Embedding.forward``: lowbit cannot put its grid in the way."""

    def forward(self, ids):
        return nn.functional.embedding(ids, self.weight) * 3.0


class TableNet(nn.Module):
    def __init__(self, table):
        super().__init__()
        self.table, self.head = table, nn.Linear(8, 4)

    def forward(self, ids):
        return self.head(self.table(ids))


EMBEDDINGS_8 = {**minmax(8), "embeddings": {"method": "minmax", "bits": 4, "granularity": "channel"}}


def test_an_embedding_subclass_keeps_its_forward_on_the_quantized_table():
    torch.manual_seed(0)
    model = TableNet(ScaledEmbedding(16, 8))
    ids = torch.arange(16).reshape(2, 8)
    q = lowbit.quantize(model, EMBEDDINGS_8, calib_data=[ids])
    table = q.table
    assert isinstance(table, ScaledEmbedding) and isinstance(table, lowbit.nn.QuantEmbedding)
    assert "table" in q.lowbit_report.quantized
    grid = table.weight_quantizer(table.weight).detach()
    with torch.no_grad():
        looked_up = table(ids)
    torch.testing.assert_close(looked_up, grid[ids] * 3.0, rtol=0, atol=0)  # the subclass's scale, on the grid
    assert not torch.equal(looked_up, model.table(ids))  # 4-bit rows differ from the float ones
    back = table.to_float()
    assert type(back) is ScaledEmbedding and back.weight is table.weight


def test_an_embedding_subclass_that_reads_around_the_lookup_is_refused():
    model = TableNet(DirectEmbedding(16, 8))
    with pytest.raises(RecipeError, match=r"table is a .*DirectEmbedding, whose forward does not look its ids up "
                                          r"through nn.Embedding.forward.*drop the recipe's embeddings section"):
        lowbit.quantize(model, EMBEDDINGS_8, calib_data=[torch.arange(8)[None]], inplace=True)
    assert type(model.table) is DirectEmbedding and type(model.head) is nn.Linear  # the swap was undone
