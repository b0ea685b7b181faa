"""lowbit: accurate 2-, 3-, 4- and 8-bit PyTorch networks that provably run in integer arithmetic.

    import lowbit
    qmodel = lowbit.quantize(model, "ptq-w8a8", calib_data=loader)
    print(lowbit.summary(qmodel))

Two kinds of file, each with its own save/load pair:

- a quantized model for further work (fine-tuning, evaluation): ``lowbit.save(qmodel, folder)`` /
  ``lowbit.load(folder)``: float weights plus every quantizer's state, the recipe and metadata;
- a deployment export: ``lowbit.export(qmodel, folder)`` / ``lowbit.load_export(folder)``: packed
  integer weights, grids and the graph, read by the integer engine and the ONNX writer
  (:mod:`lowbit.deploy`).

Float weights (the zoo's checkpoints, users' ``.pt``/``.safetensors`` state dicts) load with
:func:`lowbit.zoo.build_model` or :func:`lowbit.checkpoint.load_into`.
"""

from lowbit import deploy, llm, zoo
from lowbit.exports import export, load_export
from lowbit.mixed import select_precision
from lowbit.prepare import calibrate, quantize
from lowbit.qat import FinetuneConfig, finetune
from lowbit.recipe import Recipe, list_recipes, load_recipe
from lowbit.serialize import load, save
from lowbit.summary import stored_size_bytes, summary
from lowbit.version import __version__
__all__ = ["FinetuneConfig", "Recipe", "__version__", "calibrate", "deploy", "export", "finetune", "list_recipes",
           "llm", "load", "load_export", "load_recipe", "quantize", "save", "select_precision", "stored_size_bytes",
           "summary", "zoo"]
