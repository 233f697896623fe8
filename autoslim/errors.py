"""One exception tree. Every message says the rule, the value it got and how to fix it.

Exit codes (used by the CLI): 0 ok, 1 runtime failure, 2 usage/input error, 130 after Ctrl-C,
143 after SIGTERM.
"""

from __future__ import annotations

__all__ = [
    "AutoslimError",
    "UsageError",
    "DataError",
    "ModelError",
    "ConfigError",
    "ExportError",
    "RecoveryError",
    "Terminated",
    "one_line",
    "first_line",
]


def one_line(text: object, limit: int = 500) -> str:
    """A message as one line of at most ``limit`` characters (errors, tables, reports, logs)."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (a database driver's own, where it
    wraps one), as one line: libraries append backgrounds, links and tracebacks below it."""
    lines = [x for x in str(getattr(exc, "orig", None) or exc).splitlines() if x.strip()]
    return one_line(lines[0] if lines else type(exc).__name__)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that a running trial is failed cleanly; the CLI exits 143."""


class AutoslimError(Exception):
    """Base of every error autoslim raises on purpose. ``exit_code`` is what the CLI returns."""

    exit_code = 1


class UsageError(AutoslimError, ValueError):
    """Bad input from the user: a flag, a file, a name. The CLI exits with 2."""

    exit_code = 2


class DataError(UsageError):
    """A dataset is missing or malformed."""


class ModelError(UsageError):
    """A model name or factory cannot be resolved."""


class ConfigError(UsageError):
    """A compression config, search space or study file is invalid."""


class ExportError(AutoslimError):
    """Building or checking the deployable artifact failed."""


class RecoveryError(AutoslimError):
    """The distillation recovery diverged (NaN/inf loss)."""
