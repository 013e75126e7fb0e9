"""Errors a user can cause. The CLI turns each into one line on stderr and exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """Base of every error whose cause is the user's input, not a bug in distill4all."""


class ConfigError(UserError):
    """The run config cannot be read or does not validate."""


class RunDirError(UserError):
    """The run directory is missing, locked by another process, or from a newer version."""


class StageError(UserError):
    """A stage name is unknown, or a stage cannot run as asked (e.g. its inputs changed)."""


class ModelError(UserError):
    """A model name or path cannot be resolved or loaded."""


class DataError(UserError):
    """An input data file is missing or malformed."""
