"""File helpers written once: the SHA-256 of a file, atomic writes (temp file, then rename),
where the shipped studies and search spaces are."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any


def shipped_dir(name: str) -> Path:
    """The folder of a kind of shipped file (``studies``, ``search_spaces``): in an installed
    wheel, package data under ``autoslim/resources/NAME`` (pyproject maps the repository's
    top-level folders there); in a source checkout or an editable install, the top-level
    folder itself."""
    inside = Path(str(resources.files("autoslim"))) / "resources" / name
    if inside.is_dir():
        return inside
    return Path(__file__).resolve().parent.parent / name


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def nearest_existing(path: Path) -> Path:
    """``path`` if it exists, else its nearest parent that does (what a ``mkdir -p`` of
    ``path`` would start from)."""
    return next((p for p in (path, *path.parents) if p.exists()), path)


def write_probe(folder: Path) -> str | None:
    """Whether ``folder`` (which exists) takes a new file: None, else why not (the OS's
    words). Tried with a temp file removed at once, so that it holds for root too (where a
    permission check does not bind) and for read-only file systems."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".autoslim-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return e.strerror or type(e).__name__
    return None


def atomic_json(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # one per writing process
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def atomic_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")  # one per writing process
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
