"""A user's callable named ``package.module:attr`` or ``path/to/file.py:attr`` (models, tasks)."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import AutoslimError

__all__ = ["load_callable"]


def load_callable(
    spec: str, *, what: str, error: type[AutoslimError], names: str = ""
) -> Callable[..., Any]:
    """Import ``spec``'s module (or file) and return its callable ``attr``; every failure is one
    ``error`` naming ``what`` (e.g. "model") and how to fix it. ``names`` lists the built-ins."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr.isidentifier():
        builtin = f"a built-in name ({names}) or " if names else ""
        raise error(
            f"malformed {what} {spec!r}: expected {builtin}'package.module:factory' or "
            "'path/to/file.py:factory'"
        )
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise error(f"{what} file {path} does not exist; give 'path/to/file.py:factory'")
        mod_name = "autoslim_user_" + path.stem
        spec_obj = importlib.util.spec_from_file_location(mod_name, path)
        if spec_obj is None or spec_obj.loader is None:
            raise error(f"cannot import {path} as a Python module")
        module = importlib.util.module_from_spec(spec_obj)
        try:
            spec_obj.loader.exec_module(module)
        except Exception as e:  # the user's file: a syntax error, a failing import, ...
            where = f" (line {e.lineno})" if isinstance(e, SyntaxError) and e.lineno else ""
            raise error(
                f"cannot import {what} file {path}{where}: {type(e).__name__}: {e}; fix the file"
            ) from None
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise error(
                f"cannot import module {target!r} for {what} {spec!r}: {e}; check PYTHONPATH "
                "or pass a file path 'path/to/file.py:factory'"
            ) from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise error(f"{target} has no callable {attr!r}; expected a function returning a {what}")
    return factory
