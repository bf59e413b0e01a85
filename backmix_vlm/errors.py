"""User-facing errors.

Everything the user can fix (a bad config key, missing data, an unknown model name)
raises a subclass of :class:`BackmixError`.  The CLI prints these as one clear message
without a traceback; programming errors still raise normally.
"""
from __future__ import annotations


class BackmixError(Exception):
    """An error caused by user input, with a message that says what is accepted."""


class ConfigError(BackmixError, ValueError):
    """A config file or override is invalid (unknown key, wrong type, bad value)."""


class DataError(BackmixError):
    """A dataset could not be found, read, or is empty."""


class ModelError(BackmixError):
    """A model name, tag or checkpoint file is invalid or unavailable."""


class RegistryError(BackmixError, KeyError):
    """A name was looked up in a registry that does not hold it."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
