"""The fine-tuning configuration: a dataclass built from a recipe's ``qat:`` section.

    qat:
      epochs: 3
      optimizer: sgd            # sgd | adamw
      lr: 0.01
      schedule: cosine          # cosine | exponential | step | constant
      weight_decay: 5.0e-5

Every field has a default; unknown keys and values out of range raise a
:class:`~lowbit.errors.RecipeError` that names the key and what is allowed. Numbers written
the way YAML reads as strings (``1e-6`` without a dot) are accepted.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields

from lowbit.errors import RecipeError
from lowbit.recipe import load_recipe

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "exponential", "step", "constant")

# Fields that change only bookkeeping, never the numbers: a resumed run may change them.
BOOKKEEPING = frozenset({"checkpoint_every", "log_every", "progress", "tensorboard", "distributed",
                         "compile_quantizers"})
DISTRIBUTED = ("ddp", "fsdp")


@dataclass
class FinetuneConfig:
    """Settings of :func:`lowbit.finetune` (the ``qat:`` section of a recipe).

    Optimizer: ``optimizer`` (sgd with ``momentum``/``nesterov``, or adamw with ``betas``),
    ``lr``, ``weight_decay`` (conv/linear weights only; biases and batch norm get none).

    Schedule (per step; ``T`` = steps after warm-up): ``cosine`` from ``lr`` to ``final_lr``;
    ``exponential`` (FAQ) ``lr * (final_lr / lr) ** (t / T)``; ``step``: times ``gamma`` at each
    of ``milestones`` (in epochs); ``constant``. ``warmup_epochs`` or ``warmup_steps``: linear
    warm-up from ``lr / warmup`` to ``lr`` first.

    Quantizer parameters (LSQ steps, PACT clips) get ``lr * quantizer_lr_mult``; LSQ steps
    decay with ``quantizer_weight_decay`` (0: none); PACT's alpha with its quantizer's own
    ``weight_decay`` (the paper's lambda_alpha) unless ``pact_weight_decay`` is set.

    ``freeze_bn_epochs`` / ``freeze_bn_steps``: after that many, batch norm layers run in eval
    mode (running statistics frozen). ``bn_reestimate_batches``: after the last step, recompute
    every batch-norm layer's statistics as the average over that many training batches with the
    final weights (:mod:`lowbit.qat.batchnorm`; 0: off). Distillation (when a teacher is given):
    ``loss = (1 - distill_weight) CE + distill_weight T^2 KL(teacher || student)`` with
    ``T = temperature``. ``grad_clip``: max gradient norm. ``max_steps`` caps the run.

    Speed: ``compile_quantizers`` runs every quantizer's fake-quant as two kernels compiled by
    ``torch.compile`` during fine-tuning (:mod:`lowbit.quant.grid`: same values, the step gradients
    up to float rounding; the first steps pay the compilation, tens of seconds on a CPU; where it
    cannot build, a warning and the eager op). Memory: in training, each quantized layer keeps the input it saves
    for its backward as int8/uint8 codes (:mod:`lowbit.nn.saved_codes`; same values and gradients), so a step
    holds little more than the float step's activations (docs/RESULTS.md, section step-cost).

    Bookkeeping: ``checkpoint_every`` steps (0: at epoch ends only; always at the end),
    ``log_every`` steps (0: per epoch only), ``progress`` bar (None: when stderr is a
    terminal), ``tensorboard`` (when installed), ``calib_batches`` used to initialise
    quantizers that were never calibrated, ``batch_size`` for loaders the CLI builds.
    """

    epochs: int = 3
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    final_lr: float = 0.0
    milestones: tuple[float, ...] = ()
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    warmup_steps: int = 0
    quantizer_lr_mult: float = 1.0
    quantizer_weight_decay: float = 0.0
    pact_weight_decay: float | None = None
    freeze_bn_epochs: float | None = None
    freeze_bn_steps: int | None = None
    bn_reestimate_batches: int = 0
    distill_weight: float = 0.5
    temperature: float = 1.0
    grad_clip: float | None = None
    max_steps: int | None = None
    max_tokens: int | None = None
    grad_accum_steps: int = 1
    gradient_checkpointing: bool = False
    autocast: bool = False
    compile_quantizers: bool = False
    distributed: str = "ddp"
    seed: int = 0
    checkpoint_every: int = 0
    log_every: int = 0
    progress: bool | None = None
    tensorboard: bool = True
    calib_batches: int = 4

    def __post_init__(self):
        _coerce(self)
        _validate(self)

    # ----- construction ---------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict | None, **overrides) -> FinetuneConfig:
        """A config from a mapping (a recipe's ``qat:`` section), then ``overrides`` (None ignored)."""
        if data is not None and not isinstance(data, dict):
            raise RecipeError(f"qat: the section must be a mapping of settings, got {type(data).__name__}")
        data = dict(data or {})
        data.update({k: v for k, v in overrides.items() if v is not None})
        allowed = sorted(f.name for f in fields(cls))
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise RecipeError(f"qat: unknown key(s) {unknown}; allowed keys: {allowed}")
        return cls(**data)

    @classmethod
    def from_recipe(cls, recipe, **overrides) -> FinetuneConfig:
        """The ``qat:`` section of a recipe (name, path, dict or :class:`~lowbit.recipe.Recipe`)."""
        section = load_recipe(recipe).sections.get("qat") or {}
        if not isinstance(section, dict):
            raise RecipeError(f"qat: the section must be a mapping of settings, got {section!r}")
        return cls.from_dict(section, **overrides)

    def replace(self, **changes) -> FinetuneConfig:
        """A copy with ``changes`` applied (None values ignored), validated again."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict:
        """JSON-safe form (tuples become lists)."""
        out = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


_INT = {"epochs", "batch_size", "warmup_steps", "seed", "checkpoint_every", "log_every", "calib_batches",
        "bn_reestimate_batches", "grad_accum_steps"}
_OPT_INT = {"freeze_bn_steps", "max_steps", "max_tokens"}
_FLOAT = {"lr", "momentum", "weight_decay", "final_lr", "gamma", "warmup_epochs", "quantizer_lr_mult",
          "quantizer_weight_decay", "distill_weight", "temperature"}
_OPT_FLOAT = {"pact_weight_decay", "freeze_bn_epochs", "grad_clip"}
_BOOL = {"nesterov", "tensorboard", "gradient_checkpointing", "autocast", "compile_quantizers"}


def _err(key: str, rule: str, value) -> RecipeError:
    return RecipeError(f"qat.{key}: {rule}, got {value!r}")


def _as_float(key: str, value) -> float:
    if isinstance(value, bool):
        raise _err(key, "must be a number", value)
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise _err(key, "must be a number", value) from None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _err(key, "must be a finite number", value)
    return float(value)


def _as_int(key: str, value) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _err(key, "must be an integer", value)
    return value


def _coerce(c: FinetuneConfig) -> None:
    for k in _INT:
        setattr(c, k, _as_int(k, getattr(c, k)))
    for k in _OPT_INT:
        if getattr(c, k) is not None:
            setattr(c, k, _as_int(k, getattr(c, k)))
    for k in _FLOAT:
        setattr(c, k, _as_float(k, getattr(c, k)))
    for k in _OPT_FLOAT:
        if getattr(c, k) is not None:
            setattr(c, k, _as_float(k, getattr(c, k)))
    for k in _BOOL:
        if not isinstance(getattr(c, k), bool):
            raise _err(k, "must be true or false", getattr(c, k))
    if c.progress is not None and not isinstance(c.progress, bool):
        raise _err("progress", "must be true, false or null", c.progress)
    for k in ("optimizer", "schedule", "distributed"):
        v = getattr(c, k)
        setattr(c, k, v.lower() if isinstance(v, str) else v)
    try:
        c.betas = tuple(_as_float("betas", b) for b in c.betas)
    except TypeError:
        raise _err("betas", "must be two numbers in [0, 1)", c.betas) from None
    if isinstance(c.milestones, (int, float)) or isinstance(c.milestones, str):
        raise _err("milestones", "must be a list of epochs", c.milestones)
    c.milestones = tuple(_as_float("milestones", m) for m in c.milestones)


def _validate(c: FinetuneConfig) -> None:
    def need(ok: bool, key: str, rule: str):
        if not ok:
            raise _err(key, rule, getattr(c, key))

    need(c.epochs >= 1, "epochs", "must be >= 1")
    need(c.batch_size >= 1, "batch_size", "must be >= 1")
    need(c.optimizer in OPTIMIZERS, "optimizer", f"must be one of {list(OPTIMIZERS)}")
    need(c.schedule in SCHEDULES, "schedule", f"must be one of {list(SCHEDULES)}")
    need(c.lr > 0, "lr", "must be > 0")
    need(0.0 <= c.momentum < 1.0, "momentum", "must be in [0, 1)")
    need(not (c.nesterov and c.momentum == 0.0), "nesterov", "needs momentum > 0")
    need(len(c.betas) == 2 and all(0.0 <= b < 1.0 for b in c.betas), "betas", "must be two numbers in [0, 1)")
    need(c.weight_decay >= 0, "weight_decay", "must be >= 0")
    need(c.final_lr >= 0, "final_lr", "must be >= 0")
    need(c.final_lr <= c.lr, "final_lr", f"must be <= lr ({c.lr})")
    if c.schedule == "exponential":
        need(c.final_lr > 0, "final_lr", "must be > 0 for the exponential schedule (lr * (final_lr/lr)^(t/T))")
    need(0.0 < c.gamma <= 1.0, "gamma", "must be in (0, 1]")
    need(all(m > 0 for m in c.milestones) and list(c.milestones) == sorted(c.milestones), "milestones",
         "must be increasing epochs > 0")
    need(c.warmup_epochs >= 0, "warmup_epochs", "must be >= 0")
    need(c.warmup_steps >= 0, "warmup_steps", "must be >= 0")
    need(not (c.warmup_epochs and c.warmup_steps), "warmup_steps", "set warmup_epochs or warmup_steps, not both")
    need(c.quantizer_lr_mult >= 0, "quantizer_lr_mult", "must be >= 0")
    need(c.quantizer_weight_decay >= 0, "quantizer_weight_decay", "must be >= 0")
    need(c.pact_weight_decay is None or c.pact_weight_decay >= 0, "pact_weight_decay", "must be >= 0 or null")
    need(c.freeze_bn_epochs is None or c.freeze_bn_epochs >= 0, "freeze_bn_epochs", "must be >= 0 or null")
    need(c.freeze_bn_steps is None or c.freeze_bn_steps >= 0, "freeze_bn_steps", "must be >= 0 or null")
    need(c.freeze_bn_epochs is None or c.freeze_bn_steps is None, "freeze_bn_steps",
         "set freeze_bn_epochs or freeze_bn_steps, not both")
    need(c.bn_reestimate_batches >= 0, "bn_reestimate_batches", "must be >= 0 (0: off)")
    need(0.0 <= c.distill_weight <= 1.0, "distill_weight", "must be in [0, 1]")
    need(c.temperature > 0, "temperature", "must be > 0")
    need(c.grad_clip is None or c.grad_clip > 0, "grad_clip", "must be > 0 or null")
    need(c.max_steps is None or c.max_steps >= 1, "max_steps", "must be >= 1 or null")
    need(c.max_tokens is None or c.max_tokens >= 1, "max_tokens", "must be >= 1 or null")
    need(c.grad_accum_steps >= 1, "grad_accum_steps", "must be >= 1")
    need(c.distributed in DISTRIBUTED, "distributed", f"must be one of {list(DISTRIBUTED)}")
    need(c.seed >= 0, "seed", "must be >= 0")
    need(c.checkpoint_every >= 0, "checkpoint_every", "must be >= 0 (0: at epoch ends)")
    need(c.log_every >= 0, "log_every", "must be >= 0 (0: per epoch only)")
    need(c.calib_batches >= 1, "calib_batches", "must be >= 1")
