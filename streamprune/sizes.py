"""Byte counts as people write them (--max-shard-size 5GB, --max-ram 16GB) and as messages show them."""

from __future__ import annotations

import re

from .errors import UsageError

_SIZE_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000, '500MiB' -> 524_288_000 (transformers' max_shard_size spelling)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]I?B|B)?\s*", text.upper())
    if not match:
        raise UsageError(f"cannot read size {text!r}; write it like 5GB, 500MB or 2GiB")
    number, unit = match.groups()
    size = int(float(number) * _SIZE_UNITS[unit or "B"])
    if size <= 0:
        raise UsageError(f"size {text!r} must be positive")
    return size


def format_size(n: int) -> str:
    """2_500_000_000 -> '2.33 GiB': binary units, for messages."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError
