"""The device agent (``autoslim agent``): times ONNX files on the target device for a search.

Start it on the device (``autoslim agent --init-secret FILE`` once, then ``autoslim agent``),
forward its port to the search host (``ssh -L 8765:127.0.0.1:8765 device``) and set the
study's backend to ``remote:127.0.0.1:8765``; the host's side is
:class:`autoslim.measure.remote.RemoteBackend`. Imports numpy, onnxruntime, starlette and
uvicorn only (never torch or optuna).
"""

from __future__ import annotations

from .server import (
    DEFAULT_HOST,
    DEFAULT_MAX_UPLOAD,
    DEFAULT_PORT,
    DEFAULT_STORE,
    create_app,
    main,
    serve,
)

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_MAX_UPLOAD",
    "DEFAULT_PORT",
    "DEFAULT_STORE",
    "create_app",
    "main",
    "serve",
]
