"""A search as a user runs it: the trials, then the final level, then the outputs."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import optuna

from .errors import UsageError
from .report.html import write_outputs
from .results.refinement import RefineRecipe, refine
from .results.selection import final_picks
from .results.table import final_numbers, table_records, task_of
from .results.view import _view
from .study.run import run_trials
from .study.spec import StudySpec
from .study.status import trial_summary
from .study.task import Task
from .study.workers import _alive, _owner, heal_dead_trials
from .tasks import Task as ModelTask


class SearchResult:
    """What ``search`` returns: the Optuna study, the trial table and where outputs went."""

    def __init__(self, study: optuna.Study, frame, outputs: dict[str, Path], task: Task) -> None:
        self.study, self.frame, self.outputs, self.task = study, frame, outputs, task

    @property
    def front(self):
        return self.frame[self.frame["front"]]


def search(
    spec: StudySpec,
    *,
    progress: bool = True,
    outputs: bool = True,
    task: ModelTask | None = None,
) -> SearchResult:
    """Run (or resume, or join) the study described by ``spec``: its trials until
    ``spec.trials`` are counted (:func:`autoslim.study.run.run_trials`, whichever processes run
    them), then the final level (``final_points``), then the outputs (tables, report) in the
    study folder. ``outputs=False``: the trials only (a worker process of ``--workers K``).

    ``task``: what the model is for, when it is none of the built-in tasks (an
    :class:`autoslim.tasks.Task`; it may bring its own dataset). It is used in this process
    only (``--workers K`` needs the task as a file: ``spec.task = "path/file.py:factory"``);
    the study records ``task = "object:NAME"`` and a resume passes the object again."""
    if task is not None:
        if spec.workers > 1:
            raise UsageError(
                "a task object runs in this process only; with workers > 1 give the task as a "
                "file (task = 'path/to/file.py:factory', --task)"
            )
        spec = dataclasses.replace(spec, task=f"object:{task.key()}", task_object=task)
    study, task = run_trials(spec, progress=progress, outputs=outputs)
    if spec.final_points and outputs:  # the worker processes of --workers K leave it to this one
        finalize(study, task, progress=progress)
    cal = study.user_attrs.get("latency_predictor")
    if cal:
        print(f"note: {cal['line']}", file=sys.stderr)
    if outputs:
        print(trial_summary(study, spec.trials), file=sys.stderr)
    view = _view(
        study, spec.run_dir, spec.storage_url, importance=outputs, artifacts=spec.artifacts
    )
    written = write_outputs(view) if outputs else {}
    return SearchResult(study, view.trials, written, task)


FINAL_WAIT_S = 7200  # the final level waits this long at most for other workers' trials


FINAL_CLAIM_S = 6 * 3600  # a claim of the final level by a worker of another machine holds so long


def finalize(study: optuna.Study, task: Task, *, progress: bool) -> list[dict[str, Any]]:
    """Level 2: the final recovery (the refine recipe of ``final_epochs``) of up to
    ``final_points`` trials of the level-1 front, once every counted trial has finished.
    Each result is recorded on the study and its file stored like a refine's; a resumed
    study reuses the finished ones. Records which trials make up the final level (study
    attribute ``final``)."""
    spec = task.spec
    claim = study.user_attrs.get("final_claim")
    me = _owner()
    if claim and claim["owner"] != me and not study.user_attrs.get("final", {}).get("done"):
        other = claim["owner"]
        live = (
            _alive(other)
            if other.get("host") == me["host"]
            else (time.time() - claim["since"] < FINAL_CLAIM_S)
        )
        if live:  # another worker of this study runs the final level
            print(
                f"note: the final level runs in worker {other.get('host')}:{other.get('pid')}",
                file=sys.stderr,
            )
            return []
    study.set_user_attr("final_claim", {"owner": me, "since": time.time()})
    deadline = time.monotonic() + FINAL_WAIT_S
    while study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if time.monotonic() > deadline:
            break
        heal_dead_trials(study, spec.run_dir)  # a dead worker here; heartbeats elsewhere
        time.sleep(5)
    recipe = RefineRecipe(
        epochs=spec.final_epochs,
        max_steps_per_epoch=spec.final_steps_per_epoch,
        seed=spec.seed,
        temperature=spec.final_temperature,
        alpha=spec.final_alpha,
    )
    view = _view(study, spec.run_dir, spec.storage_url, importance=False, artifacts=spec.artifacts)
    picks = final_picks(view.front, spec.final_points)
    study.set_user_attr("final", {"recipe": recipe.to_dict(), "trials": picks, "done": False})
    out = []
    for i, t in enumerate(picks):
        if progress:
            print(f"final level: trial {t} ({i + 1} of {len(picks)})", file=sys.stderr)
        out.append(refine(view, t, recipe=recipe, progress=progress, task=task))
    study.set_user_attr("final", {"recipe": recipe.to_dict(), "trials": picks, "done": True})
    return out


def summary_json(result: SearchResult) -> str:
    """The front (same columns as ``autoslim report --format json``), the final front (level 2:
    the finally-recovered models, their final numbers in the usual columns), outputs and
    baseline."""
    task = task_of(result.study.user_attrs)
    front = table_records(result.front, task) if len(result.front) else []
    df = result.frame
    final = df[df["final_front"]] if "final_front" in df.columns else df.iloc[:0]
    return json.dumps(
        {
            "front": front,
            "final_front": table_records(final_numbers(final), task) if len(final) else [],
            "outputs": {k: str(v) for k, v in result.outputs.items()},
            "baseline": result.study.user_attrs.get("baseline"),
        },
        indent=2,
        default=str,
    )
