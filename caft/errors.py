"""Errors a user can act on.

`CaftError` and its subclasses carry a message that names the problem and the fix; the CLI prints them
without a traceback. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class CaftError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it."""


class ConfigError(CaftError):
    """A config file or override that does not validate."""


class DataError(CaftError):
    """Malformed input data (JSONL, CSV, chat format, empty sets)."""


class ModelError(CaftError):
    """A model, tokenizer or adapter that cannot be loaded or does not fit the request."""


class SiteError(CaftError):
    """A layer or module that does not exist on the model."""


class SubspaceError(CaftError):
    """A subspace artifact that is malformed or does not match the model."""


class RunDirError(CaftError):
    """A run directory in a state that the requested operation cannot proceed from."""
