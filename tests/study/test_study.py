"""Study definitions: file values, flag overrides, limits that can be lifted, the fingerprint."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from autoslim.cli import main
from autoslim.study.spec import load_study_spec
from autoslim.study.task import Task
from autoslim.tasks import Classification


def test_default_study_has_an_accuracy_floor_that_a_flag_changes_or_lifts() -> None:
    assert load_study_spec(None).max_accuracy_drop == 0.05
    assert load_study_spec(None, max_accuracy_drop=0.02).max_accuracy_drop == 0.02
    assert load_study_spec(None, max_accuracy_drop="none").max_accuracy_drop is None
    assert load_study_spec(None, budget="2MB").budget == 2_000_000
    assert load_study_spec(None, budget="2MB", max_latency_ms="off").max_latency_ms is None


def test_bad_accuracy_drop_flag_exits_2(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["search", "--max-accuracy-drop", "lots"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--max-accuracy-drop" in err and "'none'" in err and "'lots'" in err


def _task(**overrides: object) -> Task:
    spec = load_study_spec(None, **overrides)
    return Task(
        spec=spec,
        data=SimpleNamespace(fingerprint=lambda: "data", task=Classification()),  # type: ignore[arg-type]
        teacher=SimpleNamespace(content_hash="teacher"),  # type: ignore[arg-type]
        space=SimpleNamespace(fingerprint=lambda: "space"),  # type: ignore[arg-type]
        classifier="fc",
        stem="conv1",
    )


def test_constraints_are_part_of_the_fingerprint() -> None:
    floor = _task(budget="2MB").fingerprint()
    assert floor["max_accuracy_drop"] == "0.05"
    assert _task(budget="2MB", max_accuracy_drop=0.02).fingerprint() != floor
    # a study run without a limit has no key for it, so older studies keep resuming
    lifted = _task(budget="2MB", max_accuracy_drop="none").fingerprint()
    assert "max_accuracy_drop" not in lifted and "max_latency_ms" not in lifted
    assert _task(budget="2MB", max_latency_ms="0.5ms").fingerprint()["max_latency_ms"] == "0.5"
