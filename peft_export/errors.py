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


def require(condition: bool, message: str, cls: type[PeftExportError] = UsageError) -> None:
    """Raise ``cls(message)`` unless ``condition`` holds."""
    if not condition:
        raise cls(message)
