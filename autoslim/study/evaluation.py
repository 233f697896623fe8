"""One candidate's evaluation: size pre-check -> [screen] -> compress -> recover -> export -> measure."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from .._files import sha256_file
from ..artifact import artifact_accuracy, runtime_agreement
from ..config import CompressionConfig
from ..errors import AutoslimError
from ..measure.backends import runtime_of
from ..measure.openvino import openvino_version
from ..pareto import promoted
from ..pipeline import compress, export
from ..record import OK, OVER_BUDGET, OVER_LATENCY, SCREENED
from .task import CandidateFailed, Task, _dominated, screen, shape, time_candidate


def evaluate(
    task: Task, config: CompressionConfig, trial_dir: Path, *, promote: bool = False
) -> dict[str, Any]:
    """Run one candidate end to end and return its measurements as plain data.

    With screening on (``screen_images``), a candidate is screened first (:func:`screen`) and
    trained only if promoted (:func:`autoslim.pareto.promoted`: non-dominated rank, then crowding
    distance, of (proxy accuracy, size estimate) among
    ``task.screened``, within the ``promote`` share, or always with ``promote=True`` (the
    baselines); otherwise ``status='screened'``.

    Over-budget candidates (by the analytic estimate) return ``status='over_budget'`` before
    any training; with a calibrated ``task.predictor``, candidates it puts over
    ``max_latency_ms`` even at their optimistic bound return ``status='over_latency'``, and a
    trained candidate that a measured trial beats even at that bound is not timed
    (``latency_source='predicted'``). Failures raise :class:`CandidateFailed` with a diagnosis.
    """
    spec, t0 = task.spec, time.perf_counter()
    est, feats = shape(task, config)
    out: dict[str, Any] = {
        "config": config.to_dict(),
        "summary": config.summary(),
        "size_estimate": est,
        "latency_features": feats,
    }
    if spec.budget is not None and est > spec.budget:
        out.update(status=OVER_BUDGET, seconds=round(time.perf_counter() - t0, 2))
        return out
    teacher_ms = task.teacher_timing.get("latency_ms")
    ratio_low = None  # the predictor's optimistic latency ratio, when one is calibrated
    if task.predictor is not None and task.predictor.calibration is not None and teacher_ms:
        ratio = float(task.predictor.predict([feats])[0])
        ratio_low = ratio / (1 + task.predictor.calibration.margin)
        out["latency_predicted_ms"] = ratio * teacher_ms
        if spec.max_latency_ms is not None and ratio_low * teacher_ms > spec.max_latency_ms:
            out.update(status=OVER_LATENCY, seconds=round(time.perf_counter() - t0, 2))
            return out
    if spec.screen_images:
        try:
            acc = screen(task, config)
        except (FloatingPointError, RuntimeError) as e:
            raise CandidateFailed(f"screening failed: {type(e).__name__}: {e}") from e
        out["screen_accuracy"] = acc
        points = [[p["accuracy"], p["size"]] for p in task.screened] + [[acc, est]]
        if not promote and not promoted(points, ["maximize", "minimize"], spec.promote):
            out.update(status=SCREENED, seconds=round(time.perf_counter() - t0, 2))
            return out
    try:
        c = compress(
            task.teacher.model,
            config,
            data=task.data,
            recovery=spec.recovery(),
            teacher_key=task.teacher.content_hash,
            classifier=task.classifier,
            stem=task.stem,
        )
    except (FloatingPointError, RuntimeError) as e:
        raise CandidateFailed(f"compression/recovery failed: {type(e).__name__}: {e}") from e
    trial_dir.mkdir(parents=True, exist_ok=True)
    path = trial_dir / f"model.{task.kind}"
    gate = task.data.val.subset(spec.gate_images)
    try:
        res = export(c, path, check=gate, min_agreement=spec.gate_agreement, kind=task.kind)
    except AutoslimError as e:
        raise CandidateFailed(str(e)) from e
    runtime = runtime_of(spec.backend)
    if runtime.startswith("openvino") and openvino_version() is not None:
        # OpenVINO runs the file ONNX Runtime was gated on: it must give the same predictions
        agree = runtime_agreement(path, gate, runtime=runtime)
        if agree < spec.gate_agreement:
            path.unlink(missing_ok=True)
            raise CandidateFailed(
                f"runtime gate: {runtime} agrees with ONNX Runtime on {agree:.2%} of the "
                f"{'pixels of the ' if gate.task.dense else ''}{len(gate)} gate images (need >= "
                f"{spec.gate_agreement:.1%}); this file is not measured on {runtime}"
            )
    val_acc, _ = artifact_accuracy(path, task.data.val)
    test_acc, _ = artifact_accuracy(path, task.data.test)
    if not math.isfinite(val_acc):
        raise CandidateFailed("validation accuracy is NaN")
    (trial_dir / "config.json").write_text(config.to_json())
    (trial_dir / "reports.json").write_text(json.dumps(c.report_dict(), indent=1, default=str))
    common = dict(
        status=OK,
        val_accuracy=val_acc,
        test_accuracy=test_acc,
        size_bytes=res.size_bytes,
        teacher_latency_ms=teacher_ms,
        agreement=res.agreement,
        exporter=res.exporter,  # "dynamo" unless the fallback exporters were needed
        num_params=c.num_params(),
        artifact=str(path),
        artifact_sha256=sha256_file(path),
        recovery_loss=c.recovery_loss,
        skipped_layers=sum(len(r.skipped) for r in c.reports) + len(res.skipped),
    )
    if ratio_low is not None and _dominated(task, val_acc, res.size_bytes, ratio_low):
        # behind a measured trial even at its most optimistic latency: not measured (the
        # predicted latency is stored, marked as such, and never makes the front)
        out.update(
            common,
            latency_ms=out["latency_predicted_ms"],
            latency_source="predicted",
            seconds=round(time.perf_counter() - t0, 2),
        )
        return out
    lat, latency_ms = time_candidate(task, path)
    out.update(
        common,
        latency_ms=latency_ms,  # paired ratio x teacher_latency_ms (time_candidate)
        latency_source="measured",
        latency_ratio=lat.ratio,
        latency_raw_ms=lat.median_ms,  # the file's own median, unpaired
        latency_reference_ms=lat.reference_ms,
        latency_p90_ms=lat.p90_ms,
        latency_ci_ms=[lat.ci_low_ms, lat.ci_high_ms],
        latency_runs=lat.runs,
        latency_cold_ms=lat.cold_ms,
        latency_noise="; ".join(lat.noise),  # empty: not noisy
        # where it was measured (the speed-up is against teacher_latency_ms, same device)
        host=task.teacher_timing.get("host"),
        cpu=task.teacher_timing.get("cpu"),
        seconds=round(time.perf_counter() - t0, 2),
    )
    return out
