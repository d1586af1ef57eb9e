"""One exception family for everything a user can get wrong.

Core code raises these and never prints or exits; only ``cli.py`` turns them into a
one-line message and the exit code that each class carries.
"""

from __future__ import annotations


class LsrError(Exception):
    """Base class of every error ``lsr`` reports to a user (exit code 1)."""

    exit_code = 1


class ConfigError(LsrError):
    """A bad YAML file, config key, value or command-line option."""

    exit_code = 2


class DataError(LsrError):
    """A missing, unreadable or malformed HDF5 file, group or dataset."""

    exit_code = 3


class CheckpointError(LsrError):
    """A checkpoint that cannot be loaded, is not plain weights, or does not fit the data."""

    exit_code = 4


class NumericalError(LsrError):
    """Non-finite values in the data, the model output or the computation."""

    exit_code = 5


class OutputError(LsrError):
    """An output path that exists (without ``--force``), is the input, or cannot be written."""

    exit_code = 6


class DeviceError(LsrError):
    """A device that was asked for but is not available."""

    exit_code = 7


EXIT_CODES = {
    0: "success",
    1: "unexpected internal error (a bug: rerun with --debug and report it)",
    ConfigError.exit_code: "bad config file, config value or command-line option",
    DataError.exit_code: "bad or missing data (HDF5)",
    CheckpointError.exit_code: "bad or missing checkpoint, or model/data mismatch",
    NumericalError.exit_code: "non-finite values in data, model output or computation",
    OutputError.exit_code: "output exists (use --force), is the input, or cannot be written",
    DeviceError.exit_code: "requested device not available",
}
