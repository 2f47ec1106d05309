"""The one exception type for bad input.

A :class:`UserError` means "the user asked for something this tool cannot do, and the message
says what to change". It is raised before any work starts. The CLI prints it as one line and
exits with code 2; every other exception is a bug and surfaces with its traceback (see
``cli.py``). Library callers catch ``UserError`` to tell the two apart.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: the message names the problem and the fix."""


class ArchError(UserError):
    """An architecture, a layout or a model family this tool cannot handle."""


class CheckpointError(UserError):
    """A checkpoint that is missing, truncated, damaged or not of a kind this tool reads."""


class OutputError(UserError):
    """An output path that may not be written (exists, inside a source, parent is a file)."""


class TargetError(UserError):
    """A pruning target that does not fit the model or the layout."""


class ScoreError(UserError):
    """Score files that are missing, damaged or of another model."""


class DataError(UserError):
    """Text or datasets that are missing, empty or unreadable."""
