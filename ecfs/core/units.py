"""Human-readable sizes and durations (pure)."""

from __future__ import annotations

import re

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?[bB])?\s*$")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(value: str) -> int:
    """'128K', '1M', '4096', '1.5G' -> bytes (binary units). ValueError if not a size."""
    match = _SIZE.match(value)
    if not match:
        raise ValueError(f"{value!r} is not a size (e.g. 128K, 1M)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_size(n: float) -> str:
    """Bytes as '1.5 GiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: str) -> float:
    """'90', '90s', '30m', '2h', '1d' -> seconds. ValueError if not one."""
    match = _DURATION.match(value)
    if not match:
        raise ValueError(f"{value!r} is not a duration (e.g. 90s, 30m, 2h)")
    return float(match.group(1)) * _SECONDS[match.group(2)]
