"""ONNX QDQ export, run in onnxruntime (skipped when onnx / onnxruntime are not installed)."""

import numpy as np
import pytest
import torch

import lowbit
from lowbit.data import make_loader
from lowbit.zoo import create_model

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from lowbit.deploy.onnx import to_onnx  # noqa: E402


@pytest.fixture(scope="module")
def data():
    calib = list(make_loader("digits", "calib", 64, limit=64))
    x = next(iter(make_loader("digits", "test", 64)))[0]
    return calib, x


def _session(model, optimized=None, optimize=True):
    so = ort.SessionOptions()
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    if optimized:
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _run(model, x, optimize=True):
    return torch.from_numpy(_session(model, optimize=optimize).run(None, {"input": x.numpy()})[0])


@pytest.mark.parametrize("name,recipe", [("resnet20", "ptq-w4a4-aciq"), ("mobilenet", "pact-sawb-w2a2"),
                                         ("vgg", "ptq-w8a8"), ("mlp", "ptq-w4a4-minmax")])
def test_qdq_model_runs_in_onnxruntime_like_the_quantized_model(name, recipe, data, tmp_path):
    calib, x = data
    torch.manual_seed(0)
    qmodel = lowbit.quantize(create_model(name, in_size=8).eval(), recipe, calib_data=calib).eval()
    lowbit.export(qmodel, tmp_path)
    model = to_onnx(tmp_path, tmp_path / "model.onnx", input_shape=[1, 1, 8, 8])
    assert (tmp_path / "model.onnx").is_file()
    ops = [n.op_type for n in model.graph.node]
    n_layers = len(lowbit.deploy.read_export(tmp_path).graph.layers)
    assert ops.count("QuantizeLinear") >= 1 and ops.count("DequantizeLinear") >= n_layers
    # every Conv/Gemm weight comes out of a DequantizeLinear of integer codes, none is a float initializer
    produced = {o: n.op_type for n in model.graph.node for o in n.output}
    for n in model.graph.node:
        if n.op_type in ("Conv", "Gemm") and "_ones" not in n.input[1]:
            assert produced.get(n.input[1]) == "DequantizeLinear", n.name
    with torch.no_grad():
        deployed, fake = lowbit.load_export(tmp_path)(x), qmodel(x)
    # as written, the graph computes what the reloaded model computes (up to float order: a rare code flip)
    plain = _run(model, x, optimize=False)
    assert (plain - deployed).abs().mean() < 1e-3 * deployed.abs().max()
    assert (plain.argmax(1) == deployed.argmax(1)).float().mean() >= 0.98
    # optimized, onnxruntime fuses QDQ patterns into integer kernels (biases rounded to int32 there)
    got = _run(model, x)
    assert torch.allclose(got, fake, atol=0.05 * fake.abs().max().item())
    assert (got.argmax(1) == fake.argmax(1)).float().mean() >= 0.95


def test_narrow_grids_are_clipped_into_8_bit_containers(data):
    calib, _ = data
    torch.manual_seed(0)
    qmodel = lowbit.quantize(create_model("mlp", in_size=8).eval(), "ptq-w4a4-minmax", calib_data=calib)
    model = to_onnx(qmodel)
    inits = {i.name: i for i in model.graph.initializer}
    q_types = {onnx.helper.tensor_dtype_to_np_dtype(inits[n.input[2]].data_type)
               for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert q_types <= {np.dtype(np.int8), np.dtype(np.uint8)}
    assert [n.op_type for n in model.graph.node].count("Clip") == 1  # only the 4-bit hidden layer's input
    w = onnx.numpy_helper.to_array(inits["net_3_weight_q"])  # 4-bit codes times 16 (4-bit inputs: all of int8)
    codes = qmodel.net[3].weight_quantizer.quantize_int(qmodel.net[3].weight).numpy()
    assert w.dtype == np.int8 and np.array_equal(w, codes * 16)
    scale = onnx.numpy_helper.to_array(inits["net_3_weight_scale"])
    assert np.array_equal(scale * 16, qmodel.net[3].weight_quantizer.scale.numpy())


def test_float_model_exports_plain_fp32(data):
    _, x = data
    torch.manual_seed(0)
    model = create_model("resnet20", in_size=8).eval()
    onnx_model = to_onnx(model)
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in onnx_model.graph.node)
    with torch.no_grad():
        assert torch.allclose(_run(onnx_model, x), model(x), atol=1e-4)


def test_quantized_residuals_fuse_every_conv(data, tmp_path):
    """The speed option: with residual additions quantized too, onnxruntime runs every conv as QLinearConv."""
    calib, x = data
    torch.manual_seed(0)
    qmodel = lowbit.quantize(create_model("resnet20", in_size=8).eval(), "ptq-w8a8", calib_data=calib).eval()
    model = to_onnx(qmodel, input_shape=[1, 1, 8, 8], quantize_residual=True, calib_data=calib)
    out = tmp_path / "optimized.onnx"
    got = torch.from_numpy(_session(model, out).run(None, {"input": x.numpy()})[0])
    fused = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert fused.count("QLinearConv") == 21 and "Conv" not in fused
    with torch.no_grad():
        assert (got.argmax(1) == qmodel(x).argmax(1)).float().mean() >= 0.9
    with pytest.raises(lowbit.deploy.ExportError, match="calib_data"):
        to_onnx(qmodel, quantize_residual=True)
