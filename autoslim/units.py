"""Strict parsing of sizes and latencies. ``MB`` = 10^6 bytes, ``MiB`` = 2^20."""

from __future__ import annotations

import re

from .errors import UsageError

__all__ = ["parse_size", "format_size", "parse_latency_ms", "is_no_limit"]

_SIZE_UNITS = {
    "B": 1,
    "kB": 10**3,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
}
_NUM = r"(\d+(?:\.\d+)?|\.\d+)"


def is_no_limit(value: object) -> bool:
    """True for the words that lift a limit (``--budget none``, ``max_accuracy_drop = "off"``)."""
    return isinstance(value, str) and value.strip().lower() in ("none", "off")


def parse_size(text: str | int) -> int:
    """Bytes in ``text``: '2MB' (2,000,000), '1.5MiB', '500kB', '2000000' (bytes)."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise UsageError(f"size must be positive; got {text}")
        return text
    m = re.fullmatch(_NUM + r"\s*([A-Za-z]*)", str(text).strip())
    unit = m.group(2) if m else None
    if m is None or (unit and unit not in _SIZE_UNITS):
        raise UsageError(
            f"cannot read size {text!r}: expected a number with a unit "
            f"({', '.join(_SIZE_UNITS)}), e.g. 2MB (= 2,000,000 bytes) or 1.5MiB"
        )
    n = int(round(float(m.group(1)) * _SIZE_UNITS[unit or "B"]))
    if n <= 0:
        raise UsageError(f"size must be positive; got {text!r}")
    return n


def format_size(n: float) -> str:
    """Decimal megabytes with the byte count, e.g. '1.95 MB'."""
    return f"{n / 1e6:.2f} MB"


def parse_latency_ms(text: str | float) -> float:
    """Milliseconds in ``text``: '0.5ms', '500us', '0.002s' or a bare number of ms."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        v = float(text)
    else:
        m = re.fullmatch(_NUM + r"\s*(ms|us|µs|s)?", str(text).strip())
        if m is None:
            raise UsageError(f"cannot read latency {text!r}: expected e.g. 0.5ms, 500us or 0.002s")
        scale = {"ms": 1.0, None: 1.0, "us": 1e-3, "µs": 1e-3, "s": 1e3}[m.group(2)]
        v = float(m.group(1)) * scale
    if v <= 0:
        raise UsageError(f"latency must be positive; got {text!r}")
    return v
