"""Errors a user can act on.

`CaftError` and its subclasses carry a message that names the problem and the fix; the CLI prints them
without a traceback and exits with the error's `exit_code`. Any other exception is a bug and keeps its
traceback (exit 1).

Exit codes: 0 done; 1 a bug (traceback); 2 (`EXIT_ERROR`) a problem with the config, data, model or
environment, nothing (more) was computed; 3 (`EXIT_INCOMPLETE`) the work ran but is incomplete (too many
judge calls failed, a budget or a signal stopped it): what was done is kept, and rerunning the same
command continues it.
"""

from __future__ import annotations

EXIT_ERROR = 2
EXIT_INCOMPLETE = 3


class CaftError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it."""

    exit_code: int = EXIT_ERROR


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


class IncompleteError(CaftError):
    """The work ran but its results are incomplete (failed judge calls, a budget, a signal); what was done
    is kept and rerunning the same command continues it. Exit code 3, so scripts can tell it from a
    configuration error (2)."""

    exit_code = EXIT_INCOMPLETE
