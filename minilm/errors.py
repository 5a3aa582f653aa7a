"""Errors a person can act on.

Anything raised as a :class:`MinilmError` is an *expected* mistake (bad params, missing or malformed
data, a corrupt checkpoint, an unreachable tracking server). Its message is one line that names the
problem and the fix; command-line entry points print it without a traceback and exit non-zero.
"""

from __future__ import annotations


class MinilmError(Exception):
    """An expected, user-actionable error. ``str(err)`` is one line: the problem and the fix."""

    exit_code = 2


class ConfigError(MinilmError):
    """params.yaml (or a config dict) has an unknown key, a wrong type or an invalid value."""


class DataError(MinilmError):
    """Input data is missing, empty, too small or malformed."""


class CheckpointError(MinilmError):
    """A checkpoint, adapter or tokenizer file is missing, corrupt, of another format or mismatched."""


class TrainingError(MinilmError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


class TrackingError(MinilmError):
    """The experiment tracker (MLflow) cannot be reached or used."""
