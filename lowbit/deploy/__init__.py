"""Deployment: packed integer export, the integer reference engine, ONNX QDQ.

    import lowbit
    lowbit.export(qmodel, "out/")                  # model.safetensors (packed ints + grids) + manifest.json
    model = lowbit.load_export("out/")             # the quantized model again (zoo models by name)
    engine = lowbit.deploy.IntegerEngine.from_path("out/")   # runs it with integer tensors only
    lowbit.deploy.to_onnx("out/", "out/model.onnx")          # QDQ model for onnxruntime

This package knows only the model it is handed, and quant/nn below it: it never builds models.
``lowbit.export`` and ``lowbit.load_export`` (:mod:`lowbit.exports`) pick the model kind: a Hugging
Face causal LM or encoder goes to :mod:`~lowbit.deploy.transformer` (no graph; loaded into the float model passed
in), anything else to :func:`lowbit.deploy.export` / :func:`lowbit.deploy.load` (a zoo architecture is
built by the name the manifest records). :mod:`~lowbit.deploy.packed` runs a quantized causal LM with
its weights packed (int4 / int8 CPU kernels).

Modules: :mod:`~lowbit.deploy.format` (what the files hold, the digest binding them),
:mod:`~lowbit.deploy.build` (model -> :class:`Exported`), :mod:`~lowbit.deploy.write`,
:mod:`~lowbit.deploy.read` (integrity and field checks), :mod:`~lowbit.deploy.rebuild` (``load``),
:mod:`~lowbit.deploy.graph`, :mod:`~lowbit.deploy.layers`, :mod:`~lowbit.deploy.pack`,
:mod:`~lowbit.deploy.engine`, :mod:`~lowbit.deploy.onnx`, :mod:`~lowbit.deploy.verify`,
:mod:`~lowbit.deploy.sizes`, :mod:`~lowbit.deploy.transformer`, :mod:`~lowbit.deploy.packed`. See
docs/DEPLOYMENT.md.
"""

from lowbit.deploy.build import build_export
from lowbit.deploy.engine import IntegerEngine, IntegerOutput, quantize_multiplier, rounding_shift
from lowbit.deploy.errors import ExportError, ExportFileError
from lowbit.deploy.format import FORMAT_VERSION, Exported
from lowbit.deploy.graph import trace_graph
from lowbit.deploy.onnx import to_onnx
from lowbit.deploy.pack import pack_bits, unpack_bits
from lowbit.deploy.packed import PackedEmbedding, PackedLinear, pack_model
from lowbit.deploy.read import read_export
from lowbit.deploy.rebuild import load
from lowbit.deploy.sizes import fp32_checkpoint_bytes
from lowbit.deploy.write import export, write_export

__all__ = ["FORMAT_VERSION", "ExportError", "ExportFileError", "Exported", "IntegerEngine", "IntegerOutput",
           "PackedEmbedding", "PackedLinear", "build_export", "export", "fp32_checkpoint_bytes", "load", "pack_bits",
           "pack_model", "quantize_multiplier", "read_export", "rounding_shift", "to_onnx", "trace_graph",
           "unpack_bits", "write_export"]
