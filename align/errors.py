"""The errors align reports to a user, under one base the CLI catches (`align ...` prints the message and exits
with 2, no traceback). Each message names the file, row, key or step, and what was expected. The reward library
has its own (`rewards.RewardError`), which the CLI catches beside these; everything else is a bug and keeps its
traceback."""

from __future__ import annotations


class AlignError(Exception):
    """Base of the errors a user can act on."""


class ConfigError(AlignError, ValueError):
    """A config that cannot be used; the message names the place (file:line, key) and what was expected."""


class DataError(AlignError, ValueError):
    """Unusable data; the message names the file, the row (1-based) and the field."""


class NonFiniteError(AlignError, RuntimeError):
    """A quantity that must be finite is not; nothing of the step was applied."""


class CheckpointError(AlignError, RuntimeError):
    """A checkpoint that cannot be trusted (incomplete, corrupt, or holding non-finite numbers)."""


class StorageError(AlignError, RuntimeError):
    """A write the disk refused (full, read-only, or the run directory gone): what was saved before stays valid, and
    the message says what the same command does once the disk is fixed (align/run/storage.py)."""
