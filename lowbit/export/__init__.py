"""Deployment: packed integer export, the integer reference engine, ONNX QDQ.

    import lowbit
    lowbit.export(qmodel, "out/")                 # model.safetensors (packed ints + grids) + manifest.json
    model = lowbit.load("out/")                   # the quantized model again (zoo models by name)
    engine = lowbit.export.IntegerEngine.from_path("out/")   # runs it with integer tensors only
    lowbit.export.to_onnx("out/", "out/model.onnx")          # QDQ model for onnxruntime

``lowbit.export`` is this package and, called, :func:`lowbit.export.format.export` (the module
is callable), so both ``lowbit.export(qmodel, path)`` and ``lowbit.export.IntegerEngine`` work.
See docs/DEPLOYMENT.md.
"""

import sys
import types

from lowbit.export.engine import IntegerEngine, IntegerOutput, quantize_multiplier, rounding_shift
from lowbit.export.errors import ExportError, ExportFileError
from lowbit.export.format import (FORMAT_VERSION, Exported, build_export, export, export_sizes, fp32_checkpoint_bytes,
                                  load, read_export)
from lowbit.export.graph import trace_graph
from lowbit.export.pack import pack_bits, unpack_bits


def to_onnx(source, path=None, **kwargs):
    """See :func:`lowbit.export.onnx.to_onnx` (imported lazily: onnx is optional)."""
    from lowbit.export.onnx import to_onnx as _to_onnx
    return _to_onnx(source, path, **kwargs)


__all__ = ["FORMAT_VERSION", "ExportError", "ExportFileError", "Exported", "IntegerEngine", "IntegerOutput",
           "build_export", "export", "export_sizes", "fp32_checkpoint_bytes", "load", "pack_bits",
           "quantize_multiplier", "read_export", "rounding_shift", "to_onnx", "trace_graph", "unpack_bits"]


class _CallableModule(types.ModuleType):
    def __call__(self, qmodel, path, **kwargs):
        """``lowbit.export(qmodel, path, ...)``: see :func:`lowbit.export.format.export`."""
        return export(qmodel, path, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
