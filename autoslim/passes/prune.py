"""Structural channel pruning on Torch-Pruning's dependency graph.

One ratio per coupled channel group (residual-coupled layers share one). A group is named by
the first module, in ``named_modules()`` order, whose output channels it prunes; that name is
stable across fresh instances of the same architecture. Channels kept are rounded down to a
multiple of ``round_to`` (at least ``round_to``); the widths are read back after pruning and
reported. Channels are physically removed, so the exported file is smaller and faster.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from ..config import CompressionConfig
from ..errors import AutoslimError
from . import PassReport

__all__ = ["GroupInfo", "list_groups", "prune_model", "kept_channels", "groups_and_note"]


class PruningError(AutoslimError):
    """Torch-Pruning failed while removing channels (the candidate fails, the study goes on)."""


@dataclass(frozen=True)
class GroupInfo:
    """A coupled channel group: its stable name, width and the modules whose outputs it prunes."""

    name: str
    channels: int
    modules: tuple[str, ...]


def _importance(name: str) -> tp.importance.Importance:
    return {
        "magnitude": lambda: tp.importance.MagnitudeImportance(p=2),
        "l1": lambda: tp.importance.MagnitudeImportance(p=1),
        "bn_scale": lambda: tp.importance.BNScaleImportance(),
        "lamp": lambda: tp.importance.LAMPImportance(p=2),
        "fpgm": lambda: tp.importance.FPGMImportance(),
    }[name]()


@contextmanager
def _layer_scales_understood():
    """Torch-Pruning warns about every parameter held outside a layer (ConvNeXt's layer scales,
    shape ``(C, 1, 1)``) and prunes its last non-singleton dimension: the channel dimension of
    such per-channel scales, which is what pruning needs (the pruned ConvNeXt's file agrees with
    the model: ``tests/test_artifact.py``). The warning would print on every trial of a search."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        yield


class UntraceableGraph(Exception):
    """Torch-Pruning cannot build the model's dependency graph (the model is not pruned)."""


def _groups(model: nn.Module, example: torch.Tensor, ignored: list[nn.Module]):
    was_training = model.training
    try:
        with _layer_scales_understood():
            dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
        groups = list(
            dg.get_all_groups(ignored_layers=ignored, root_module_types=[nn.Conv2d, nn.Linear])
        )
    except Exception as e:  # noqa: BLE001 - e.g. ZeroDivisionError on ShuffleNet's shuffle
        raise UntraceableGraph(
            f"Torch-Pruning cannot trace this model's channel dependencies "
            f"({type(e).__name__}: {' '.join(str(e).split())[:120]}); it is not pruned, "
            "bit-widths and ranks are still searched"
        ) from e
    finally:
        model.train(was_training)  # building the graph leaves the model in eval mode
    order = {m: i for i, (_, m) in enumerate(model.named_modules())}
    names = {m: n for n, m in model.named_modules()}
    out = []
    for group in groups:
        mods = []
        for item in group:
            m = item.dep.target.module
            if dg.is_out_channel_pruning_fn(item.dep.handler) and m in order and m not in mods:
                mods.append(m)
        if not mods:
            continue
        mods.sort(key=order.__getitem__)
        out.append((mods, dg.get_out_channels(mods[0])))
    out.sort(key=lambda t: order[t[0][0]])
    return dg, out, names


def _heads(mods: dict[str, nn.Module], classifier: str | None) -> list[nn.Module]:
    """The modules named by ``classifier`` (one name, or several comma-separated: every layer
    that writes the model's class scores), whose outputs are never pruned."""
    return [mods[n] for n in (classifier or "").split(",") if n in mods]


def list_groups(
    model: nn.Module, example: torch.Tensor, *, classifier: str | None = None
) -> list[GroupInfo]:
    """The prunable coupled channel groups of ``model`` (the classifier's output is never one)."""
    return groups_and_note(model, example, classifier=classifier)[0]


def groups_and_note(
    model: nn.Module, example: torch.Tensor, *, classifier: str | None = None
) -> tuple[list[GroupInfo], str | None]:
    """:func:`list_groups`, plus why ``model`` cannot be pruned at all (one line; None when its
    graph traces), from one trace of the dependency graph."""
    mods = dict(model.named_modules())
    ignored = _heads(mods, classifier)
    try:
        _, groups, names = _groups(model, example, ignored)
    except UntraceableGraph as e:
        return [], str(e)
    infos = [GroupInfo(names[ms[0]], int(c), tuple(names[m] for m in ms)) for ms, c in groups]
    return infos, None


def kept_channels(channels: int, ratio: float, round_to: int) -> int:
    """Channels left after removing ``ratio`` of ``channels``, rounded down to ``round_to``
    (never below ``round_to``, never above ``channels``)."""
    k = int(channels * (1.0 - ratio) + 1e-9)
    k = max(round_to, k - k % round_to)
    return min(channels, k)


def prune_model(
    model: nn.Module,
    config: CompressionConfig,
    *,
    example: torch.Tensor,
    classifier: str | None = None,
) -> PassReport:
    """Remove channels in place per ``config.prune``; return the report."""
    report = PassReport("prune")
    ratios = {k: float(v) for k, v in config.prune.items() if v > 0}
    mods = dict(model.named_modules())
    ignored = _heads(mods, classifier)
    if not ratios:
        return report
    try:
        _, groups, names = _groups(model, example, ignored)
    except UntraceableGraph as e:
        for key in sorted(ratios):
            report.skip(key, str(e))
        return report
    by_name = {names[ms[0]]: (ms, c) for ms, c in groups}
    for key in sorted(set(ratios) - set(by_name)):
        report.skip(key, "no prunable channel group has this name (see `autoslim space check`)")
    ratio_dict: dict[nn.Module, float] = {}
    plan: dict[str, tuple[int, int, float]] = {}
    for gname, (ms, c) in by_name.items():
        r = ratios.get(gname, 0.0)
        if r <= 0:
            continue
        k = kept_channels(c, r, config.round_to)
        if k >= c:
            report.skip(
                gname,
                f"ratio {r:.3f} of {c} channels rounds to 0 removed "
                f"(multiple of {config.round_to})",
                channels=c,
                ratio=r,
            )
            continue
        # Torch-Pruning keeps int(C * (1 - r)); ask for exactly k (the 0.5 guards round-off).
        ratio_dict[ms[0]] = 1.0 - (k + 0.5) / c
        plan[gname] = (c, k, r)
    if ratio_dict:
        was_training = model.training
        try:
            with _layer_scales_understood():
                pruner = tp.pruner.BasePruner(
                    model,
                    example,
                    importance=_importance(config.importance),
                    pruning_ratio=0.0,
                    pruning_ratio_dict=ratio_dict,
                    ignored_layers=ignored,
                    round_to=None,
                    global_pruning=False,
                )
                pruner.step()
        except Exception as e:  # noqa: BLE001 - a group Torch-Pruning cannot prune
            raise PruningError(
                f"Torch-Pruning failed on groups {sorted(plan)[:4]} ({type(e).__name__}: "
                f"{' '.join(str(e).split())[:160]}); set prune = 0 for them in the space"
            ) from e
        finally:
            model.train(was_training)
    for gname, (c, k, r) in plan.items():
        m = by_name[gname][0][0]
        real = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
        if real != k:
            report.skip(
                gname,
                f"asked to keep {k} of {c} channels, Torch-Pruning kept {real}",
                channels=c,
                ratio=r,
                kept=int(real),
            )
        else:
            report.touch(
                gname,
                channels=c,
                kept=k,
                ratio=r,
                modules=list(names[x] for x in by_name[gname][0]),
            )
    return report
