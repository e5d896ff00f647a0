"""Errors that reach the user as one clear line (the CLI prints them without a traceback)."""

from __future__ import annotations


class PeftExportError(Exception):
    """A problem the user can act on. ``str(err)`` is a complete one-line message."""

    exit_code = 1


class UsageError(PeftExportError):
    """Bad options or bad input files."""

    exit_code = 2


class MissingDependencyError(PeftExportError):
    """An optional package (or device) is missing; the message says how to install it."""

    exit_code = 2


class CheckpointError(PeftExportError):
    """A checkpoint file cannot be read or does not fit the model."""


class DataError(PeftExportError):
    """Images or labels are unusable."""


class VerificationError(PeftExportError):
    """A numerical check (merge, export parity, engine parity) failed."""


class WriteError(PeftExportError):
    """An output could not be written (full disk, no permission, ...); the message names it and the free space.
    The previous output is left as it was (:mod:`peft_export.files`)."""


def first_line(exc: BaseException, default: str | None = None) -> str:
    """The first non-empty line of an exception's message (the exception type when it has none): what a
    one-line error shows of a library's multi-line message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else (default if default is not None else type(exc).__name__)
