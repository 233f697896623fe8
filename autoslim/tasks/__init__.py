"""Tasks: what a model is for (see :class:`Task`). Built in: ``classification`` and
``segmentation``; any other through a :class:`Task` subclass (``--task path/file.py:factory``
or ``autoslim.search(..., task=...)``)."""

from __future__ import annotations

from .base import CACHE_BYTES, Task
from .classification import Classification
from .segmentation import IGNORE_INDEX, Segmentation

__all__ = [
    "Task",
    "Classification",
    "Segmentation",
    "IGNORE_INDEX",
    "CACHE_BYTES",
    "BUILTIN_TASKS",
    "load_task",
]

BUILTIN_TASKS = ("classification", "segmentation")


def load_task(spec: str, *, num_classes: int | None) -> Task:
    """The task named ``spec``: a built-in name, or a user's ``path/to/file.py:factory`` /
    ``package.module:factory`` (called with ``num_classes`` when it takes it) returning a
    :class:`Task`. Raises :class:`~autoslim.errors.UsageError` (one line) otherwise."""
    import inspect

    from .._user import load_callable
    from ..errors import UsageError, one_line

    if spec == "classification":
        return Classification()
    if spec == "segmentation":
        if num_classes is None:
            raise UsageError(
                "task segmentation needs the dataset's number of classes; load the data first "
                "(StudySpec.load_data) or build autoslim.tasks.Segmentation(num_classes=N)"
            )
        return Segmentation(num_classes=num_classes)
    if ":" not in spec:  # "segmentation" needs the dataset's classes: see StudySpec.load_data
        raise UsageError(
            f"unknown task {spec!r}; expected {' or '.join(BUILTIN_TASKS)}, or a user task "
            "'path/to/file.py:factory' returning an autoslim.tasks.Task"
        )
    factory = load_callable(spec, what="task", error=UsageError, names=", ".join(BUILTIN_TASKS))
    kwargs = {}
    try:
        if num_classes is not None and "num_classes" in inspect.signature(factory).parameters:
            kwargs["num_classes"] = num_classes
    except (TypeError, ValueError):
        pass
    try:
        task = factory(**kwargs)
    except Exception as e:  # the user's code: their error to fix
        raise UsageError(
            f"task factory {spec!r} raised {type(e).__name__}: {one_line(str(e))}; fix the factory"
        ) from e
    if not isinstance(task, Task):
        raise UsageError(
            f"task factory {spec!r} returned {type(task).__name__}; expected an "
            "autoslim.tasks.Task subclass instance"
        )
    return task
