"""The ``autoslim`` command: a thin layer over the library.

Exit codes: 0 ok, 1 runtime failure, 2 usage/input error, 130 after Ctrl-C.
Logs and progress go to stderr, results to stdout (``--json`` for machines).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from .errors import AutoslimError

__all__ = ["main"]

_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def _command(name: str):
    def wrap(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        _COMMANDS[name] = fn
        return fn

    return wrap


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dataset",
        default="fashion-mnist",
        help="fashion-mnist | cifar10 | imagefolder:PATH (default fashion-mnist)",
    )
    p.add_argument("--data-dir", default=None, help="where the dataset files are")
    p.add_argument("--val-size", type=int, default=5000, help="validation images split off train")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/validation split")


def _out(obj: object, as_json: bool, text: str) -> None:
    print(json.dumps(obj, indent=2, default=str) if as_json else text)


@_command("train")
def _train(a: argparse.Namespace) -> int:
    from .data import load_dataset
    from .teacher import TeacherRecipe, get_teacher, teacher_path, train_teacher

    data = load_dataset(a.dataset, data_dir=a.data_dir, val_size=a.val_size, seed=a.seed)
    recipe = TeacherRecipe(
        epochs=a.epochs, batch_size=a.batch_size, max_lr=a.lr, max_steps=a.max_steps
    )
    from .models import build_model

    build_model(
        a.model,
        in_channels=data.input_shape[0],
        num_classes=data.num_classes,
        image_size=data.input_shape[1],
    )  # fail fast on a bad model name
    if a.force:
        t = train_teacher(a.model, data, recipe=recipe, save_to=teacher_path(a.model, data, recipe))
    else:
        t = get_teacher(a.model, data, recipe=recipe)
    m = t.meta
    _out(
        {**m, "path": str(t.path)},
        a.json,
        f"teacher {m['model']} on {m['dataset']}: val {m['val_accuracy']:.4f}, "
        f"test {m['test_accuracy']:.4f}, {m['size_bytes'] / 1e6:.1f} MB, "
        f"trained in {m.get('train_seconds', float('nan'))} s\ncheckpoint: {t.path}",
    )
    return 0


@_command("models")
def _models(a: argparse.Namespace) -> int:
    from .models import list_models

    print("\n".join(list_models()))
    return 0


@_command("search")
def _search(a: argparse.Namespace) -> int:
    from .report import front_table
    from .runner import search, summary_json
    from .study import load_study_spec
    from .units import format_size

    objectives = None
    if a.objectives:
        objectives = [o.strip() for o in a.objectives.split(",") if o.strip()]
    spec = load_study_spec(
        a.study,
        name=a.name,
        model=a.model,
        dataset=a.dataset,
        data_dir=a.data_dir,
        space=a.space,
        budget=a.budget,
        max_latency_ms=a.max_latency,
        max_accuracy_drop=a.max_accuracy_drop,
        objectives=objectives,
        trials=a.trials,
        sampler=a.sampler,
        seed=a.seed,
        storage=a.storage,
        backend=a.backend,
        teacher_checkpoint=a.teacher,
        recovery_steps=a.recovery_steps,
        limit_train=a.limit_train,
        out_dir=a.out_dir,
    )
    if spec.budget is not None:
        print(
            f"budget: {spec.budget:,} bytes ({format_size(spec.budget)}; "
            "MB = 10^6 bytes, MiB = 2^20)",
            file=sys.stderr,
        )
    result = search(spec, progress=not a.quiet)
    if a.json:
        print(summary_json(result))
    else:
        print(front_table(result.frame, result.study.user_attrs.get("baseline")))
        n_ok = int((result.frame["status"] == "ok").sum()) if len(result.frame) else 0
        print(
            f"\n{len(result.frame)} trials ({n_ok} measured); outputs: "
            + ", ".join(str(p) for p in result.outputs.values())
        )
    return 0


@_command("space")
def _space(a: argparse.Namespace) -> int:
    import torch

    from .data import load_dataset
    from .models import build_model, stem_and_classifier
    from .space import load_space

    space = load_space(a.file)
    if a.dataset == "fashion-mnist" and a.data_dir is None:
        shape, classes = (1, 28, 28), 10  # no need to read the data to bind a space
    else:
        d = load_dataset(a.dataset, data_dir=a.data_dir)
        shape, classes = d.input_shape, d.num_classes
    model = build_model(a.model, in_channels=shape[0], num_classes=classes, image_size=shape[1])
    stem, cls = stem_and_classifier(a.model, model)
    bound = space.bind(model, torch.zeros(1, *shape), classifier=cls, stem=stem)
    print(f"{space.path} on {a.model}:")
    print(bound.describe())
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="autoslim", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version="autoslim 0.1.0")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train (or reuse the cached) teacher")
    t.add_argument("--model", default="resnet18")
    _add_data_args(t)
    t.add_argument("--epochs", type=int, default=6)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=0.1, help="one-cycle max learning rate")
    t.add_argument("--max-steps", type=int, default=None, help="stop after N steps (quick runs)")
    t.add_argument("--force", action="store_true", help="retrain even if cached")
    t.add_argument("--json", action="store_true")

    sub.add_parser("models", help="list built-in models")

    s = sub.add_parser("search", help="run or resume a compression search (Optuna study)")
    s.add_argument(
        "study", nargs="?", default=None, help="study TOML (default studies/default.toml)"
    )
    s.add_argument("--name", help="study name (output folder studies/runs/NAME)")
    s.add_argument("--model")
    s.add_argument("--dataset")
    s.add_argument("--data-dir")
    s.add_argument("--space", help="search-space TOML or a name in search_spaces/")
    s.add_argument("--budget", help="max artifact size, e.g. 2MB (10^6 bytes) or 1.5MiB")
    s.add_argument("--max-latency", help="max latency on the backend, e.g. 0.5ms")
    s.add_argument("--max-accuracy-drop", type=float, help="max val accuracy drop, 0.01 = 1 pt")
    s.add_argument("--objectives", help="comma list of accuracy,latency,size")
    s.add_argument("--trials", type=int, help="total trials in the study")
    s.add_argument("--sampler", choices=["tpe", "nsga2", "random"])
    s.add_argument("--seed", type=int)
    s.add_argument(
        "--storage", help="any Optuna RDB URL (default: SQLite file in the study folder)"
    )
    s.add_argument(
        "--backend", help="latency backend (onnxruntime-cpu, onnxruntime-cuda, torch-cpu)"
    )
    s.add_argument("--teacher", help="your own trained checkpoint (state_dict)")
    s.add_argument("--recovery-steps", type=int, help="KD steps per trial (fidelity)")
    s.add_argument("--limit-train", type=int, help="use only N training images (quick runs)")
    s.add_argument("--out-dir", help="output folder (default studies/runs/NAME)")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.add_argument("--json", action="store_true")

    sp = sub.add_parser("space", help="search-space tools")
    spsub = sp.add_subparsers(dest="space_command", required=True)
    chk = spsub.add_parser("check", help="show which layers each rule matches")
    chk.add_argument("file")
    chk.add_argument("--model", default="resnet18")
    chk.add_argument("--dataset", default="fashion-mnist")
    chk.add_argument("--data-dir")
    for extra in _EXTRA_PARSERS:
        extra(sub)
    return p


_EXTRA_PARSERS: list[Callable[[argparse._SubParsersAction], None]] = []


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except AutoslimError as e:
        print(f"autoslim: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("autoslim: interrupted; finished work is kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
