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
