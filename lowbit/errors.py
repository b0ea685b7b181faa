"""Exceptions lowbit raises for bad input; each message names the problem and the fix."""


class LowbitError(Exception):
    """Base class of every error lowbit raises on purpose."""


class RecipeError(LowbitError, ValueError):
    """A recipe (YAML file, dict or dataclass) asks for something invalid."""


class CalibrationError(LowbitError, ValueError):
    """Calibration data is empty, non-finite or unusable for a layer."""


class DataError(LowbitError, FileNotFoundError):
    """A dataset file is missing, truncated or malformed."""


class CheckpointError(LowbitError, ValueError):
    """A checkpoint is not safetensors, is damaged, or does not match the model."""


class DistributedError(LowbitError, RuntimeError):
    """A torchrun launch is inconsistent: environment variables, or ranks that disagree on the run."""


class MissingExtraError(LowbitError, ImportError):
    """An optional dependency (an extra such as ``lowbit[rl]``) is not installed."""


class GameError(LowbitError, ValueError):
    """An unknown game, or a model or checkpoint that belongs to another game."""
