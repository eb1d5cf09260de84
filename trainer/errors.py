"""Errors that speak to the user.

Anything raised as `UserError` is bad input (a config key, a CLI flag, a shard, a path, a checkpoint): the CLI
prints its one-line message and exits with code 2, before anything is started or written.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user; the message names what is wrong and how to fix it."""

    exit_code = 2


class ConfigError(UserError):
    """A config file or override that does not validate."""


class DataError(UserError):
    """Shards, sources or inputs that cannot be used."""


class CheckpointError(UserError):
    """A checkpoint or run directory that cannot be resumed or loaded."""


class NumericalError(UserError):
    """A run stopped on a NaN/Inf loss or gradient (usually a learning rate or data problem)."""
