"""Quantization-aware fine-tuning: FAQ, LSQ, PACT + SAWB recipes, distillation, exact resume, DDP.

    import lowbit
    qmodel = lowbit.quantize(model, "lsq-w4a4", calib_data=calib)
    lowbit.finetune(qmodel, train_loader, teacher=model, config=lowbit.FinetuneConfig.from_recipe("lsq-w4a4"))
"""

from lowbit.qat.batchnorm import reestimate_batchnorm
from lowbit.qat.config import FinetuneConfig
from lowbit.qat.distill import TeacherMismatchError, distillation_loss
from lowbit.qat.schedule import LRSchedule
from lowbit.qat.state import NonFiniteError
from lowbit.qat.trainer import finetune

__all__ = ["FinetuneConfig", "LRSchedule", "NonFiniteError", "TeacherMismatchError", "distillation_loss", "finetune",
           "reestimate_batchnorm"]
