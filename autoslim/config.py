"""``CompressionConfig``: the plain-data contract between the search and the compression passes.

Frozen dataclasses of plain values (str, int, float, dicts of those), validated on construction,
with a JSON round trip. The search builds them from sampled parameters; the passes read them and
never see Optuna.

- ``prune``: ratio of channels to remove per coupled channel group, keyed by the group's name
  (the first module, in ``named_modules()`` order, whose output channels the group prunes).
  Groups not listed are not pruned.
- ``layers``: per-layer knobs keyed by module name (Conv2d / Linear): weight bits
  (32 = fp32, 16 = fp16 storage, 8 = int8, 4 = int4), activation bits (8 = uint8 per-tensor,
  32 = float) and the low-rank ``rank_ratio`` (None = off). Layers not listed use the defaults.
- ``distill``: Hinton KD temperature and weight of the soft loss.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

__all__ = [
    "WEIGHT_BITS",
    "ACT_BITS",
    "IMPORTANCES",
    "LayerConfig",
    "DistillConfig",
    "CompressionConfig",
]

WEIGHT_BITS = (32, 16, 8, 4)
ACT_BITS = (32, 8)
IMPORTANCES = ("magnitude", "l1", "bn_scale", "lamp", "fpgm")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class LayerConfig:
    """Knobs of one Conv2d/Linear layer."""

    weight_bits: int = 32
    act_bits: int = 32
    rank_ratio: float | None = None

    def __post_init__(self) -> None:
        _check(
            self.weight_bits in WEIGHT_BITS,
            f"weight_bits must be one of {WEIGHT_BITS}; got {self.weight_bits!r}",
        )
        _check(
            self.act_bits in ACT_BITS, f"act_bits must be one of {ACT_BITS}; got {self.act_bits!r}"
        )
        _check(
            not (self.act_bits == 8 and self.weight_bits in (32, 16)),
            f"act_bits=8 needs integer weights (8 or 4 bits); got weight_bits={self.weight_bits}: "
            "set act_bits=32 or weight_bits=8",
        )
        if self.rank_ratio is not None:
            _check(
                isinstance(self.rank_ratio, (int, float)) and 0 < self.rank_ratio <= 1,
                f"rank_ratio must be in (0, 1] or None (off); got {self.rank_ratio!r}",
            )

    @property
    def quantized(self) -> bool:
        """True when the artifact stores this layer's weights below fp32."""
        return self.weight_bits < 32

    def short(self) -> str:
        s = {32: "fp32", 16: "fp16", 8: "w8", 4: "w4"}[self.weight_bits]
        if self.act_bits == 8:
            s += "a8"
        if self.rank_ratio is not None:
            s += f"r{self.rank_ratio:.2g}"
        return s


@dataclass(frozen=True)
class DistillConfig:
    """Recovery loss: ``alpha * T^2 * KL(student_T || teacher_T) + (1 - alpha) * CE``."""

    temperature: float = 4.0
    alpha: float = 0.9

    def __post_init__(self) -> None:
        _check(
            isinstance(self.temperature, (int, float)) and 0 < self.temperature <= 100,
            f"distill.temperature must be in (0, 100]; got {self.temperature!r}",
        )
        _check(
            isinstance(self.alpha, (int, float)) and 0 <= self.alpha <= 1,
            f"distill.alpha must be in [0, 1]; got {self.alpha!r}",
        )


@dataclass(frozen=True)
class CompressionConfig:
    """What to do to a model: pruning per group, per-layer bits/rank, distillation settings."""

    prune: Mapping[str, float] = field(default_factory=dict)
    layers: Mapping[str, LayerConfig] = field(default_factory=dict)
    default: LayerConfig = field(default_factory=LayerConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    round_to: int = 8
    importance: str = "magnitude"

    def __post_init__(self) -> None:
        for k, r in self.prune.items():
            _check(isinstance(k, str) and k, f"prune keys must be group names; got {k!r}")
            _check(
                isinstance(r, (int, float))
                and not isinstance(r, bool)
                and math.isfinite(r)
                and 0 <= r < 1,
                f"prune[{k!r}] must be a ratio in [0, 1); got {r!r}",
            )
        for k, lc in self.layers.items():
            _check(
                isinstance(lc, LayerConfig),
                f"layers[{k!r}] must be a LayerConfig; got {type(lc).__name__}",
            )
        _check(
            isinstance(self.round_to, int) and self.round_to >= 1,
            f"round_to must be a positive integer; got {self.round_to!r}",
        )
        _check(
            self.importance in IMPORTANCES,
            f"importance must be one of {IMPORTANCES}; got {self.importance!r}",
        )
        object.__setattr__(self, "prune", dict(self.prune))
        object.__setattr__(self, "layers", dict(self.layers))

    def layer(self, name: str) -> LayerConfig:
        """The knobs for module ``name`` (its own entry, or the default)."""
        return self.layers.get(name, self.default)

    @property
    def is_identity(self) -> bool:
        return (
            all(r == 0 for r in self.prune.values())
            and not self.default.quantized
            and self.default.rank_ratio is None
            and all(not lc.quantized and lc.rank_ratio is None for lc in self.layers.values())
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CompressionConfig:
        if not isinstance(d, Mapping):
            raise ConfigError(f"a compression config must be a JSON object; got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        _check(
            not unknown, f"unknown config keys {sorted(unknown)}; expected some of {sorted(known)}"
        )

        def layer(v: Any, where: str) -> LayerConfig:
            _check(isinstance(v, Mapping), f"{where} must be an object; got {v!r}")
            try:
                return LayerConfig(**v)
            except TypeError as e:
                raise ConfigError(
                    f"{where}: {e}; expected weight_bits, act_bits, rank_ratio"
                ) from e

        for key in ("prune", "layers"):
            _check(
                not (key in d and not isinstance(d[key], Mapping)),
                f"{key} must be an object of name -> value; got {d.get(key)!r}",
            )
        kw: dict[str, Any] = {
            k: v for k, v in d.items() if k in ("prune", "round_to", "importance")
        }
        if "layers" in d:
            kw["layers"] = {k: layer(v, f"layers.{k}") for k, v in dict(d["layers"]).items()}
        if "default" in d:
            kw["default"] = layer(d["default"], "default")
        if "distill" in d:
            try:
                kw["distill"] = DistillConfig(**d["distill"])
            except TypeError as e:
                raise ConfigError(f"distill: {e}; expected temperature, alpha") from e
        return cls(**kw)

    @classmethod
    def from_json(cls, s: str) -> CompressionConfig:
        try:
            return cls.from_dict(json.loads(s))
        except json.JSONDecodeError as e:
            raise ConfigError(f"config is not valid JSON: {e}") from e

    @classmethod
    def uniform(
        cls,
        *,
        prune: float = 0.0,
        weight_bits: int = 32,
        act_bits: int | None = None,
        rank_ratio: float | None = None,
        groups: list[str] | None = None,
        **kw: Any,
    ) -> CompressionConfig:
        """One setting everywhere: the same prune ratio for ``groups``, the same bits per layer.

        ``act_bits`` defaults to 8 when weights are int8/int4 and 32 otherwise.
        """
        if act_bits is None:
            act_bits = 8 if weight_bits in (8, 4) else 32
        return cls(
            prune={g: prune for g in (groups or [])},
            default=LayerConfig(weight_bits, act_bits, rank_ratio),
            **kw,
        )

    def kind(self) -> tuple[tuple[int, ...], str]:
        """The kind of compression, coarsely: the weight bit-widths of the layers, and whether
        none, some (under half) or most of them are low-rank factorised. Pruning ratios do
        not make a kind: they vary along every kind's front."""
        layers = list(self.layers.values()) or [self.default]
        share = sum(lc.rank_ratio is not None for lc in layers) / len(layers)
        low_rank = "none" if share == 0 else ("some" if share < 0.5 else "most")
        return tuple(sorted({lc.weight_bits for lc in layers})), low_rank

    def summary(self) -> str:
        """A short human string, e.g. ``prune 0.42 (12 groups) | w8a8 x21``."""
        parts = []
        if self.prune:
            rs = [r for r in self.prune.values()]
            parts.append(f"prune {sum(rs) / len(rs):.2f} avg ({min(rs):.2f}-{max(rs):.2f})")
        counts: dict[str, int] = {}
        for lc in self.layers.values():
            counts[lc.short()] = counts.get(lc.short(), 0) + 1
        if counts:
            parts.append(
                " ".join(f"{k}x{v}" for k, v in sorted(counts.items(), key=lambda t: -t[1]))
            )
        if not counts or self.default != LayerConfig():
            parts.append(f"default {self.default.short()}")
        parts.append(f"T={self.distill.temperature:g} a={self.distill.alpha:g}")
        return " | ".join(parts)
