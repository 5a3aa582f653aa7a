"""Errors a person can act on.

Anything raised as a :class:`MinilmError` is an *expected* mistake (bad params, missing or malformed
data, a corrupt checkpoint, an unreachable tracking server). Its message is one line that names the
problem and the fix; command-line entry points print it without a traceback and exit non-zero.
"""

from __future__ import annotations

import sys
from typing import Callable


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


def run_main(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run ``main(argv)`` and turn its outcome into an exit code.

    MinilmError -> ``error: <message>`` on stderr, its ``exit_code`` (2); running out of device or host
    memory -> one line with what to lower, 2; Ctrl-C -> ``interrupted``, 130;
    ``SystemExit`` (argparse's --help / usage errors) -> its code; otherwise main's int, or 0.
    """
    try:
        code = main(argv)
    except MinilmError as err:
        message = " ".join(str(err).splitlines()) or type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except RuntimeError as err:
        if not _out_of_memory(err):
            raise
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        print(f"error: out of memory ({first}); lower batch_size and raise grad_accum to keep the same batch "
              "per step, or use precision bf16, a shorter context_length or a smaller model", file=sys.stderr)
        return 2
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            return exit_.code or 0
        print(exit_.code, file=sys.stderr)
        return 1
    return int(code or 0)


def _out_of_memory(err: RuntimeError) -> bool:
    """torch's OutOfMemoryError (CUDA, MPS, XPU) or the CPU allocator failing (a plain RuntimeError)."""
    return type(err).__name__ == "OutOfMemoryError" or "can't allocate memory" in str(err)
