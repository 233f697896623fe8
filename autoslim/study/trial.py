"""The objective: one Optuna trial = sample -> evaluate -> record (metrics, constraints, reasons)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import optuna

from ..errors import Terminated, one_line
from ..measure.predictor import LatencyPredictor
from ..record import OK, OVER_BUDGET, OVER_LATENCY, SCREENED
from .evaluation import evaluate
from .task import CandidateFailed, Task, time_teacher
from .workers import _owner, _surplus, heal_dead_trials

CANARY_DRIFT = 0.03  # canary moved more than this: the trials since the last check are flagged


RETIME_EVERY = 5  # trials between two timings of the teacher (speed-ups use the latest one)


def _suggest(trial: optuna.Trial, task: Task) -> dict[str, Any]:
    params = {}
    for d in task.space.dims:
        k = d.knob
        if k.choices is not None:
            params[d.name] = trial.suggest_categorical(d.name, list(k.choices))
        else:
            params[d.name] = trial.suggest_float(d.name, k.low, k.high, step=k.step)
    return params


def _flag_drift(study: optuna.Study, before: float | None, after: float) -> None:
    """The teacher's file is the canary: re-timed every ``RETIME_EVERY`` trials. If it moved
    by more than ``CANARY_DRIFT`` since the last timing, the trials this process measured in
    between are flagged (study attribute ``latency_drift``: trial number -> note; shown in the
    trial table's ``latency_noise`` column): their latencies came from a machine that changed."""
    if not before or abs(after - before) / before <= CANARY_DRIFT:
        return
    note = f"teacher timing moved {after / before - 1:+.1%} ({before:.4g} -> {after:.4g} ms)"
    pid, flagged = os.getpid(), dict(study.user_attrs.get("latency_drift", {}))
    for t in reversed(study.get_trials(deepcopy=False)):
        if t.user_attrs.get("owner", {}).get("pid") != pid or "latency_ms" not in t.user_attrs:
            continue
        if t.user_attrs.get("teacher_latency_ms") != before:
            break  # measured against an earlier timing: before the last check
        flagged[str(t.number)] = note
    study.set_user_attr("latency_drift", flagged)


def _screened_points(study: optuna.Study) -> list[dict[str, float]]:
    """Every screened candidate of the study (level 0): proxy accuracy and size estimate."""
    return [
        {"accuracy": t.user_attrs["screen_accuracy"], "size": t.user_attrs["size_estimate"]}
        for t in study.get_trials(deepcopy=False)
        if "screen_accuracy" in t.user_attrs
    ]


def _measured_points(study: optuna.Study) -> list[dict[str, Any]]:
    """The study's timed trials as plain data: features, latency ratio to the teacher timed
    alongside, accuracy, size, feasibility (predicted latencies are never learned from)."""
    points = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        a = t.user_attrs
        if a.get("status") != OK or a.get("latency_source", "measured") != "measured":
            continue
        if not a.get("latency_features") or not a.get("teacher_latency_ms"):
            continue
        points.append(
            {
                "features": a["latency_features"],
                "latency": a["latency_ms"] / a["teacher_latency_ms"],
                "accuracy": a["val_accuracy"],
                "size": float(a["size_bytes"]),
                "feasible": bool(a.get("feasible")),
            }
        )
    return points


def refresh_predictor(study: optuna.Study, task: Task, *, seen: dict[str, int]) -> None:
    """Refit the latency predictor on the study's measured trials when there are new ones;
    store its held-out calibration (study attribute ``latency_predictor``) and hand the task
    the predictor only when it is calibrated well enough to decide with."""
    if not task.spec.latency_predictor:
        task.predictor = None
        return
    points = _measured_points(study)
    task.measured = [
        {k: p[k] for k in ("accuracy", "size", "latency")} for p in points if p["feasible"]
    ]
    if len(points) == seen.get("n") or len(points) < 3:
        return
    seen["n"] = len(points)
    predictor = LatencyPredictor().fit(
        [p["features"] for p in points], [p["latency"] for p in points]
    )
    cal = predictor.calibration
    study.set_user_attr("latency_predictor", {**cal.to_dict(), "line": cal.line()})
    task.predictor = predictor if cal.usable else None


def _requeue_interrupted(trial: optuna.Trial, e: KeyboardInterrupt, *, complete: bool) -> None:
    """A trial stopped by SIGTERM or Ctrl-C: record why (Optuna then fails it) and, once its
    parameters were all sampled (``complete``), queue them again, so that the next run of the
    study (a resume) runs it first. Like a killed trial, it does not use up the budget."""
    how = "SIGTERM" if isinstance(e, Terminated) else "Ctrl-C (SIGINT)"
    again = "queued again" if complete else "not started; nothing to queue again"
    try:
        trial.set_user_attr("fail_reason", f"stopped by {how} before it finished; {again}")
        trial.set_user_attr("killed", True)
        if not complete:
            return
        trial.study.add_trial(
            optuna.trial.create_trial(
                state=optuna.trial.TrialState.WAITING,
                params=trial.params,
                distributions=trial.distributions,
                user_attrs={
                    "retry_of": trial.number,
                    "retries": int(trial.user_attrs.get("retries", 0)),
                },
            )
        )
    except Exception:  # noqa: BLE001 - the storage is gone too: the interrupt still wins
        pass


def _objective(task: Task, seed: int):
    spec = task.spec
    since = {"n": 0}  # trials since the teacher was last timed
    seen: dict[str, int] = {}  # measured trials the predictor was last fitted on

    def objective(trial: optuna.Trial) -> tuple[float, ...]:
        try:
            return run(trial)
        except KeyboardInterrupt as e:  # SIGTERM or Ctrl-C: failed with why, and run again
            _requeue_interrupted(trial, e, complete=len(trial.params) == len(task.space.dims))
            raise

    def run(trial: optuna.Trial) -> tuple[float, ...]:
        if _surplus(trial, spec.trials):  # other workers took the last trials of the budget
            trial.set_user_attr("surplus", True)
            trial.study.stop()
            raise optuna.TrialPruned("the study's trial budget is used up by other workers")
        if trial.user_attrs.get("killed"):  # a retry inherits the dead trial's attributes
            trial.set_user_attr("killed", False)
            trial.set_user_attr("fail_reason", "")
        heal_dead_trials(trial.study, spec.run_dir)  # a dead worker of this host: retry now
        refresh_predictor(trial.study, task, seen=seen)
        if since["n"] >= RETIME_EVERY:  # interleaved, so a drifting machine drifts both
            before = task.teacher_timing.get("latency_ms")
            after = time_teacher(task, spec.run_dir)
            _flag_drift(trial.study, before, after)
            since["n"] = 0
        since["n"] += 1
        trial.set_user_attr("owner", {**_owner(), "seed": seed})
        config = task.space.to_config(_suggest(trial, task))
        trial.set_user_attr("config", config.to_json())
        trial.set_user_attr("summary", config.summary())
        if spec.screen_images:
            task.screened = _screened_points(trial.study)
        # a baseline, the sensitivity seed or a retry (enqueued so marked): always trained
        fixed = bool({"enqueued_as", "retry_of"} & set(trial.user_attrs))
        try:
            res = evaluate(
                task, config, spec.run_dir / "trials" / f"{trial.number:05d}", promote=fixed
            )
        except CandidateFailed as e:
            trial.set_user_attr("fail_reason", one_line(str(e)))
            raise
        except Exception as e:  # noqa: BLE001 - ORT, onnx, torch: one trial, not the study
            reason = one_line(f"{type(e).__name__}: {e}")
            trial.set_user_attr("fail_reason", reason)
            raise CandidateFailed(reason) from e
        if (
            "artifact" in res and task.store is not None
        ):  # into the study's store; the store's copy is the only one
            local = Path(res.pop("artifact"))
            res.update(task.store.put_trial(trial, local))
            local.unlink()
        for k, v in res.items():
            if k != "config":
                trial.set_user_attr(k, v)
        if res["status"] == OVER_BUDGET:
            size = res["size_estimate"]
            metrics = {"accuracy": 0.0, "latency": task.baseline["latency_ms"], "size": size}
        elif res["status"] == OVER_LATENCY:  # the predictor's figure: never on a front
            size = res["size_estimate"]
            metrics = {"accuracy": 0.0, "latency": res["latency_predicted_ms"], "size": size}
        elif res["status"] == SCREENED:  # level 0 only: the proxy, never on a front
            size = res["size_estimate"]
            latency = res.get("latency_predicted_ms") or task.baseline["latency_ms"]
            metrics = {"accuracy": res["screen_accuracy"], "latency": latency, "size": size}
        else:
            size = res["size_bytes"]
            metrics = {"accuracy": res["val_accuracy"], "latency": res["latency_ms"], "size": size}
        constraints = {}
        if spec.budget is not None:
            constraints["size"] = float(size - spec.budget)
        if spec.max_latency_ms is not None:
            constraints["latency"] = float(metrics["latency"] - spec.max_latency_ms)
        if spec.max_accuracy_drop is not None:
            drop = task.baseline["val_accuracy"] - metrics["accuracy"]
            constraints["accuracy_drop"] = float(drop - spec.max_accuracy_drop)
        for k, v in constraints.items():
            trial.set_constraint(k, v)
        trial.set_user_attr("constraints", constraints)
        trial.set_user_attr("feasible", all(v <= 0 for v in constraints.values()))
        return tuple(float(metrics[o]) for o in spec.objectives)

    return objective
