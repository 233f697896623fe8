"""Budget and latency strings: strict, decimal MB vs binary MiB."""

from __future__ import annotations

import pytest

from autoslim.errors import UsageError
from autoslim.units import parse_latency_ms, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2MB", 2_000_000),
        ("2 MB", 2_000_000),
        ("1.5MiB", 1_572_864),
        ("500kB", 500_000),
        ("500KB", 500_000),
        ("3KiB", 3072),
        ("1GB", 10**9),
        ("2000000", 2_000_000),
        ("123B", 123),
        (".5MB", 500_000),
        (4096, 4096),
    ],
)
def test_good_sizes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text", ["", "MB", "2XB", "-1MB", "0MB", "2 mb", "2MBs", "two MB", "1e6", 0]
)
def test_bad_sizes(text):
    with pytest.raises(UsageError, match="size") as e:
        parse_size(text)
    assert e.value.exit_code == 2


@pytest.mark.parametrize(
    ("text", "ms"), [("0.5ms", 0.5), ("500us", 0.5), ("0.002s", 2.0), ("3", 3.0), (1.5, 1.5)]
)
def test_latency(text, ms):
    assert parse_latency_ms(text) == pytest.approx(ms)


@pytest.mark.parametrize("text", ["fast", "-1ms", "0", "1 hour"])
def test_bad_latency(text):
    with pytest.raises(UsageError):
        parse_latency_ms(text)
