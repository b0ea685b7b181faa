"""Errors of the deployment path (export, load, integer engine, ONNX)."""

from __future__ import annotations

from lowbit.errors import CheckpointError, LowbitError


class ExportError(LowbitError, ValueError):
    """A model (or one of its operations) cannot be exported, or run by the integer engine."""


class ExportFileError(ExportError, CheckpointError):
    """An exported folder is damaged, from an unknown format version, or does not fit the model."""
