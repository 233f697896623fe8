"""The ``autoslim`` command: a thin layer over the library.

Exit codes: 0 ok, 1 runtime failure, 2 usage/input error, 3 ``pick`` found no qualifying
trial, 130 after Ctrl-C, 143 after SIGTERM. Every error is one ``autoslim: error: ...`` line on
stderr (``--verbose``: third-party warnings and, for an unexpected error, the traceback).
Logs and progress go to stderr, results to stdout (``--json`` for machines).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import signal
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from .errors import AutoslimError, Terminated, UsageError, one_line
from .record import OK
from .study.spec import MAX_VALUES  # torch-free: the agent's start-up stays light

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
        help="fashion-mnist | cifar10 | imagefolder:PATH | fashion-mnist-seg | maskfolder:PATH "
        "(default fashion-mnist)",
    )
    p.add_argument("--data-dir", default=None, help="where the dataset files are")
    p.add_argument(
        "--val-size", type=_POS_INT, default=5000, help="validation images split off train"
    )
    p.add_argument(
        "--split-seed", type=_NONNEG_INT, default=0, help="seed of the train/validation split"
    )
    _add_image_args(p)


def _add_image_args(p: argparse.ArgumentParser, default: str | None = "refuse") -> None:
    p.add_argument(
        "--image-size",
        type=_number(int, low=8),
        help="imagefolder: resize and center-crop every image to N x N",
    )
    p.add_argument(
        "--resize", type=_number(int, low=8), help="imagefolder: shorter side before the crop"
    )
    p.add_argument(
        "--bad-images",
        choices=["refuse", "skip"],
        default=default,
        help="imagefolder: refuse unreadable files (default) or skip them, reported once",
    )
    p.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="imagefolder: decode images from their files per batch (default: when large)",
    )


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block) that names the help to read."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"autoslim: error: {message} (see `{self.prog} --help`)\n")


def _number(kind: type, *, low: float | None = None, high: float | None = None, strict=False):
    """An argparse type: an int or float, at least ``low`` (above it with ``strict``), at most
    ``high``; the error says what was expected and what was got."""
    name = "an integer" if kind is int else "a number"
    bound = []
    if low is not None and high is not None and not strict:
        bound.append(f"in [{low:g}, {high:g}]")
    else:
        if low is not None:
            bound.append(f"{'>' if strict else '>='} {low:g}")
        if high is not None:
            bound.append(f"<= {high:g}")
    want = name + (" " + " and ".join(bound) if bound else "")

    def parse(text: str) -> int | float:
        try:
            v = kind(text)
        except ValueError:
            v = None
        if (
            v is None
            or v != v  # nan
            or (low is not None and (v <= low if strict else v < low))
            or (high is not None and v > high)
        ):
            raise argparse.ArgumentTypeError(f"expected {want}; got {text!r}")
        return v

    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


def _shape(text: str) -> tuple[int, ...]:
    """An argparse type: a per-image input shape ``C,H,W`` of positive integers."""
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(
            f"expected positive integers C,H,W (e.g. 3,224,224); got {text!r}"
        )
    return shape


def _add_agent_secret_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--agent-secret",
        metavar="FILE",
        help="remote backend: the agent's secret file (default $AUTOSLIM_AGENT_SECRET)",
    )


_POS_INT = _number(int, low=1)
_NONNEG_INT = _number(int, low=0)
_POS_FLOAT = _number(float, low=0, strict=True)
_FRACTION = _number(float, low=0, high=1)


def _within(field: str, *, low: int) -> Callable[[str], int | float]:
    """An integer flag with the study spec's upper bound of sanity for ``field`` (one bound,
    whether the value comes from a flag or a study file): a few zeros too many is refused at
    once, not run for years."""
    return _number(int, low=low, high=MAX_VALUES[field])


def _fraction_or_none(text: str) -> float | str:
    """``--max-accuracy-drop``: a fraction (0.03 = 3 pt) or 'none' to lift the study file's."""
    from .units import is_no_limit

    if is_no_limit(text):
        return text
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(
            f"expected a fraction in [0, 1] such as 0.03 (= 3 pt) or 'none'; got {text!r}"
        )
    return v


def _out(obj: object, as_json: bool, text: str) -> None:
    if as_json:
        _emit(json.dumps(obj, indent=2, default=str))
    else:
        print(text)


# where a machine-readable result goes: stdout, kept for it alone (see _machine_output)
_RESULTS: list[TextIO] = []


def _emit(text: str, end: str = "\n") -> None:
    """Write a machine-readable result (``--json``, ``report --format json|csv``) to stdout."""
    out = _RESULTS[-1] if _RESULTS else sys.stdout
    out.write(text + end)
    out.flush()


@contextlib.contextmanager
def _machine_output(on: bool):
    """With ``on``, stdout carries the result alone: anything else printed while the command
    runs (a user's model file printing at import, a library's chatter) goes to stderr."""
    if not on:
        yield
        return
    _RESULTS.append(sys.stdout)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        _RESULTS.pop()


@_command("train")
def _train(a: argparse.Namespace) -> int:
    from .data import load_dataset
    from .teacher import TeacherRecipe, get_teacher, teacher_path, train_teacher

    data = load_dataset(
        a.dataset,
        data_dir=a.data_dir,
        val_size=a.val_size,
        seed=a.split_seed,
        image_size=a.image_size,
        resize=a.resize,
        bad_images=a.bad_images,
        stream=a.stream,
    )
    recipe = TeacherRecipe(
        epochs=a.epochs, batch_size=a.batch_size, max_lr=a.lr, max_steps=a.max_steps
    )
    from .models import build_model

    build_model(
        a.model,
        in_channels=data.input_shape[0],
        num_classes=data.num_classes,
        image_size=data.input_shape[1],
        task=data.task,
    )  # fail fast on a bad model name
    if a.force:
        t = train_teacher(a.model, data, recipe=recipe, save_to=teacher_path(a.model, data, recipe))
    else:
        t = get_teacher(a.model, data, recipe=recipe)
    m = t.meta
    metric = "" if data.task.metric == "accuracy" else f" {data.task.metric_label}"
    _out(
        {**m, "path": str(t.path)},
        a.json,
        f"teacher {m['model']} on {m['dataset']}: val{metric} {m['val_accuracy']:.4f}, "
        f"test {m['test_accuracy']:.4f}, {m['size_bytes'] / 1e6:.1f} MB, "
        f"trained in {m.get('train_seconds', float('nan'))} s\ncheckpoint: {t.path}\n"
        "(accuracies of the PyTorch model; `search` reports its exported fp32 ONNX file, "
        "whose float rounding can move the last digits)",
    )
    return 0


@_command("models")
def _models(a: argparse.Namespace) -> int:
    from .models import list_models, model_task

    print("\n".join(f"{n}  ({model_task(n)})" for n in list_models()))
    return 0


@_command("search")
def _search(a: argparse.Namespace) -> int:
    from .report.text import final_table, front_table
    from .results.table import task_of
    from .study.spec import load_study_spec
    from .workflow import search, summary_json

    objectives = None
    if a.objectives:
        objectives = [o.strip() for o in a.objectives.split(",") if o.strip()]
    spec = load_study_spec(
        a.study,
        name=a.name,
        model=a.model,
        dataset=a.dataset,
        task=a.task,
        data_dir=a.data_dir,
        space=a.space,
        budget=a.budget,
        max_latency_ms=a.max_latency,
        max_accuracy_drop=a.max_accuracy_drop,
        objectives=objectives,
        trials=a.trials,
        sampler=a.sampler,
        seed=a.seed,
        split_seed=a.split_seed,
        image_size=a.image_size,
        resize=a.resize,
        bad_images=a.bad_images,
        stream=a.stream,
        storage=a.storage,
        artifacts=a.artifacts,
        backend=a.backend,
        latency_predictor=a.latency_predictor,
        agent_secret=a.agent_secret,
        workers=a.workers,
        threads=a.threads,
        teacher_checkpoint=a.teacher,
        recovery_steps=a.recovery_steps,
        screen_images=a.screen_images,
        promote=a.promote,
        final_points=a.final_points,
        final_epochs=a.final_epochs,
        limit_train=a.limit_train,
        out_dir=a.out_dir,
    )
    result = search(spec, progress=not a.quiet)  # echoes the budget once the inputs are valid
    if a.json:
        _emit(summary_json(result))
    else:
        attrs = result.study.user_attrs
        task = task_of(attrs)
        print(front_table(result.frame, attrs.get("baseline"), attrs.get("spec"), task))
        final = final_table(result.frame, task=task)
        if final:
            print(f"\n{final}")
        n_ok = int((result.frame["status"] == OK).sum()) if len(result.frame) else 0
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
        shape, classes, task = (1, 28, 28), 10, None  # no need to read the data to bind a space
    else:
        d = load_dataset(a.dataset, data_dir=a.data_dir, image_size=a.image_size, resize=a.resize)
        shape, classes, task = d.input_shape, d.num_classes, d.task
    model = build_model(
        a.model, in_channels=shape[0], num_classes=classes, image_size=shape[1], task=task
    )
    stem, cls = stem_and_classifier(a.model, model)
    bound = space.bind(model, torch.zeros(1, *shape), classifier=cls, stem=stem)
    print(f"{space.path} on {a.model}:")
    print(bound.describe())
    return 0


@_command("status")
def _status(a: argparse.Namespace) -> int:
    from .study.status import study_status

    st = study_status(a.study, storage=a.storage)
    if a.json:
        _emit(json.dumps(st, indent=2))
        return 0
    states = ", ".join(f"{n} {k}" for k, n in sorted(st["states"].items())) or "no trial yet"
    rate = f"{st['trials_per_hour']:.1f} trials/hour" if st["trials_per_hour"] else "-"
    eta = f"{st['eta_minutes']:.0f} min" if st["eta_minutes"] is not None else "-"
    print(
        f"study {st['study']} ({st['storage']}): {st['counted']} of {st['budget']} trials "
        f"counted ({st['free_rejects']} rejected before training, not counted); {states}; "
        f"{st['killed']} killed and queued again"
    )
    print(f"throughput {rate} (last 10 counted trials); time left at that rate {eta}")
    for name, w in sorted(st["workers"].items()):
        role = "creator, " if w.get("creator") else ""
        print(
            f"  worker {name}: {role}seed {w.get('seed')}, {w.get('threads')} threads, "
            f"{w['trials']} trials ({w['running']} running), last seen {w['last_seen'] or '-'}"
        )
    return 0


@_command("report")
def _report(a: argparse.Namespace) -> int:
    from .report.data import report_data
    from .report.html import render_html
    from .report.text import final_table, front_table
    from .results.table import output_frame, table_records
    from .results.view import load_study

    if a.images:  # before anything is written
        from .results.export import check_folder

        check_folder(Path(a.images), "--images")

    view = load_study(
        a.study, storage=a.storage, importance=a.format == "html", artifacts=a.artifacts
    )
    df = view.trials
    if a.format == "table":
        print(front_table(df, view.baseline, view.spec, view.task))
        final = final_table(df, task=view.task)
        if final:  # the front of the finally-recovered models, as the search printed it
            print(f"\n{final}")
        if a.all and len(df):
            from .results.table import TABLE_COLUMNS

            cols = [c for c in TABLE_COLUMNS if c not in ("config",)]
            print()
            every = output_frame(df[cols], view.task)  # val_miou: the metric's own name
            print(every.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    elif a.format == "json":
        _emit(json.dumps(table_records(df, view.task), indent=1, default=str))
    elif a.format == "csv":
        _emit(output_frame(df, view.task).to_csv(index=False), end="")
    else:
        data = report_data(view)
        if a.output:  # just the HTML, where asked
            out = Path(a.output)
            if out.suffix != ".html" or not out.parent.is_dir():
                raise UsageError(f"--output must be an .html file in an existing folder; got {out}")
            from .results.export import check_writable

            check_writable(out.parent, "--output")
            path = render_html(data, df, out)
        else:  # the study folder's report.html, trials.csv and trials.parquet, refreshed
            from .report.html import write_outputs

            outputs = write_outputs(view, data)
            path = outputs["html"]
            print("tables: " + ", ".join(str(outputs[k]) for k in ("csv", "parquet")))
        print(f"report: {path} ({path.stat().st_size / 1e6:.1f} MB, opens offline)")
        if a.images:
            from .report.html import write_images

            for p in write_images(data, df, Path(a.images)):
                print(f"image: {p}")
    return 0


def _print_trial(view, r, prefix: str = "") -> None:
    base = view.baseline
    label = view.task["label"]
    m = "" if label == "accuracy" else f" {label}"  # a classifier's line reads as before
    line = (
        f"{prefix}trial {int(r.trial)}: val{m} {r.val_accuracy:.4f}  test{m} "
        f"{r.test_accuracy:.4f}  "
        f"{r.size_bytes:,.0f} bytes  {r.latency_ms:.3f} ms"
    )
    if base:
        line += f"  (vs the teacher: {r.speedup:.1f}x speed-up, {r.compression:.1f}x compression)"
    print(line)
    if r.get("numbers") == "final":
        print(
            f"{' ' * len(prefix)}  final numbers ({int(r.refined_epochs)}-epoch recovery by the "
            f"search); search-time val {r.search_val_accuracy:.4f}, "
            f"{r.search_latency_ms:.3f} ms"
        )
    elif "refined_val_accuracy" in r.index and r.refined_val_accuracy == r.refined_val_accuracy:
        print(
            f"{' ' * len(prefix)}  refined: val {r.refined_val_accuracy:.4f}  test "
            f"{r.refined_test_accuracy:.4f}  {r.refined_latency_ms:.3f} ms "
            f"(search-time values above)"
        )
    print(f"{' ' * len(prefix)}  config: {r.summary}")


@_command("pick")
def _pick(a: argparse.Namespace) -> int:
    from .results.selection import pick
    from .results.view import load_study
    from .units import parse_latency_ms, parse_size

    view = load_study(a.study, storage=a.storage, artifacts=a.artifacts)
    r = pick(
        view,
        max_size=parse_size(a.max_size) if a.max_size else None,
        min_accuracy=a.min_accuracy,
        min_metric=a.min_metric,
        max_latency_ms=parse_latency_ms(a.max_latency) if a.max_latency else None,
        prefer=a.prefer,
        feasible_only=not a.include_infeasible,
        final=False if a.search_time else None,
    )
    if a.json:
        from .results.table import table_records

        rec = table_records(r.to_frame().T, view.task)[0]
        _emit(json.dumps({**rec, "export_command": view.export_command(int(r.trial))}, indent=1))
        return 0
    _print_trial(view, r, prefix="picked ")
    print(f"  export: {view.export_command(int(r.trial))}")
    return 0


@_command("export")
def _export(a: argparse.Namespace) -> int:
    from .results.export import export_trial
    from .results.view import load_study

    view = load_study(a.study, storage=a.storage, artifacts=a.artifacts)
    # a trial the search finally recovered: its final file, unless asked for the search-time one
    refined = a.refined or (view.is_final(a.trial) and not a.search_time and not a.replay)
    res = export_trial(view, a.trial, a.output, replay=a.replay, refined=refined)
    if a.json:
        _emit(json.dumps(res, indent=1))
        return 0
    print(
        f"trial {a.trial} -> {res['output']} ({res['source']} artifact)\n"
        f"  size      {res['size_bytes']:,} bytes (recorded {res['recorded_size_bytes']:,})\n"
        f"  val acc   {res['val_accuracy']:.4f} (recorded {res['recorded_val_accuracy']:.4f})\n"
        f"  test acc  {res['test_accuracy']:.4f} (recorded {res['recorded_test_accuracy']:.4f})\n"
        f"  sha256    {res['sha256']}"
    )
    return 0


@_command("refine")
def _refine(a: argparse.Namespace) -> int:
    from .results.refinement import RefineRecipe, refine
    from .results.view import load_study
    from .units import parse_latency_ms, parse_size

    if (a.trial is None) == (not a.front):
        raise UsageError("give exactly one of --trial N or --front (e.g. --trial 23)")
    recipe = RefineRecipe(
        epochs=a.epochs,
        lr=a.lr,
        batch_size=a.batch_size,
        qat_fraction=a.qat_fraction,
        max_steps_per_epoch=a.max_steps_per_epoch,
        augment=a.augment,
        temperature=a.temperature,
        alpha=a.alpha,
        seed=a.seed,
    )
    view = load_study(a.study, storage=a.storage, artifacts=a.artifacts)
    if a.front:
        from .results.selection import qualifying

        front = qualifying(
            view,
            max_size=parse_size(a.max_size) if a.max_size else None,
            min_accuracy=a.min_accuracy,
            max_latency_ms=parse_latency_ms(a.max_latency) if a.max_latency else None,
            front_only=True,
        )
        trials = front.sort_values("val_accuracy", ascending=False)["trial"].astype(int).tolist()
        folder = Path(a.output) if a.output else None
        if folder is not None:
            if folder.suffix in (".onnx", ".pte"):
                raise UsageError(f"with --front, -o is a folder; got {folder}")
            from .results.export import check_folder

            check_folder(folder, "with --front, -o")
            folder.mkdir(parents=True, exist_ok=True)
        print(f"refining {len(trials)} front points: {trials}", file=sys.stderr)
        ext = view.artifact_name.rpartition(".")[2]
        outs = [folder / f"model-t{t}.{ext}" if folder else None for t in trials]
    else:
        trials, outs = [a.trial], [a.output]
    results = []
    for t, o in zip(trials, outs, strict=True):
        r = refine(view, t, o, recipe=recipe, progress=not a.quiet, restart=a.restart)
        results.append(r)
        if not a.json:
            ratio = ""
            if r.get("teacher_latency_ms"):
                ratio = f", {r['latency_ms'] / r['teacher_latency_ms']:.3f}x teacher latency"
            print(
                f"trial {t} refined ({r['epochs']} epochs{', reused' if r['reused'] else ''}): "
                f"val {r['val_accuracy']:.4f} (search {r['search_val_accuracy']:.4f})  test "
                f"{r['test_accuracy']:.4f} (search {r['search_test_accuracy']:.4f})  "
                f"{r['size_bytes']:,} bytes  {r['latency_ms']:.3f} ms{ratio}\n"
                f"  artifact: {r['output'] or _refined_where(view, t, r)}"
            )
    if a.json:
        _emit(json.dumps(results if a.front else results[0], indent=1, default=str))
    return 0


@_command("measure")
def _measure(a: argparse.Namespace) -> int:
    from .measure import time_files

    got = time_files(
        a.files,
        backend=a.backend,
        secret_file=a.agent_secret,
        rounds=a.rounds,
        runs=a.runs,
        input_shape=a.input_shape,
    )
    if a.json:
        _emit(json.dumps([g.to_dict() for g in got], indent=1))
        return 0
    device = got[0].rounds[0].device
    where = ", ".join(f"{k} {v}" for k, v in device.items() if k in ("host", "cpu", "cores"))
    print(f"{a.backend} ({where or 'device'}), median of {a.rounds} interleaved rounds")
    w = max(4, *(len(str(g.path)) for g in got))
    print(f"{'file':<{w}} {'bytes':>12} {'median ms':>10} {'vs first':>9}")
    for g in got:
        flag = "  noisy" if g.noisy else ""
        print(f"{str(g.path):<{w}} {g.size_bytes:>12,} {g.median_ms:>10.3f} {g.ratio:>9.3f}{flag}")
    return 0


def _refined_where(view: Any, trial: int, r: dict[str, Any]) -> str:
    """Where a refined file is when no -o was given: the study's store, or beside the trial."""
    if r.get("artifact_id"):
        return (
            f"in the study's store (id {r['artifact_id']}); "
            f"`autoslim export {view.cli_ref} --trial {trial} --refined -o model.onnx`"
        )
    return str(r.get("artifact", ""))


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="autoslim", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version="autoslim 0.1.0")
    p.add_argument("--verbose", action="store_true", help=_VERBOSE)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train (or reuse the cached) teacher")
    t.add_argument("--model", default="resnet18")
    _add_data_args(t)
    t.add_argument("--epochs", type=_within("teacher_epochs", low=1), default=6)
    t.add_argument("--batch-size", type=_within("teacher_batch_size", low=1), default=128)
    t.add_argument("--lr", type=_POS_FLOAT, default=0.1, help="one-cycle max learning rate")
    t.add_argument(
        "--max-steps",
        type=_within("teacher_max_steps", low=1),
        default=None,
        help="stop after N steps",
    )
    t.add_argument("--force", action="store_true", help="retrain even if cached")
    t.add_argument("--json", action="store_true")

    sub.add_parser("models", help="list built-in models")
    # handled in main() before this parser (it must not import torch): listed for --help
    sub.add_parser("agent", help="run the device agent (measures ONNX files sent by a search)")

    s = sub.add_parser("search", help="run or resume a compression search (Optuna study)")
    s.add_argument(
        "study",
        nargs="?",
        default=None,
        help="study TOML or a shipped study name (default: default)",
    )
    s.add_argument("--name", help="study name (output folder studies/runs/NAME)")
    s.add_argument("--model")
    s.add_argument("--dataset")
    s.add_argument(
        "--task",
        help="what the model is for: classification | segmentation | path/to/file.py:factory "
        "(a user's autoslim.tasks.Task; default: the dataset's own task)",
    )
    s.add_argument("--data-dir")
    s.add_argument(
        "--space", help="search-space TOML or a shipped space name (default, prune-only, ...)"
    )
    s.add_argument(
        "--budget", help="max artifact size, e.g. 2MB (10^6 bytes) or 1.5MiB ('none': no limit)"
    )
    s.add_argument("--max-latency", help="max latency on the backend, e.g. 0.5ms ('none')")
    s.add_argument(
        "--max-accuracy-drop",
        type=_fraction_or_none,
        help="max val accuracy drop below the teacher, 0.01 = 1 pt ('none' lifts the study's)",
    )
    s.add_argument("--objectives", help="comma list of accuracy,latency,size")
    s.add_argument("--trials", type=_within("trials", low=1), help="total trials in the study")
    s.add_argument("--sampler", choices=["tpe", "nsga2", "random"])
    s.add_argument("--seed", type=_NONNEG_INT, help="sampler seed")
    s.add_argument("--split-seed", type=_NONNEG_INT, help="seed of the train/validation split")
    s.add_argument(
        "--storage", help="any Optuna RDB URL (default: SQLite file in the study folder)"
    )
    s.add_argument(
        "--artifacts",
        metavar="PATH",
        help="the study's artifact store: a folder every worker can read (default "
        "OUT_DIR/artifacts) or s3://BUCKET",
    )
    s.add_argument(
        "--backend",
        help="the runtime candidates are exported for and timed on: onnxruntime-cpu, "
        "onnxruntime-cuda, openvino-cpu, executorch-xnnpack (.pte programs), or "
        "remote:HOST:PORT[/RUNTIME] (a device agent)",
    )
    s.add_argument(
        "--workers",
        type=_within("workers", low=1),
        help="worker processes on this machine, all on one study (global --trials budget)",
    )
    s.add_argument(
        "--threads",
        type=_within("threads", low=1),
        help="torch threads per worker (default: cores / workers)",
    )
    _add_agent_secret_arg(s)
    s.add_argument(
        "--latency-predictor",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="learn latency from the measured trials: pre-check --max-latency, skip timing "
        "candidates a measured trial beats (used once calibrated; default on)",
    )
    s.add_argument("--teacher", help="your own trained checkpoint (state_dict)")
    s.add_argument(
        "--recovery-steps",
        type=_within("recovery_steps", low=0),
        help="KD steps per trial (level 1)",
    )
    s.add_argument(
        "--screen-images",
        type=_within("screen_images", low=0),
        help="level 0: screen every candidate by the BN proxy on N val images (0: off)",
    )
    s.add_argument(
        "--promote", type=_POS_FLOAT, help="level 0: share of screened candidates trained"
    )
    s.add_argument(
        "--final-points",
        type=_within("final_points", low=0),
        help="level 2: final recovery of up to N level-1 front points after the trials (0: off)",
    )
    s.add_argument(
        "--final-epochs",
        type=_within("final_epochs", low=1),
        help="level 2: epochs of the final recovery",
    )
    s.add_argument("--limit-train", type=_POS_INT, help="use only N training images (quick runs)")
    _add_image_args(s, default=None)
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
    _add_image_args(chk)

    def study_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("study", help="study name (studies/runs/NAME) or study folder")
        p.add_argument("--storage", help="Optuna RDB URL if the study was run with --storage")
        p.add_argument(
            "--artifacts",
            metavar="PATH",
            help="where this machine sees the study's artifact store (default: as recorded)",
        )

    r = sub.add_parser("report", help="write the HTML report or print the trial table")
    study_arg(r)
    r.add_argument("--format", choices=["html", "table", "json", "csv"], default="html")
    r.add_argument("-o", "--output", help="HTML file (default STUDY_FOLDER/report.html)")
    r.add_argument("--all", action="store_true", help="with --format table: every trial too")
    r.add_argument("--images", help="also write PNG/SVG plots to this folder (needs kaleido)")

    st = sub.add_parser("status", help="where a study stands: trials, workers, throughput, ETA")
    study_arg(st)
    st.add_argument("--json", action="store_true")

    pk = sub.add_parser("pick", help="choose one trial by constraints and a preference")
    study_arg(pk)
    pk.add_argument("--max-size", help="e.g. 2MB (10^6 bytes) or 1.5MiB")
    pk.add_argument("--min-accuracy", type=_FRACTION, help="min val accuracy, e.g. 0.91")
    pk.add_argument(
        "--min-metric",
        type=_FRACTION,
        help="min val value of the study's metric (accuracy, mIoU, ...), e.g. 0.6",
    )
    pk.add_argument("--max-latency", help="e.g. 0.2ms")
    pk.add_argument(
        "--prefer",
        choices=["latency", "size", "accuracy", "metric"],
        default="latency",
        help="best by latency, size, or the study's metric (accuracy and metric alike)",
    )
    pk.add_argument(
        "--include-infeasible", action="store_true", help="also trials outside the study budgets"
    )
    pk.add_argument(
        "--search-time",
        action="store_true",
        help="use the search-time numbers, not the final level's (when the study has one)",
    )
    pk.add_argument("--json", action="store_true")

    ex = sub.add_parser("export", help="write a trial's verified artifact")
    study_arg(ex)
    ex.add_argument("--trial", type=_NONNEG_INT, required=True, help="trial number")
    ex.add_argument("-o", "--output", required=True, help="where to write the .onnx file")
    ex.add_argument(
        "--replay",
        action="store_true",
        help="rebuild from the recorded recipe, not the stored file",
    )
    ex.add_argument(
        "--refined", action="store_true", help="the artifact `autoslim refine` stored for it"
    )
    ex.add_argument(
        "--search-time",
        action="store_true",
        help="the search-time file of a trial the search finally recovered (default: the final)",
    )
    ex.add_argument("--json", action="store_true")
    ms = sub.add_parser(
        "measure", help="time artifacts side by side (latency and ratio to the first file)"
    )
    ms.add_argument(
        "files",
        nargs="+",
        metavar="FILE",
        help=".onnx files (.pte on executorch-xnnpack); the first is the base",
    )
    ms.add_argument(
        "--backend",
        default="onnxruntime-cpu",
        help="onnxruntime-cpu (default), onnxruntime-cuda, openvino-cpu, executorch-xnnpack or "
        "remote:HOST:PORT[/RUNTIME] (an agent)",
    )
    _add_agent_secret_arg(ms)
    ms.add_argument(
        "--rounds",
        type=_number(int, low=1, high=1000),
        default=5,
        help="interleaved rounds (default 5)",
    )
    ms.add_argument(
        "--runs",
        type=_number(int, low=1, high=1_000_000),
        default=200,
        help="most timed runs per round",
    )
    ms.add_argument(
        "--input-shape", type=_shape, help="C,H,W (default: the one each file declares)"
    )
    ms.add_argument("--json", action="store_true")

    rf = sub.add_parser("refine", help="longer distillation + QAT of a picked trial")
    study_arg(rf)
    rf.add_argument("--trial", type=_NONNEG_INT, help="trial number")
    rf.add_argument("--front", action="store_true", help="every feasible front point, resumable")
    rf.add_argument("-o", "--output", help=".onnx file (with --front: a folder)")
    rf.add_argument(
        "--epochs",
        type=_within("final_epochs", low=1),
        default=5,
        help="KD epochs over the training split",
    )
    rf.add_argument("--lr", type=_POS_FLOAT, default=0.01, help="peak learning rate (cosine decay)")
    rf.add_argument("--batch-size", type=_within("recovery_batch_size", low=1), default=128)
    rf.add_argument(
        "--qat-fraction",
        type=_FRACTION,
        default=0.3,
        help="last share of the steps quantization-aware (default 0.3)",
    )
    rf.add_argument(
        "--max-steps-per-epoch",
        type=_within("recovery_steps", low=1),
        help="cap an epoch (quick runs)",
    )
    rf.add_argument(
        "--augment",
        action="store_true",
        help="distil on random crop + flip batches, the teacher run on each (slower per step)",
    )
    rf.add_argument(
        "--temperature", type=_POS_FLOAT, help="distillation temperature (default: the trial's)"
    )
    rf.add_argument(
        "--alpha", type=_FRACTION, help="weight of the distillation term (default: the trial's)"
    )
    rf.add_argument(
        "--seed",
        type=_NONNEG_INT,
        default=0,
        help="seed of the batch order (default 0; the final level uses the study's seed); "
        "another seed is another record",
    )
    rf.add_argument("--restart", action="store_true", help="discard a checkpoint or earlier result")
    rf.add_argument("--max-size", help="with --front: only points at most this size")
    rf.add_argument(
        "--min-accuracy", type=_FRACTION, help="with --front: only points this accurate"
    )
    rf.add_argument("--max-latency", help="with --front: only points at most this latency")
    rf.add_argument("--quiet", action="store_true", help="no progress bars")
    rf.add_argument("--json", action="store_true")
    for extra in _EXTRA_PARSERS:
        extra(sub)
    leaves = [chk, *(c for n, c in sub.choices.items() if n != "space")]
    for leaf in leaves:  # `autoslim search ... --verbose` as well as `autoslim --verbose search`
        leaf.add_argument(
            "--verbose", action="store_true", default=argparse.SUPPRESS, help=_VERBOSE
        )
    return p


_VERBOSE = "show third-party warnings, and the traceback of an unexpected error"
_EXTRA_PARSERS: list[Callable[[argparse._SubParsersAction], None]] = []


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated


# what each part of the package needs (pyproject extras): a device has only the agent's
_SEARCH_MODULES = {"torch", "torchvision", "optuna", "pandas", "plotly", "onnx", "torch_pruning"}


# what an interrupted command leaves (SIGTERM, Ctrl-C)
_NOTHING = "nothing half-written is left"
_KEPT = {
    "train": "the teacher was not saved (training keeps no checkpoint); `autoslim train` starts "
    "over",
    "search": "finished trials are kept and a running one is queued again; rerun the same "
    "command to resume",
    "refine": "the last epoch's checkpoint is kept; rerun the same command to resume",
}

# errors of a path the user named: not a bug of autoslim (ENOSPC and I/O errors stay exit 1)
_PATH_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR, errno.EISDIR}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["agent"]:  # the device agent: numpy + onnxruntime + starlette, no torch
        from .agent.server import main as agent_main

        return agent_main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    verbose = bool(getattr(args, "verbose", False))
    old = None
    try:
        old = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        with warnings.catch_warnings():
            if not verbose:  # torch / ORT / Optuna warnings are not the user's business
                warnings.simplefilter("ignore")
            machine = bool(getattr(args, "json", False)) or (
                args.command == "report" and args.format in ("json", "csv")
            )
            with _machine_output(machine):
                return _COMMANDS[args.command](args)
    except AutoslimError as e:
        print(f"autoslim: error: {one_line(e, limit=2000)}", file=sys.stderr)
        return e.exit_code
    except Terminated:
        print(
            f"autoslim: terminated (SIGTERM); {_KEPT.get(args.command, _NOTHING)}", file=sys.stderr
        )
        return 143
    except KeyboardInterrupt:
        print(f"autoslim: interrupted; {_KEPT.get(args.command, _NOTHING)}", file=sys.stderr)
        return 130
    except ModuleNotFoundError as e:
        if e.name not in _SEARCH_MODULES or verbose:
            raise
        print(
            f"autoslim: error: `autoslim {args.command}` needs the search part ({e.name} is not "
            "installed here); install it with pip install 'autoslim[search]' (a device that only "
            "measures needs 'autoslim[agent]' and `autoslim agent`)",
            file=sys.stderr,
        )
        return 2
    except BrokenPipeError:  # `autoslim ... | head`: the reader left; say nothing more
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:
        if verbose:
            raise
        if isinstance(e, OSError) and e.errno in _PATH_ERRNOS and e.filename:
            # a path the user named (or its folder) that cannot be read or written: theirs
            print(
                f"autoslim: error: cannot use {e.filename}: {e.strerror}; expected a path this "
                "user can read and write: fix its permissions or pass another path",
                file=sys.stderr,
            )
            return 2
        print(
            f"autoslim: error: unexpected {type(e).__name__}: {one_line(e, limit=1000)} "
            "(a bug: rerun with --verbose for the traceback and report it)",
            file=sys.stderr,
        )
        return 1
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


if __name__ == "__main__":
    sys.exit(main())
