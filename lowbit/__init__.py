"""lowbit: accurate 2-, 3-, 4- and 8-bit PyTorch networks that provably run in integer arithmetic.

    import lowbit
    qmodel = lowbit.quantize(model, "ptq-w8a8", calib_data=loader)
    print(lowbit.summary(qmodel))
"""

from lowbit import export  # the package, callable: lowbit.export(qmodel, path)
from lowbit.export import load
from lowbit.mixed import select_precision
from lowbit.prepare import calibrate, quantize
from lowbit.qat import FinetuneConfig, finetune
from lowbit.recipe import Recipe, list_recipes, load_recipe
from lowbit.summary import stored_size_bytes, summary

__version__ = "0.1.0"
__all__ = ["FinetuneConfig", "Recipe", "__version__", "calibrate", "export", "finetune", "list_recipes", "load",
           "load_recipe", "quantize", "select_precision", "stored_size_bytes", "summary"]
