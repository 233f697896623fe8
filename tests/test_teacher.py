"""Teacher training and the teacher cache."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from conftest import TINY, TINY_RECIPE

from autoslim import DataSplits, Teacher, TeacherRecipe, UsageError, build_model, get_teacher
from autoslim.teacher import cache_dir, evaluate_accuracy, load_checkpoint, predict, teacher_path


def test_trained_teacher_is_well_above_chance(tiny_teacher: Teacher, fmnist: DataSplits) -> None:
    m = tiny_teacher.meta
    assert m["steps"] == 150
    assert m["val_accuracy"] > 0.5  # chance is 0.1
    assert m["test_accuracy"] > 0.5
    assert evaluate_accuracy(tiny_teacher.model, fmnist.val) == pytest.approx(m["val_accuracy"])
    assert m["model"] == TINY and m["dataset"] == "fashion-mnist"
    assert m["data_fingerprint"] == fmnist.fingerprint()
    assert m["num_params"] == sum(p.numel() for p in tiny_teacher.model.parameters())
    assert not tiny_teacher.model.training


def test_teacher_is_saved_in_the_cache(tiny_teacher: Teacher, autoslim_cache: Path) -> None:
    assert cache_dir() == autoslim_cache
    assert tiny_teacher.path is not None and tiny_teacher.path.is_file()
    assert tiny_teacher.path.parent == autoslim_cache / "teachers"
    assert not list(tiny_teacher.path.parent.glob("*.tmp"))  # atomic save left nothing behind


def test_second_get_teacher_reuses_the_checkpoint(
    tiny_teacher: Teacher, fmnist: DataSplits
) -> None:
    mtime = tiny_teacher.path.stat().st_mtime_ns
    again = get_teacher(TINY, fmnist, recipe=TINY_RECIPE, progress=False)
    assert again.path == tiny_teacher.path
    assert again.content_hash == tiny_teacher.content_hash != ""
    assert again.meta["train_seconds"] == tiny_teacher.meta["train_seconds"]
    assert tiny_teacher.path.stat().st_mtime_ns == mtime  # not retrained, not rewritten
    x = fmnist.val.x[:64]
    assert torch.equal(predict(again.model, x), predict(tiny_teacher.model, x))


def test_cache_key_depends_on_recipe_and_split(fmnist: DataSplits) -> None:
    base = teacher_path(TINY, fmnist, TINY_RECIPE)
    assert teacher_path(TINY, fmnist, TINY_RECIPE) == base
    assert teacher_path(TINY, fmnist, TeacherRecipe(max_steps=151, batch_size=64)) != base
    assert teacher_path("resnet18", fmnist, TINY_RECIPE) != base


def test_checkpoint_loads_with_weights_only(tiny_teacher: Teacher) -> None:
    obj = torch.load(tiny_teacher.path, map_location="cpu", weights_only=True)
    assert set(obj) == {"state_dict", "meta"}
    assert obj["meta"]["content_hash"] == tiny_teacher.content_hash
    model = build_model(TINY)
    model.load_state_dict(obj["state_dict"])
    for k, v in tiny_teacher.model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)


def test_user_state_dict_checkpoint(
    tiny_teacher: Teacher, fmnist: DataSplits, tmp_path: Path
) -> None:
    path = tmp_path / "mine.pt"
    torch.save(tiny_teacher.model.state_dict(), path)
    t = load_checkpoint(path, TINY, fmnist)
    x = fmnist.val.x[:64]
    assert torch.equal(predict(t.model, x), predict(tiny_teacher.model, x))
    assert t.content_hash == tiny_teacher.content_hash  # same weights, same hash
    assert t.meta["val_accuracy"] == pytest.approx(tiny_teacher.meta["val_accuracy"])
    assert t.meta["source"] == str(path)
    via_get = get_teacher(TINY, fmnist, checkpoint=path, progress=False)
    assert via_get.content_hash == tiny_teacher.content_hash and via_get.path == path


def test_checkpoint_for_the_wrong_model(tiny_teacher: Teacher, fmnist: DataSplits) -> None:
    with pytest.raises(UsageError, match="does not fit model 'resnet18'") as e:
        load_checkpoint(tiny_teacher.path, "resnet18", fmnist)
    assert e.value.exit_code == 2
    assert "\n" not in str(e.value)


def test_missing_or_unsafe_checkpoint(fmnist: DataSplits, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        load_checkpoint(tmp_path / "absent.pt", TINY, fmnist)
    opaque = tmp_path / "pickled.pt"
    with open(opaque, "wb") as f:
        pickle.dump({"state_dict": Path("not/allowed/by/weights_only")}, f, protocol=2)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"definitely not a checkpoint")
    for bad in (opaque, garbage):
        with pytest.raises(UsageError, match="weights_only=True"):
            load_checkpoint(bad, TINY, fmnist)
