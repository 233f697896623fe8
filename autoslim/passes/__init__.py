"""Compression passes. Each takes a model and a :class:`~autoslim.config.CompressionConfig`,
changes the model for real (channels removed, layers factorised, weights fake-quantised for
training) and returns a :class:`PassReport` naming what it touched and what it skipped, and why.
Passes never import Optuna.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = ["PassReport"]


@dataclass
class PassReport:
    """What a pass did: ``touched`` and ``skipped`` entries are dicts with at least ``layer``."""

    name: str
    touched: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)

    def skip(self, layer: str, reason: str, **extra: object) -> None:
        self.skipped.append({"layer": layer, "reason": reason, **extra})

    def touch(self, layer: str, **extra: object) -> None:
        self.touched.append({"layer": layer, **extra})

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.name}: {len(self.touched)} touched, {len(self.skipped)} skipped"
