"""A trial's artifact written out, verified against its record (or replayed from its config)."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from .._files import nearest_existing, sha256_file, write_probe
from ..errors import ExportError, UsageError
from ..record import OK
from .selection import ACCURACY_TOLERANCE
from .view import StudyView


def check_onnx_output(output: str | Path, kind: str = "onnx") -> Path:
    """The ``-o`` path of an artifact: an ``.onnx`` file (``.pte`` for a study searched on
    ExecuTorch: ``kind``) in an existing folder."""
    out = Path(output)
    if out.suffix != f".{kind}":
        why = " (this study's trials are ExecuTorch programs)" if kind == "pte" else ""
        raise UsageError(
            f"output must be an .{kind} file{why}; got {str(out)!r} (e.g. -o model.{kind})"
        )
    if not out.parent.is_dir():
        above = nearest_existing(out.parent)
        if above.exists() and not above.is_dir():
            raise UsageError(
                f"output {out} is under {above}, which is a file, not a folder; give a path "
                "in a folder (e.g. -o model.onnx)"
            )
        raise UsageError(f"output folder {out.parent} does not exist; create it first")
    if out.is_dir():
        raise UsageError(
            f"output {out} is a folder, not a file; give a file name like {out}/model.onnx"
        )
    check_writable(out.parent, "-o")
    return out


def check_folder(folder: Path, flag: str) -> None:
    """``folder`` is, or can be made as, a folder: nothing on its path is a file."""
    above = nearest_existing(folder)
    if above.exists() and not above.is_dir():
        raise UsageError(
            f"{flag} {folder} cannot be a folder: {above} is a file; pass a folder path"
        )


def check_writable(folder: Path, flag: str) -> None:
    """``folder`` (which exists) takes a new file: tried with a temp file, removed at once;
    else a one-line UsageError naming ``flag``. Before any work whose result goes there."""
    why = write_probe(folder)
    if why is not None:
        raise UsageError(
            f"{flag}: cannot write in {folder} ({why}); give a path in a writable folder"
        )


def _replay(view: StudyView, trial: int, out_dir: Path) -> Path:
    """Rebuild the trial's artifact from its recorded config and the study's recipe."""
    from ..study.evaluation import evaluate
    from ..study.task import build_task

    spec = view.study_spec
    task = build_task(spec, progress=True)  # a missing teacher is retrained: show it
    if task.teacher.content_hash != view.teacher.get("content_hash", task.teacher.content_hash):
        raise ExportError(
            f"cannot replay trial {trial}: the cached teacher ({task.teacher.content_hash}) is "
            f"not the study's ({view.teacher.get('content_hash')}); restore the teacher checkpoint"
        )
    res = evaluate(task, view.config(trial), out_dir)
    if res["status"] != OK:
        raise ExportError(f"replay of trial {trial} did not produce an artifact: {res['status']}")
    return out_dir / view.artifact_name


def export_trial(
    view: StudyView,
    trial: int,
    output: str | Path,
    *,
    replay: bool = False,
    refined: bool = False,
    data: Any = None,
) -> dict[str, Any]:
    """Write trial ``trial``'s artifact to ``output`` and verify it against the study's record.

    Downloads the trial's artifact from the study's store (:mod:`autoslim.study.store`, from any
    machine that reaches it; its SHA-256 must match the record, a changed or missing file is
    refused) or, in a study from before the store, copies the file beside the trial; ``replay``
    (or an old study's missing file) rebuilds it from the recorded config and recipe. The written
    file's size must equal the recorded size exactly and its validation accuracy must be within
    0.1 pt of the recorded value, else :class:`ExportError` and nothing is written.
    ``refined``: the artifact ``autoslim refine`` stored for the trial, checked against the
    refined record instead. ``data``: the study's dataset splits, if already loaded. Returns
    recorded vs measured values.
    """
    from ..artifact import artifact_accuracy

    row = view.measured_row(trial)
    if refined:
        rec = view.refined.get(trial)
        if replay or rec is None:
            raise UsageError(
                f"trial {trial} has no refined result{' to replay' if replay else ''}; run "
                f"`autoslim refine {view.cli_ref} --trial {trial}` first"
            )
        row = pd.Series(
            {
                "size_bytes": rec["size_bytes"],
                "val_accuracy": rec["val_accuracy"],
                "test_accuracy": rec["test_accuracy"],
            }
        )
    output = check_onnx_output(output, view.artifact_name.rpartition(".")[2])
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".autoslim-export-") as tmp:
        path = Path(tmp) / view.artifact_name
        if refined or (not replay and view.has_artifact(trial)):  # never replay a refine
            source = "refined" if refined else "stored"
            view.fetch(trial, path, refined=refined)  # verified against this digest
            digest = view.refined[trial]["sha256"] if refined else str(row["artifact_sha256"])
        else:
            source = "replayed"
            path = _replay(view, trial, Path(tmp) / "replay")
            digest = sha256_file(path)
        if data is None:
            data = view.study_spec.load_data()
        size = path.stat().st_size
        val_acc = artifact_accuracy(path, data.val)[0]
        test_acc = artifact_accuracy(path, data.test)[0]
        result = {
            "trial": trial,
            "source": source,
            "output": str(output),
            "size_bytes": size,
            "recorded_size_bytes": int(row["size_bytes"]),
            "val_accuracy": val_acc,
            "recorded_val_accuracy": float(row["val_accuracy"]),
            "test_accuracy": test_acc,
            "recorded_test_accuracy": float(row["test_accuracy"]),
            "sha256": digest,
        }
        # a stored copy is the recorded file; a replay is what the exporter writes now
        expected = view.artifact_size(trial) if source == "replayed" else int(row["size_bytes"])
        if size != expected:
            raise ExportError(
                f"trial {trial}: the {source} artifact is {size:,} bytes but the study recorded "
                f"{expected:,}; nothing was written to {output}"
            )
        gap = abs(val_acc - result["recorded_val_accuracy"])
        if not math.isfinite(val_acc) or gap > ACCURACY_TOLERANCE:
            raise ExportError(
                f"trial {trial}: the {source} artifact's val accuracy {val_acc:.4f} differs from "
                f"the recorded {result['recorded_val_accuracy']:.4f} by more than 0.1 pt; "
                f"nothing was written to {output}"
            )
        os.replace(path, output)
    return result
