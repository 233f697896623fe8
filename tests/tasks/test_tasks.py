"""The task protocol's contract, for every built-in task, plus the segmentation specifics
(mIoU over the classes present, the ignore index, pixel accuracy) and :func:`load_task`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from autoslim.errors import UsageError
from autoslim.tasks import (
    CACHE_BYTES,
    IGNORE_INDEX,
    Classification,
    Segmentation,
    Task,
    load_task,
)

C = 5  # classes of the hand-made outputs
TASKS = [Classification(), Segmentation(num_classes=C)]
IDS = ["classification", "segmentation"]


def _outputs(task: Task, batch: int = 3, seed: int = 0) -> torch.Tensor:
    """Random raw outputs of ``batch`` samples in the shape ``task`` expects."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, C) if isinstance(task, Classification) else (batch, C, 4, 6)
    return torch.randn(*shape, generator=g)


def _targets(task: Task, batch: int = 3, seed: int = 1) -> torch.Tensor:
    """Random targets of ``batch`` samples: class ids (int64) or uint8 masks."""
    g = torch.Generator().manual_seed(seed)
    if isinstance(task, Classification):
        return torch.randint(0, C, (batch,), generator=g)
    return torch.randint(0, C, (batch, 4, 6), generator=g).to(torch.uint8)


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg, msg
    return msg


# -- the contract, for every built-in task ------------------------------------------------


@pytest.mark.parametrize("task", TASKS, ids=IDS)
def test_loss_is_a_finite_scalar_with_a_gradient(task: Task) -> None:
    out = _outputs(task).requires_grad_()
    loss = task.loss(out, _targets(task))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert out.grad is not None and torch.isfinite(out.grad).all()
    assert float(out.grad.abs().sum()) > 0


@pytest.mark.parametrize("task", TASKS, ids=IDS)
def test_distill_loss_is_zero_on_agreement_and_grows_with_disagreement(task: Task) -> None:
    teacher, y = _outputs(task), _targets(task)
    same = task.distill_loss(teacher.clone(), teacher, y, temperature=4.0, alpha=1.0)
    assert same.ndim == 0
    assert float(same) == pytest.approx(0.0, abs=1e-6)
    # KL is convex in the student's logits and 0 at the teacher's: it grows along any ray
    direction = _outputs(task, seed=7)
    losses = [
        float(task.distill_loss(teacher + eps * direction, teacher, y, temperature=2.0, alpha=1.0))
        for eps in (0.1, 0.5, 1.0, 3.0)
    ]
    assert losses[0] > 0
    assert losses == sorted(losses) and losses[-1] > losses[0] * 10, losses
    # a gradient reaches the student, and alpha < 1 adds the supervised loss
    student = (teacher + direction).requires_grad_()
    loss = task.distill_loss(student, teacher, y, temperature=2.0, alpha=0.5)
    assert torch.isfinite(loss)
    loss.backward()
    assert student.grad is not None and float(student.grad.abs().sum()) > 0
    mixed = task.distill_loss(teacher, teacher, y, temperature=2.0, alpha=0.5)
    assert float(mixed) == pytest.approx(0.5 * float(task.loss(teacher, y)), rel=1e-5)


@pytest.mark.parametrize("task", TASKS, ids=IDS)
def test_predictions_are_batch_first(task: Task) -> None:
    for batch in (1, 3):
        out = _outputs(task, batch=batch)
        pred = task.predictions(out)
        assert pred.shape[0] == batch
        assert torch.equal(pred.long(), out.argmax(1))


@pytest.mark.parametrize("task", TASKS, ids=IDS)
def test_score_holds_the_metric_and_is_one_on_perfect_predictions(task: Task) -> None:
    pred = task.predictions(_outputs(task))
    targets = pred.clone() if isinstance(task, Classification) else pred.to(torch.uint8)
    scores = task.score(pred, targets)
    assert task.metric in scores
    assert scores[task.metric] == pytest.approx(1.0)
    wrong = task.score(pred, _targets(task))
    assert 0.0 <= wrong[task.metric] < 1.0
    assert task.describe() == {
        "name": task.name,
        "metric": task.metric,
        "label": task.metric_label,
    }


@pytest.mark.parametrize("task", TASKS, ids=IDS)
def test_agreement(task: Task) -> None:
    pred = task.predictions(_outputs(task))
    assert task.agreement(pred, pred.clone()) == 1.0
    if isinstance(task, Classification):
        a, b = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 0, 0])
        assert task.agreement(a, b) == pytest.approx(0.5)
    else:  # pixels: 3 of 8 differ
        a = torch.zeros(2, 2, 2, dtype=torch.uint8)
        b = a.clone()
        b[0, 0, 0], b[1, 1, 0], b[1, 1, 1] = 1, 2, 4
        assert task.agreement(a, b) == pytest.approx(5 / 8)


def test_cache_outputs_bounds_the_teacher_cache() -> None:
    seg = Segmentation(num_classes=11)
    # 5,000 masks of 11 x 64 x 64 scores: 450 MB in fp16, recomputed per batch instead
    assert not seg.cache_outputs(samples=5000, output_numel=11 * 64 * 64)
    assert seg.cache_outputs(samples=64, output_numel=11 * 64 * 64)
    assert Classification().cache_outputs(samples=5000, output_numel=10)
    assert CACHE_BYTES == 256 * 2**20


# -- segmentation specifics, on hand-made tensors -----------------------------------------


# one 2x3 mask and a prediction of it; classes 3 and 4 (of 5) occur in neither
TARGET = torch.tensor([[[0, 0, 1], [1, 2, 2]]], dtype=torch.uint8)
PRED = torch.tensor([[[0, 1, 1], [1, 2, 0]]], dtype=torch.uint8)
# by hand: class 0: hit 1 (0,0), union {(0,0),(0,1),(1,2)} = 3 -> 1/3; class 1: hit 2,
# union {(0,1),(0,2),(1,0)} = 3 -> 2/3; class 2: hit 1, union 2 -> 1/2. Mean of 3: 0.5.
# Correct pixels: (0,0), (0,2), (1,0), (1,1): 4 of 6.
MIOU, PIXEL_ACC = (1 / 3 + 2 / 3 + 1 / 2) / 3, 4 / 6


def test_miou_averages_the_classes_present_only() -> None:
    scores = Segmentation(num_classes=5).score(PRED, TARGET)
    assert scores["miou"] == pytest.approx(MIOU)
    assert scores["pixel_accuracy"] == pytest.approx(PIXEL_ACC)
    # classes absent from both do not lower it: the same with exactly the 3 classes present
    assert Segmentation(num_classes=3).score(PRED, TARGET)["miou"] == pytest.approx(MIOU)
    assert Segmentation(num_classes=200).score(PRED, TARGET)["miou"] == pytest.approx(MIOU)
    # a class predicted but absent from the targets counts, with IoU 0
    pred = PRED.clone()
    pred[0, 1, 2] = 4  # was a wrong 0 at a class-2 pixel: class 0's union shrinks to 2
    got = Segmentation(num_classes=5).score(pred, TARGET)
    assert got["miou"] == pytest.approx((1 / 2 + 2 / 3 + 1 / 2 + 0.0) / 4)
    assert got["pixel_accuracy"] == pytest.approx(PIXEL_ACC)


def test_confusion_rows_are_the_targets() -> None:
    cm = Segmentation(num_classes=3).confusion(PRED, TARGET)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]


def test_ignored_pixels_count_in_no_metric() -> None:
    seg = Segmentation(num_classes=5)
    target = torch.cat([TARGET, torch.full((1, 2, 1), IGNORE_INDEX, dtype=torch.uint8)], 2)
    for fill in (0, 3, 4):  # whatever is predicted at the ignored pixels
        pred = torch.cat([PRED, torch.full((1, 2, 1), fill, dtype=torch.uint8)], 2)
        scores = seg.score(pred, target)
        assert scores["pixel_accuracy"] == pytest.approx(PIXEL_ACC)
        assert scores["miou"] == pytest.approx(MIOU)
    # only ignored pixels: no metric at all (nan), not a crash
    empty = seg.score(PRED, torch.full_like(TARGET, IGNORE_INDEX))
    assert empty["miou"] != empty["miou"] and empty["pixel_accuracy"] != empty["pixel_accuracy"]


def test_ignored_pixels_count_in_no_loss() -> None:
    seg = Segmentation(num_classes=5)
    g = torch.Generator().manual_seed(3)
    out = torch.randn(1, 5, 2, 4, generator=g, requires_grad=True)
    target = torch.cat([TARGET, torch.full((1, 2, 1), IGNORE_INDEX, dtype=torch.uint8)], 2)
    loss = seg.loss(out, target)
    assert loss.ndim == 0
    # the mean over the 6 labelled pixels only
    assert loss.item() == pytest.approx(seg.loss(out[..., :3], TARGET).item(), rel=1e-6)
    loss.backward()
    assert float(out.grad[..., 3].abs().sum()) == 0.0
    assert float(out.grad[..., :3].abs().sum()) > 0
    # the supervised half of distillation ignores them too
    kd = seg.distill_loss(out.detach(), out.detach(), target, temperature=1.0, alpha=0.0)
    assert kd.item() == pytest.approx(loss.item(), rel=1e-6)


def test_pixel_accuracy() -> None:
    seg = Segmentation(num_classes=3)
    target = torch.zeros(2, 3, 3, dtype=torch.uint8)
    target[1] = 2
    pred = target.clone()
    pred[0, 0, :2] = 1  # 2 of 18 pixels wrong
    scores = seg.score(pred, target)
    assert scores["pixel_accuracy"] == pytest.approx(16 / 18)
    # class 0: hit 7, union 9; class 1: hit 0, union 2; class 2: hit 9, union 9
    assert scores["miou"] == pytest.approx((7 / 9 + 0 + 1) / 3)


def test_predictions_are_compact_argmax_maps() -> None:
    out = torch.randn(2, 5, 3, 4)
    pred = Segmentation(num_classes=5).predictions(out)
    assert pred.dtype == torch.uint8 and pred.shape == (2, 3, 4)
    assert torch.equal(pred.long(), out.argmax(1))
    wide = Segmentation(num_classes=300).predictions(torch.randn(1, 300, 2, 2))
    assert wide.dtype == torch.int32  # class ids above 255 do not fit a byte


def test_distill_reads_an_fp16_teacher() -> None:
    """Dense teachers' outputs are cached in fp16: the loss reads them as float."""
    seg = Segmentation(num_classes=5)
    student = torch.randn(2, 5, 4, 4)
    teacher = student + 0.5 * torch.randn(2, 5, 4, 4)
    y = torch.zeros(2, 4, 4, dtype=torch.uint8)
    full = seg.distill_loss(student, teacher, y, temperature=4.0, alpha=0.9)
    half = seg.distill_loss(student, teacher.half(), y, temperature=4.0, alpha=0.9)
    assert half.dtype == torch.float32
    assert float(half) == pytest.approx(float(full), rel=1e-2)


def test_segmentation_settings() -> None:
    with pytest.raises(ValueError, match="at least 2 classes"):
        Segmentation(num_classes=1)
    assert Segmentation(num_classes=4).key() == "segmentation"
    assert Segmentation(num_classes=4, ignore_index=0).key() != "segmentation"
    assert Segmentation.dense and not Classification.dense
    assert (Segmentation.metric, Classification.metric) == ("miou", "accuracy")


# -- check_output -------------------------------------------------------------------------


def test_check_output_by_task() -> None:
    seg, cls = Segmentation(num_classes=C), Classification()
    kw = {"batch": 2, "num_classes": C, "image_shape": (1, 8, 8)}
    dense, flat = torch.zeros(2, C, 8, 8), torch.zeros(2, C)
    assert seg.check_output(dense, **kw) is None
    assert cls.check_output(flat, **kw) is None
    for task, wrong in (
        (seg, flat),
        (seg, torch.zeros(2, C, 4, 4)),  # not at the input's resolution
        (seg, torch.zeros(2, C + 1, 8, 8)),
        (seg, {"out": dense}),  # torchvision's dict
        (cls, dense),
        (cls, torch.zeros(2, C + 1)),
        (cls, (flat,)),
    ):
        why = task.check_output(wrong, **kw)
        assert isinstance(why, str) and why and "\n" not in why
    assert "(2, 5, 8, 8)" in seg.check_output(flat, **kw)
    assert "(2, 5)" in cls.check_output(dense, **kw)


# -- load_task ----------------------------------------------------------------------------

USER_TASK = """
from autoslim.tasks import Classification, Task


class Ordinal(Classification):
    name = "ordinal"
    metric = "accuracy"

    def __init__(self, num_classes=None):
        self.num_classes = num_classes


def factory(num_classes):
    return Ordinal(num_classes)


def no_args():
    return Ordinal()


def not_a_task():
    return {"loss": None}


def broken():
    raise RuntimeError("no labels")


def broken_lines():
    raise RuntimeError("no labels\\nsecond line")
"""


@pytest.fixture
def user_task_file(tmp_path: Path) -> Path:
    f = tmp_path / "my_task.py"
    f.write_text(USER_TASK)
    return f


def test_load_builtin_tasks() -> None:
    assert isinstance(load_task("classification", num_classes=None), Classification)
    assert isinstance(load_task("classification", num_classes=7), Classification)
    seg = load_task("segmentation", num_classes=6)
    assert isinstance(seg, Segmentation) and seg.num_classes == 6


def test_load_a_user_task(user_task_file: Path) -> None:
    task = load_task(f"{user_task_file}:factory", num_classes=3)
    assert isinstance(task, Task) and task.name == "ordinal"
    assert task.num_classes == 3  # passed because the factory takes it
    other = load_task(f"{user_task_file}:no_args", num_classes=3)
    assert other.name == "ordinal" and other.num_classes is None
    assert load_task(f"{user_task_file}:no_args", num_classes=None).name == "ordinal"


def test_a_factory_returning_no_task_is_refused(user_task_file: Path) -> None:
    with pytest.raises(UsageError) as e:
        load_task(f"{user_task_file}:not_a_task", num_classes=None)
    msg = _one_line(e)
    assert "dict" in msg and "autoslim.tasks.Task" in msg


def test_a_failing_factory_is_refused(user_task_file: Path) -> None:
    with pytest.raises(UsageError) as e:
        load_task(f"{user_task_file}:broken", num_classes=None)
    msg = _one_line(e)
    assert "RuntimeError" in msg and "no labels" in msg and "fix the factory" in msg


def test_a_failing_factory_with_a_multiline_error_is_refused_in_one_line(
    user_task_file: Path,
) -> None:
    with pytest.raises(UsageError) as e:
        load_task(f"{user_task_file}:broken_lines", num_classes=None)
    assert "no labels" in _one_line(e)


@pytest.mark.parametrize(
    "spec",
    ["detection", "Classification", "", "segmentation-ish", "nope.py:factory"],
)
def test_unknown_tasks_are_refused(spec: str) -> None:
    with pytest.raises(UsageError) as e:
        load_task(spec, num_classes=3)
    _one_line(e)


def test_missing_factory_in_a_user_file_is_refused(user_task_file: Path) -> None:
    with pytest.raises(UsageError) as e:
        load_task(f"{user_task_file}:nothing_here", num_classes=None)
    assert "nothing_here" in _one_line(e)


def test_segmentation_needs_the_class_count() -> None:
    # "segmentation" is built with the dataset's classes (StudySpec.load_data); without them
    # it cannot be built here
    with pytest.raises(UsageError) as e:
        load_task("segmentation", num_classes=None)
    _one_line(e)
