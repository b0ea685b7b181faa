"""Deployment: packed integer export, the integer reference engine, ONNX QDQ.

    import lowbit
    lowbit.export(qmodel, "out/")                  # model.safetensors (packed ints + grids) + manifest.json
    model = lowbit.load_export("out/")             # the quantized model again (zoo models by name)
    engine = lowbit.deploy.IntegerEngine.from_path("out/")   # runs it with integer tensors only
    lowbit.deploy.to_onnx("out/", "out/model.onnx")          # QDQ model for onnxruntime

``lowbit.export`` and ``lowbit.load_export`` are :func:`lowbit.deploy.format.export` and
:func:`lowbit.deploy.format.load`; this package holds the rest. See docs/DEPLOYMENT.md.
"""

from lowbit.deploy.engine import IntegerEngine, IntegerOutput, quantize_multiplier, rounding_shift
from lowbit.deploy.errors import ExportError, ExportFileError
from lowbit.deploy.format import (FORMAT_VERSION, Exported, build_export, export, export_sizes, fp32_checkpoint_bytes,
                                  load, read_export)
from lowbit.deploy.graph import trace_graph
from lowbit.deploy.pack import pack_bits, unpack_bits


def to_onnx(source, path=None, **kwargs):
    """See :func:`lowbit.deploy.onnx.to_onnx` (imported on call: onnx is an optional dependency)."""
    from lowbit.deploy.onnx import to_onnx as _to_onnx
    return _to_onnx(source, path, **kwargs)


__all__ = ["FORMAT_VERSION", "ExportError", "ExportFileError", "Exported", "IntegerEngine", "IntegerOutput",
           "build_export", "export", "export_sizes", "fp32_checkpoint_bytes", "load", "pack_bits",
           "quantize_multiplier", "read_export", "rounding_shift", "to_onnx", "trace_graph", "unpack_bits"]
