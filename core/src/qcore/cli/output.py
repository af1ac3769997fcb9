"""Writing results: rich consoles for people, JSON for scripts, sizes and durations in words.

Tables and summaries go to stdout; progress bars and notes go to stderr, so that ``qcore ... --json | jq`` and
redirected output stay clean.
"""

from __future__ import annotations

import json
from typing import Any

import click
from rich.console import Console
from rich.markup import escape

__all__ = ["stdout", "stderr", "escape", "print_json", "format_bytes", "format_seconds", "format_count", "method_names"]


def stdout() -> Console:
    # Made per command rather than at import: click's test runner swaps sys.stdout for each invocation.
    return Console(highlight=False, soft_wrap=False)


def stderr() -> Console:
    return Console(stderr=True, highlight=False)


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


def format_bytes(nbytes: float) -> str:
    """Binary units (what memory is counted in): ``1.50 GiB``."""
    value, unit = float(nbytes), "B"
    for larger in ("KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024:
            break
        value, unit = value / 1024, larger
    return f"{value:.0f} B" if unit == "B" else f"{value:.2f} {unit}"


def format_seconds(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def format_count(count: int) -> str:
    """``7.24B``, ``106.8K``: parameter counts as model cards write them."""
    for unit, factor in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if count >= factor:
            return f"{count / factor:.2f}{unit}"
    return str(count)


def method_names(model: Any) -> str:
    """What a loaded model was quantized with, in a few words: ``"bitsandbytes nf4"``, or ``"full precision"``."""
    if not getattr(model, "qcore_applied", None):
        return "full precision"
    return ", ".join(config.short_name() for config in model.qcore_spec.configs())
