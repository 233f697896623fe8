"""Refine: a longer distillation + QAT of a picked trial, resumable, stored in the study."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .._files import atomic_copy, atomic_json, sha256_file
from ..artifact import artifact_accuracy
from ..config import CompressionConfig, DistillConfig
from ..errors import ExportError, RecoveryError, UsageError
from ..passes.distill import Recovery, distill, recalibrate_bn
from ..passes.quantize import act_ranges_of, calibrate, snap_biases
from ..pipeline import (
    Compressed,
    build_student,
    cached_teacher_logits,
    export,
    is_quantized,
    to_fake_quant,
)
from ..study.spec import MAX_VALUES
from ..teacher import evaluate_accuracy
from .export import check_onnx_output
from .view import StudyView

CALIB_SIZE = 256  # images used to calibrate activation ranges (as in the search)


@dataclass(frozen=True)
class RefineRecipe:
    """The refine fine-tune: KD epochs over the training split, SGD + Nesterov, cosine decay.

    ``qat_fraction``: the last share of the steps runs with fake quantization when the config
    quantizes any layer (as in the search's recovery; the switch may fall inside an epoch).
    ``max_steps_per_epoch`` caps an epoch for quick runs (default: one full pass).
    ``augment``: distil on augmented batches (random crop + flip) with the teacher run on each,
    instead of the teacher's cached logits for the evaluation view (slower per step; the
    student sees new views every epoch instead of fitting the same targets again).
    ``temperature`` / ``alpha``: the distillation loss of the refine (None: the trial's own
    sampled settings). The settings that recover best in 150 steps need not be the ones that
    recover best in epochs (BENCHMARKS.md, "Final front").
    """

    epochs: int = 5  # from a sweep of 1, 2, 3, 5 epochs: BENCHMARKS.md, "Refine"
    lr: float = 0.01
    batch_size: int = 128
    qat_fraction: float = 0.3
    max_steps_per_epoch: int | None = None
    seed: int = 0
    augment: bool = False
    temperature: float | None = None
    alpha: float | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.epochs <= MAX_VALUES["final_epochs"]:  # the final level's bound
            raise UsageError(
                f"--epochs must be in [1, {MAX_VALUES['final_epochs']}]; got {self.epochs}"
            )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UsageError(f"--lr must be a positive number; got {self.lr}")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1; got {self.batch_size}")
        if not 0 <= self.qat_fraction <= 1:
            raise UsageError(f"--qat-fraction must be in [0, 1]; got {self.qat_fraction}")
        if self.temperature is not None and not (
            math.isfinite(self.temperature) and 0 < self.temperature <= 100
        ):
            raise UsageError(f"--temperature must be in (0, 100]; got {self.temperature}")
        if self.alpha is not None and not 0 <= self.alpha <= 1:
            raise UsageError(f"--alpha must be in [0, 1]; got {self.alpha}")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise UsageError(f"--max-steps-per-epoch must be >= 1; got {self.max_steps_per_epoch}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        # refines recorded before these options stay reusable: unset ones are left out
        for k, unset in (("augment", False), ("temperature", None), ("alpha", None)):
            if d[k] is unset:
                del d[k]
        return d

    def distill_for(self, config: CompressionConfig) -> DistillConfig:
        """The distillation loss this recipe uses on ``config``: its own, or the override."""
        own = config.distill
        return DistillConfig(
            temperature=own.temperature if self.temperature is None else self.temperature,
            alpha=own.alpha if self.alpha is None else self.alpha,
        )


def train_and_export(
    task: Any,
    config: Any,
    recipe: RefineRecipe,
    workdir: Path,
    *,
    ident: dict[str, Any],
    progress: bool = True,
    label: str = "refine",
) -> tuple[Any, list[dict[str, Any]], float]:
    """The refine core for any config on a task: epochs of KD (+QAT), then the gated artifact.

    Writes ``workdir/checkpoint.pt`` after every epoch (resumed when its ``ident`` matches) and
    ``workdir/model.onnx``. Returns (export result, per-epoch history, seconds incl. resumed).
    """
    t0 = time.perf_counter()
    spec = task.spec
    data, teacher = task.data, task.teacher.model.eval()
    student, reports, factorized = build_student(
        teacher, config, example=task.example, classifier=task.classifier, stem=task.stem
    )
    quantized = is_quantized(config)
    train = data.train
    spe = len(train) // recipe.batch_size
    if recipe.max_steps_per_epoch:
        spe = min(spe, recipe.max_steps_per_epoch)
    if spe < 1:
        raise UsageError(
            f"the training split has {len(train)} images, fewer than one batch of "
            f"{recipe.batch_size}; lower --batch-size"
        )
    total = spe * recipe.epochs
    q_start = total - int(round(total * recipe.qat_fraction)) if quantized else total
    calib = train.head(CALIB_SIZE)
    ckpt_path = workdir / "checkpoint.pt"
    start, history, in_qat, before = 0, [], False, 0.0
    workdir.mkdir(parents=True, exist_ok=True)
    if ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if ck.get("ident") != json.dumps(ident, sort_keys=True):
            raise UsageError(
                f"{ckpt_path} holds an interrupted {label} with another recipe "
                f"({ck.get('recipe')}); rerun with that recipe or pass --restart"
            )
        if ck["in_qat"]:
            student, in_qat = to_fake_quant(student, config, factorized, reports), True
        student.load_state_dict(ck["state_dict"])
        start, history, before = int(ck["epoch"]), list(ck["history"]), float(ck["seconds"])
        print(f"{label}: resuming after epoch {start}", file=sys.stderr)
    elif any(r.touched for r in reports):
        recalibrate_bn(student, train, batches=20, batch_size=recipe.batch_size)
    logits = (
        None
        if recipe.augment
        else cached_teacher_logits(teacher, train, data, task.teacher.content_hash)
    )
    rec = Recovery(
        steps=total,
        batch_size=recipe.batch_size,
        lr=recipe.lr,
        subset=len(train),
        seed=recipe.seed,
        augment=recipe.augment,
    )
    bar = tqdm(
        total=recipe.epochs,
        initial=start,
        desc=label,
        unit="epoch",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    try:
        for epoch in range(start, recipe.epochs):
            loss = float("nan")
            first, end = epoch * spe, (epoch + 1) * spe
            for lo, hi, qat in (
                (first, min(end, q_start), False),
                (max(first, q_start), end, True),
            ):
                if hi <= lo:
                    continue
                if qat and not in_qat:  # BN re-estimated on the final float weights, then folded
                    recalibrate_bn(student, train, batches=20, batch_size=recipe.batch_size)
                    student, in_qat = to_fake_quant(student, config, factorized, reports), True
                    calibrate(student, calib)
                try:
                    loss = distill(
                        student,
                        train,
                        logits,
                        recipe.distill_for(config),
                        steps=hi - lo,
                        recovery=rec,
                        start_step=lo,
                        total_steps=total,
                        teacher=teacher,
                    )
                except FloatingPointError as e:
                    raise RecoveryError(
                        f"{label}: the distillation diverged in epoch {epoch + 1} ({e}); "
                        f"lower --lr (now {recipe.lr}), e.g. --lr {recipe.lr / 2:g}"
                    ) from e
            val = evaluate_accuracy(student, data.val)
            history.append({"epoch": epoch + 1, "loss": loss, "val_accuracy": val, "qat": in_qat})
            tmp = ckpt_path.with_name(".checkpoint.pt.tmp")
            torch.save(
                {
                    "ident": json.dumps(ident, sort_keys=True),
                    "recipe": recipe.to_dict(),
                    "epoch": epoch + 1,
                    "in_qat": in_qat,
                    "history": history,
                    "state_dict": student.state_dict(),
                    "seconds": before + time.perf_counter() - t0,
                },
                tmp,
            )
            os.replace(tmp, ckpt_path)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", val_acc=f"{val:.4f}", qat=in_qat)
    finally:
        bar.close()
    if not in_qat:  # running BN statistics lag behind the weights (see pipeline.compress)
        recalibrate_bn(student, train, batches=20, batch_size=recipe.batch_size)
    if quantized and not in_qat:  # qat_fraction=0: quantise after training, calibrated
        student, in_qat = to_fake_quant(student, config, factorized, reports), True
        calibrate(student, calib)
    student.eval()
    if in_qat:
        snap_biases(student)  # the int32 biases the file will hold
    c = Compressed(
        student, config, reports, task.example, calib, act_ranges_of(student), factorized
    )
    res = export(
        c,
        workdir / f"model.{task.kind}",
        check=data.val.subset(spec.gate_images),
        min_agreement=spec.gate_agreement,
        kind=task.kind,
    )
    return res, history, before + time.perf_counter() - t0


def refine(
    view: StudyView,
    trial: int,
    output: str | Path | None = None,
    *,
    recipe: RefineRecipe | None = None,
    progress: bool = True,
    restart: bool = False,
    task: Any = None,
) -> dict[str, Any]:
    """Refine trial ``trial`` of a stored study; return its refined measurements (plain data).

    Resumes from the last epoch checkpoint of an interrupted run with the same recipe; a
    finished refine with the same recipe is reused (its artifact copied to ``output``).
    ``restart`` discards both. The refined artifact must have the trial's exact size, else
    :class:`ExportError` and nothing is recorded.
    """
    from ..study.task import build_task, time_candidate, time_teacher

    recipe = recipe or RefineRecipe()
    out = (
        check_onnx_output(output, view.artifact_name.rpartition(".")[2])
        if output is not None
        else None
    )
    row = view.measured_row(trial)
    if not row["feasible"]:
        raise UsageError(
            f"trial {trial} of study {view.name!r} is infeasible (outside the study's budgets: "
            f"{row.get('summary', '')}); refine a feasible trial, e.g. from `autoslim pick`"
        )
    rdir = view.refined_dir(trial)  # this machine's work folder: checkpoint, then the file
    ckpt_path = rdir / "checkpoint.pt"
    done = view.refined.get(trial)
    if restart:
        ckpt_path.unlink(missing_ok=True)
        done = None
    if done is not None and done.get("recipe") == recipe.to_dict():
        if out is not None:
            view.fetch(trial, out, refined=True)
        return {**done, "reused": True, "output": str(out) if out else None}
    if task is None:  # ``task``: the study's, when the caller has it built (the search)
        task = build_task(view.study_spec, progress=progress)
    want = view.teacher.get("content_hash")
    if want and task.teacher.content_hash != want:
        raise UsageError(
            f"the teacher found for study {view.name!r} ({task.teacher.content_hash}) is not the "
            f"one it was searched with ({want}); restore that checkpoint to refine its trials"
        )
    config = view.config(trial)
    ident = {"trial": trial, "config": config.to_json(), "recipe": recipe.to_dict()}
    res, history, seconds = train_and_export(
        task, config, recipe, rdir, ident=ident, progress=progress, label=f"refine trial {trial}"
    )
    art = rdir / f"model.{task.kind}"
    data = task.data
    want = view.artifact_size(trial)
    if res.size_bytes != want:
        art.unlink(missing_ok=True)
        raise ExportError(
            f"the refined artifact of trial {trial} is {res.size_bytes:,} bytes but the trial's is "
            f"{want:,} (same architecture and bits must give the same file); nothing was recorded"
        )
    teacher_ms = time_teacher(task, view.run_dir)  # side by side, in this process
    _, latency_ms = time_candidate(task, art, run_dir=view.run_dir)  # paired with the teacher
    result = {
        "trial": trial,
        "recipe": recipe.to_dict(),
        "epochs": recipe.epochs,
        "val_accuracy": artifact_accuracy(art, data.val)[0],
        "test_accuracy": artifact_accuracy(art, data.test)[0],
        "size_bytes": res.size_bytes,
        "latency_ms": latency_ms,
        "agreement": res.agreement,
        "search_val_accuracy": float(row["val_accuracy"]),
        "search_test_accuracy": float(row["test_accuracy"]),
        "search_latency_ms": float(row["latency_ms"]),
        "teacher_latency_ms": teacher_ms,
        **{k: task.teacher_timing[k] for k in ("host", "cpu")},
        "history": history,
        "artifact": str(art),
        "sha256": sha256_file(art),
        "seconds": round(seconds, 1),
    }
    store = view.store()
    if store is not None:  # into the study's store: any machine can export it
        result.pop("artifact")
        result = store.put_refined(trial, result, art)
    else:  # a study from before the store: beside the trial, as then
        atomic_json(result, rdir / "result.json")
    view.refined[trial] = result
    ckpt_path.unlink(missing_ok=True)
    if out is not None:
        atomic_copy(art, out)
    if store is not None:
        art.unlink()
    return {**result, "reused": False, "output": str(out) if out else None}
