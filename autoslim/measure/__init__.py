"""The measuring part: latency of artifact files by one protocol, local or on a device agent.

Imports numpy, onnxruntime and (for the agent client) httpx only: never torch or optuna, so
``pip install 'autoslim[agent]'`` on a target device is enough to run ``autoslim agent``.
Accuracy on a dataset split needs torch's data and lives with the exporter
(:func:`autoslim.artifact.artifact_accuracy`).
"""

from .backends import FileTiming, get_backend, list_backends, time_files
from .latency import Latency, LatencyBackend, host_identity, time_runs
from .ort import OrtBackend, ort_session

__all__ = [
    "FileTiming",
    "Latency",
    "LatencyBackend",
    "OrtBackend",
    "get_backend",
    "host_identity",
    "list_backends",
    "ort_session",
    "time_files",
    "time_runs",
]
