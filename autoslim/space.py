"""Search-space files: load, validate, bind to a model.

Shipped spaces are package data in ``search_spaces/``.

Schema (documented with examples in ``search_spaces/README.md``)::

    skip = ["conv1", "fc"]          # layers/groups never touched (globs)

    [distill]
    temperature = {min = 2.0, max = 8.0}
    alpha = [0.5, 0.7, 0.9]

    [[rules]]
    match = "layer4.*"              # glob on the module name; or  regex = "..."
    prune = {min = 0.0, max = 0.8, step = 0.05}
    weight_bits = [8, 4]
    act_bits = 8
    rank = ["off", 0.5]
    share = ["weight_bits", "rank"] # these knobs: one parameter for all layers matched
                                    # (true = all knobs of the rule; "stage" = all knobs,
                                    # one parameter per stage: per feature-map resolution)

A knob is a fixed value (scalar), a choice list (array) or a range (``{min, max, step?}``).
Rules are tried in order and the first whose pattern matches a name wins; ``prune`` applies to
coupled channel groups (named by their first module), the other knobs to Conv2d/Linear layers.
Activation bits apply where the weights are integer (8 or 4); float weights keep float inputs.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._files import shipped_dir
from .config import ACT_BITS, WEIGHT_BITS, CompressionConfig, DistillConfig, LayerConfig
from .errors import ConfigError
from .passes.prune import groups_and_note

__all__ = [
    "Knob",
    "Rule",
    "SearchSpace",
    "Dimension",
    "BoundSpace",
    "load_space",
    "find_stages",
    "SPACES_DIR",
]

# shipped spaces: package data (importlib.resources), so an installed wheel has them
SPACES_DIR = shipped_dir("search_spaces")
_KNOBS = ("prune", "weight_bits", "act_bits", "rank")
# weight_bits = "runtime": int8, and fp32 beside it per matched layer or stage where the study's
# runtime does not run int8 clearly faster than fp32 (see autoslim.study.task.runtime_precisions)
RUNTIME = "runtime"
_RULE_KEYS = {"match", "regex", *_KNOBS, "share"}
_TOP_KEYS = {"name", "description", "skip", "distill", "rules", "round_to", "importance"}


@dataclass(frozen=True)
class Knob:
    """A fixed value, a list of choices, or a numeric range [low, high] with optional step."""

    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    step: float | None = None

    @property
    def fixed(self) -> bool:
        return self.choices is not None and len(self.choices) == 1

    def values(self) -> tuple[Any, ...]:
        return self.choices or ()


def _err(file: str, path: str, value: Any, hint: str) -> ConfigError:
    return ConfigError(f"{file}: {path} = {value!r}: {hint}")


def _knob(file: str, path: str, raw: Any, kind: str) -> Knob:
    if isinstance(raw, dict):
        extra = set(raw) - {"min", "max", "step"}
        if extra or "min" not in raw or "max" not in raw:
            raise _err(
                file, path, raw, "a range needs exactly {min = ..., max = ...} and optional step"
            )
        lo, hi, st = raw["min"], raw["max"], raw.get("step")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi)):
            raise _err(file, path, raw, "range bounds must be numbers")
        if not lo < hi:
            raise _err(file, path, raw, f"empty range: min ({lo}) must be < max ({hi})")
        if st is not None and (not isinstance(st, (int, float)) or st <= 0 or st > hi - lo):
            raise _err(file, path, raw, "step must be > 0 and <= max - min")
        if kind in ("weight_bits", "act_bits"):
            raise _err(file, path, raw, "bits are a choice list, e.g. [8, 4], not a range")
        if kind == "prune" and not (0 <= lo and hi < 1):
            raise _err(file, path, raw, "prune ratios must lie in [0, 1)")
        if kind in ("rank", "temperature") and lo <= 0:
            raise _err(file, path, raw, "must be > 0")
        if kind == "rank" and hi > 1:
            raise _err(file, path, raw, "rank ratio must be <= 1")
        if kind == "alpha" and not (0 <= lo and hi <= 1):
            raise _err(file, path, raw, "alpha must lie in [0, 1]")
        return Knob(low=float(lo), high=float(hi), step=None if st is None else float(st))
    if kind == "weight_bits" and raw == RUNTIME:
        return Knob(choices=(RUNTIME,))  # resolved at bind: the precisions the runtime runs well
    vals = tuple(raw) if isinstance(raw, list) else (raw,)
    if not vals:
        raise _err(file, path, raw, "empty choice list: give at least one value")
    for v in vals:
        if kind == "weight_bits" and v not in WEIGHT_BITS:
            raise _err(file, path, v, f"the exporter writes weight bits {list(WEIGHT_BITS)} only")
        if kind == "act_bits" and v not in ACT_BITS:
            raise _err(file, path, v, f"the exporter writes activation bits {list(ACT_BITS)} only")
        if kind == "rank" and not (v == "off" or (isinstance(v, (int, float)) and 0 < v <= 1)):
            raise _err(file, path, v, 'rank is a ratio in (0, 1] or "off"')
        if kind == "prune" and not (isinstance(v, (int, float)) and 0 <= v < 1):
            raise _err(file, path, v, "prune ratios must lie in [0, 1)")
        if kind == "temperature" and not (isinstance(v, (int, float)) and v > 0):
            raise _err(file, path, v, "temperature must be > 0")
        if kind == "alpha" and not (isinstance(v, (int, float)) and 0 <= v <= 1):
            raise _err(file, path, v, "alpha must lie in [0, 1]")
    return Knob(choices=vals)


@dataclass(frozen=True)
class Rule:
    pattern: str
    is_regex: bool
    knobs: dict[str, Knob]
    share: tuple[str, ...] = ()
    index: int = 0
    per_stage: bool = False  # share = "stage": one parameter per stage (see find_stages)

    def matches(self, name: str) -> bool:
        if self.is_regex:
            return re.fullmatch(self.pattern, name) is not None
        return fnmatch.fnmatchcase(name, self.pattern)

    @property
    def label(self) -> str:
        return f"rule{self.index}"


@dataclass(frozen=True)
class SearchSpace:
    """A validated search-space file."""

    path: str
    rules: tuple[Rule, ...]
    skip: tuple[str, ...] = ()
    temperature: Knob = Knob(choices=(4.0,))
    alpha: Knob = Knob(choices=(0.9,))
    round_to: int = 8
    importance: str = "magnitude"
    name: str = ""
    text_hash: str = ""

    def skipped(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.skip)

    def rule_for(self, name: str, knob: str) -> Rule | None:
        """The first rule matching ``name`` decides (first match wins); None if it lacks ``knob``."""
        for r in self.rules:
            if r.matches(name):
                return r if knob in r.knobs else None
        return None

    @property
    def runtime_bits(self) -> bool:
        """Whether a rule leaves its weight bits to the runtime (``weight_bits = "runtime"``)."""
        return any(r.knobs.get("weight_bits") == Knob(choices=(RUNTIME,)) for r in self.rules)

    def bind(
        self,
        model: nn.Module,
        example: torch.Tensor,
        *,
        classifier: str | None,
        stem: str | None = None,
        precisions: tuple[int, ...] = (8,),
    ) -> BoundSpace:
        """The space on ``model``; ``weight_bits = "runtime"`` becomes ``precisions`` (a
        choice where there are several)."""
        space = self
        if self.runtime_bits:
            knob = Knob(choices=tuple(precisions))
            rules = tuple(
                dataclasses.replace(r, knobs={**r.knobs, "weight_bits": knob})
                if r.knobs.get("weight_bits") == Knob(choices=(RUNTIME,))
                else r
                for r in self.rules
            )
            space = dataclasses.replace(self, rules=rules)
        return BoundSpace.build(space, model, example, classifier=classifier, stem=stem)


def load_space(path: str | Path) -> SearchSpace:
    """Read and validate a search-space TOML file (a bare name: a shipped space)."""
    p = Path(path)
    if not p.exists() and not p.suffix and (SPACES_DIR / f"{p}.toml").exists():
        p = SPACES_DIR / f"{p}.toml"
    if p.is_dir():
        raise ConfigError(f"search space {path!r} is a folder; expected a TOML file")
    if not p.is_file():
        avail = sorted(x.stem for x in SPACES_DIR.glob("*.toml")) if SPACES_DIR.is_dir() else []
        raise ConfigError(f"search space {path!r} not found; give a TOML file or one of {avail}")
    text = p.read_text()
    try:
        d = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from e
    f = str(p)
    for k in set(d) - _TOP_KEYS:
        raise _err(f, k, d[k], f"unknown key; expected one of {sorted(_TOP_KEYS)}")
    rules = []
    raw_rules = d.get("rules", [])
    if not isinstance(raw_rules, list) or not raw_rules:
        raise _err(f, "rules", raw_rules, "give at least one [[rules]] table")
    for i, r in enumerate(raw_rules):
        where = f"rules[{i}]"
        if not isinstance(r, dict):
            raise _err(f, where, r, "each rule is a table")
        for k in set(r) - _RULE_KEYS:
            raise _err(
                f, f"{where}.{k}", r[k], f"unknown key; expected some of {sorted(_RULE_KEYS)}"
            )
        if ("match" in r) == ("regex" in r):
            raise _err(f, where, r, "give exactly one of match (glob) or regex")
        pattern = r.get("match", r.get("regex"))
        if not isinstance(pattern, str) or not pattern:
            raise _err(f, f"{where}.match", pattern, "pattern must be a non-empty string")
        if "regex" in r:
            try:
                re.compile(pattern)
            except re.error as e:
                raise _err(f, f"{where}.regex", pattern, f"invalid regex: {e}") from e
        knobs = {k: _knob(f, f"{where}.{k}", r[k], k) for k in _KNOBS if k in r}
        if not knobs:
            raise _err(f, where, r, f"a rule needs at least one knob of {list(_KNOBS)}")
        share = r.get("share", False)
        per_stage = share == "stage"
        if share is True or per_stage:
            share = list(knobs)
        elif share is False:
            share = []
        if not isinstance(share, list) or not set(share) <= set(knobs):
            raise _err(
                f,
                f"{where}.share",
                share,
                f'share is true, false, "stage" or a list of this rule\'s knobs {sorted(knobs)}',
            )
        rules.append(Rule(pattern, "regex" in r, knobs, tuple(share), i, per_stage))
    dist = d.get("distill", {})
    if not isinstance(dist, dict) or set(dist) - {"temperature", "alpha"}:
        raise _err(f, "distill", dist, "expected a table with temperature and/or alpha")
    skip = d.get("skip", [])
    if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
        raise _err(f, "skip", skip, "a list of layer-name globs")
    round_to = d.get("round_to", 8)
    if not isinstance(round_to, int) or round_to < 1:
        raise _err(f, "round_to", round_to, "a positive integer (channels rounded to it)")
    importance = d.get("importance", "magnitude")
    try:
        CompressionConfig(importance=importance)
    except ConfigError as e:
        raise _err(f, "importance", importance, str(e)) from e
    return SearchSpace(
        path=f,
        rules=tuple(rules),
        skip=tuple(skip),
        temperature=_knob(f, "distill.temperature", dist.get("temperature", 4.0), "temperature"),
        alpha=_knob(f, "distill.alpha", dist.get("alpha", 0.9), "alpha"),
        round_to=round_to,
        importance=importance,
        name=str(d.get("name", p.stem)),
        text_hash=hashlib.sha256(text.encode()).hexdigest()[:16],
    )


def _shared(rule: Rule) -> str:
    if rule.per_stage:
        return "; one parameter per stage"
    return "; shared: " + ",".join(rule.share) if rule.share else ""


def find_stages(model: nn.Module, example: torch.Tensor) -> tuple[dict[str, str], dict[str, str]]:
    """Each Conv2d's stage: ``stage0`` for the largest feature map, ``stage1`` for the next
    smaller one, and so on (a stage of a CNN is the run of layers at one resolution); and each
    stage's size (``"14x14"``). A conv that reads a globally pooled 1x1 map while the network
    is still larger (squeeze-excite) belongs to the stage it sits in. Empty when the model's
    forward fails on ``example``.
    """
    calls: list[tuple[str, tuple[int, int], tuple[int, int]]] = []
    hooks = [
        m.register_forward_hook(
            lambda _m, inp, out, n=n: calls.append(
                (n, tuple(inp[0].shape[-2:]), tuple(out.shape[-2:]))
            )
        )
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
    ]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    except Exception:  # noqa: BLE001 - no stages: per-stage knobs become one "head" dimension
        return {}, {}
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    size_of: dict[str, tuple[int, int]] = {}
    main: tuple[int, int] | None = None
    for name, size_in, size_out in calls:
        if name in size_of:
            continue
        if main is not None and size_in == (1, 1) and main[0] * main[1] > 1:
            size_of[name] = main  # squeeze-excite branch on a pooled map
        else:
            size_of[name] = main = size_out
    order = sorted(set(size_of.values()), key=lambda hw: -hw[0] * hw[1])
    stages = {n: f"stage{order.index(hw)}" for n, hw in size_of.items()}
    return stages, {f"stage{i}": f"{h}x{w}" for i, (h, w) in enumerate(order)}


@dataclass(frozen=True)
class Dimension:
    """One named search dimension and the layers/groups it controls."""

    name: str
    knob: Knob
    targets: tuple[str, ...]
    kind: str  # prune | weight_bits | act_bits | rank | temperature | alpha


@dataclass
class BoundSpace:
    """A search space bound to a model's groups and layers: named dimensions + fixed values."""

    space: SearchSpace
    dims: list[Dimension]
    fixed: dict[str, dict[str, Any]] = field(default_factory=dict)  # kind -> {target: value}
    groups: dict[str, int] = field(default_factory=dict)  # group name -> channels
    layers: list[str] = field(default_factory=list)
    matched: dict[str, list[str]] = field(default_factory=dict)  # rule label -> names
    stages: dict[str, str] = field(default_factory=dict)  # conv layer -> stage name
    stage_sizes: dict[str, str] = field(default_factory=dict)  # stage name -> "14x14"
    note: str | None = None  # why nothing can be pruned, when the graph does not trace

    @classmethod
    def build(
        cls,
        space: SearchSpace,
        model: nn.Module,
        example: torch.Tensor,
        *,
        classifier: str | None,
        stem: str | None = None,
    ) -> BoundSpace:
        infos, note = groups_and_note(model, example, classifier=classifier)
        groups = {g.name: g.channels for g in infos}
        layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        stages, stage_sizes = find_stages(model, example)
        dims: dict[str, Dimension] = {}
        fixed: dict[str, dict[str, Any]] = {k: {} for k in _KNOBS}
        matched: dict[str, list[str]] = {r.label: [] for r in space.rules}

        def add(kind: str, target: str) -> None:
            rule = space.rule_for(target, kind)
            if rule is None or space.skipped(target):
                return
            if target not in matched[rule.label]:
                matched[rule.label].append(target)
            knob = rule.knobs[kind]
            if knob.fixed:
                fixed[kind][target] = knob.choices[0]
                return
            if rule.per_stage:
                name = f"{kind}/{stages.get(target, 'head')}"
            elif kind in rule.share:
                name = f"{kind}/{rule.label}"
            else:
                name = f"{kind}/{target}"
            old = dims.get(name)
            dims[name] = Dimension(name, knob, (*(old.targets if old else ()), target), kind)

        for g in groups:
            if stem is not None and g == stem and space.skipped(stem):
                continue
            add("prune", g)
        for name in layers:
            for kind in ("weight_bits", "act_bits", "rank"):
                add(kind, name)
        out = list(dims.values())
        if not space.temperature.fixed:
            out.append(Dimension("kd/temperature", space.temperature, (), "temperature"))
        if not space.alpha.fixed:
            out.append(Dimension("kd/alpha", space.alpha, (), "alpha"))
        return cls(space, out, fixed, groups, layers, matched, stages, stage_sizes, note)

    def int4_layers(self) -> list[str]:
        """Layers whose weights this space may store as int4 (a choice or a fixed value)."""
        out = [
            t
            for d in self.dims
            if d.kind == "weight_bits" and 4 in (d.knob.choices or ())
            for t in d.targets
        ]
        return out + [t for t, v in self.fixed.get("weight_bits", {}).items() if v == 4]

    def fingerprint(self) -> str:
        desc = json.dumps(
            {
                "dims": [(d.name, repr(d.knob), d.targets) for d in self.dims],
                "fixed": self.fixed,
                "hash": self.space.text_hash,
            },
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(desc.encode()).hexdigest()[:16]

    def to_config(self, params: dict[str, Any]) -> CompressionConfig:
        """Turn sampled parameters (dimension name -> value) into a CompressionConfig."""
        values: dict[str, dict[str, Any]] = {k: dict(v) for k, v in self.fixed.items()}
        for d in self.dims:
            if d.kind in _KNOBS:
                for t in d.targets:
                    values[d.kind][t] = params[d.name]
        prune = {g: float(r) for g, r in values["prune"].items() if float(r) > 0}
        layers = {}
        for name in self.layers:
            wb = int(values["weight_bits"].get(name, 32))
            ab = int(values["act_bits"].get(name, 32))
            if wb >= 16:
                ab = 32  # float weights keep float activations
            rank = values["rank"].get(name, "off")
            rank = None if rank == "off" else float(rank)
            if (wb, ab, rank) != (32, 32, None):
                layers[name] = LayerConfig(wb, ab, rank)
        # a KD knob that is not a dimension is fixed: its single choice
        kd = {
            k: params[k] if k in params else knob.values()[0]
            for k, knob in (
                ("kd/temperature", self.space.temperature),
                ("kd/alpha", self.space.alpha),
            )
        }
        t, a = kd["kd/temperature"], kd["kd/alpha"]
        return CompressionConfig(
            prune=prune,
            layers=layers,
            distill=DistillConfig(float(t), float(a)),
            round_to=self.space.round_to,
            importance=self.space.importance,
        )

    def uniform_params(self, *, prune: float, weight_bits: int, act_bits: int) -> dict[str, Any]:
        """Parameters for a uniform baseline, for the dimensions that admit those values."""
        want = {
            "prune": prune,
            "weight_bits": weight_bits,
            "act_bits": act_bits,
            "rank": "off",
            "temperature": 4.0,
            "alpha": 0.9,
        }
        out: dict[str, Any] = {}
        for d in self.dims:
            v, k = want[d.kind], d.knob
            if k.choices is not None:
                if v not in k.choices:
                    v = k.choices[0]
            else:
                v = min(max(float(v), k.low), k.high)
                if k.step:  # snap to the grid Optuna samples on
                    v = round(k.low + round((v - k.low) / k.step) * k.step, 10)
            out[d.name] = v
        return out

    def smallest_params(self) -> dict[str, Any]:
        """A start for the smallest file the space can make: every pruning ratio at its
        largest, every bit width at its lowest, ranks off where they may be (else their first
        choice: factorising a thin layer can grow it, so ranks are for the caller to try);
        distillation knobs at their first value (they do not change the size)."""
        out: dict[str, Any] = {}
        for d in self.dims:
            k = d.knob
            if k.choices is None:
                lo, hi = k.low, k.high
                out[d.name] = hi if d.kind == "prune" else lo
                continue
            if d.kind == "prune":
                out[d.name] = max(k.choices)
            elif d.kind in ("weight_bits", "act_bits"):
                out[d.name] = min(k.choices)
            elif d.kind == "rank":
                out[d.name] = "off" if "off" in k.choices else k.choices[0]
            else:
                out[d.name] = k.choices[0]
        return out

    def describe(self) -> str:
        """Which names each rule matched and how many dimensions result."""
        lines = []
        for r in self.space.rules:
            names = self.matched.get(r.label, [])
            pat = ("regex " if r.is_regex else "match ") + repr(r.pattern)
            knobs = ", ".join(sorted(r.knobs))
            shown = ", ".join(names[:8]) + (f", ... (+{len(names) - 8})" if len(names) > 8 else "")
            lines.append(
                f"{r.label} {pat} [{knobs}{_shared(r)}]: "
                f"{len(names)} matched{': ' + shown if names else ''}"
            )
        by_stage: dict[str, list[str]] = {}
        for layer, st in self.stages.items():
            by_stage.setdefault(st, []).append(layer)
        for st, names in by_stage.items():
            lines.append(
                f"{st} ({self.stage_sizes.get(st, '?')}): {len(names)} conv layers, "
                f"{names[0]} .. {names[-1]}"
            )
        if self.note:
            lines.append(f"note: {self.note}")
        unmatched = [n for n in self.layers if not any(n in v for v in self.matched.values())]
        lines.append(f"unmatched layers (left as they are): {len(unmatched)}")
        lines.append(
            f"{len(self.dims)} dimensions "
            f"({len(self.groups)} prunable groups, {len(self.layers)} conv/linear layers)"
        )
        return "\n".join(lines)
