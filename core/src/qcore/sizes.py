"""Byte sizes as people write and read them: ``"5GB"`` and ``"6.5GiB"`` in, ``"1.50 GiB"`` out.

Shared by the saver (``max_shard_size``), the automatic recipe's messages and the command line (``--memory``,
``--budget``, tables). Imports nothing heavy.
"""

from __future__ import annotations

import math

__all__ = ["parse_nbytes", "format_nbytes"]

#: Decimal units as disks and cloud specs count them, binary ones as memory is counted.
_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}  # fmt: skip


def parse_nbytes(value: int | str) -> int:
    """``8GB``, ``512MB``, ``6.5GiB`` or a plain number of bytes -> a positive int.

    :raises ValueError: not a size, or not positive.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        size: float = value
    else:
        text = str(value).strip().upper().replace(" ", "")
        number = text.rstrip("KMGTIB")
        try:
            size = float(number) * _UNITS[text[len(number) :]]
        except (ValueError, KeyError):
            raise ValueError(f"{value!r} is not a size such as 8GB, 6.5GiB or 512MB") from None
    if not math.isfinite(size):
        raise ValueError(f"{value!r} is not a finite size")
    if size <= 0:
        raise ValueError(f"{value!r} must be positive")
    return int(size)


def format_nbytes(nbytes: float) -> str:
    """Binary units (what memory is counted in): ``1.50 GiB``, ``1000 B``."""
    value, unit = float(nbytes), "B"
    for larger in ("KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024:
            break
        value, unit = value / 1024, larger
    return f"{value:.0f} B" if unit == "B" else f"{value:.2f} {unit}"
