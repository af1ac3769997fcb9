"""Writing results: rich consoles for people, JSON for scripts, sizes and durations in words.

Tables and summaries go to stdout; progress bars and notes go to stderr, so that ``qcore ... --json | jq`` and
redirected output stay clean.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import click
from rich.console import Console
from rich.markup import escape

from qcore.sizes import format_nbytes as format_bytes

__all__ = [
    "configure_logging",
    "stdout",
    "stderr",
    "escape",
    "print_json",
    "format_bytes",
    "format_seconds",
    "format_count",
    "method_names",
    "held_nbytes",
]

#: Width of tables written to something other than a terminal.
PIPED_WIDTH = 120


def stdout() -> Console:
    # Made per command rather than at import: click's test runner swaps sys.stdout for each invocation.
    console = Console(highlight=False, soft_wrap=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        # Piped into a file or a pager, a table need not fit rich's default 80 columns.
        console.width = PIPED_WIDTH
    return console


def stderr() -> Console:
    return Console(stderr=True, highlight=False)


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


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
    applied = getattr(model, "qcore_applied", None)
    if not applied:
        return "full precision"
    return ", ".join(dict.fromkeys(config.short_name() for config in applied.values()))


def held_nbytes(model: Any) -> int:
    """Bytes of every tensor a loaded model holds: its parameters, its buffers, and what its state dict adds.

    Some backends keep quantization statistics outside parameters and buffers (bitsandbytes' ``quant_state``,
    HQQ's ``meta``), where ``model.get_memory_footprint()`` does not look; the state dict has them. A tensor subclass
    (torchao's quantized tensors) reports its logical dtype and shape, so its inner tensors are counted instead.
    """
    counted: set[tuple[int, int]] = set()
    total = 0
    for tensor in (*model.parameters(), *model.buffers(), *model.state_dict().values()):
        for plain in _plain_tensors(tensor):
            nbytes = plain.numel() * plain.element_size()
            key = (plain.data_ptr(), nbytes)
            if key not in counted:
                counted.add(key)
                total += nbytes
    return total


def _plain_tensors(tensor: Any) -> list[Any]:
    """The tensors holding ``tensor``'s memory: itself, or a wrapper subclass's inner tensors (recursively)."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is None:
        return [tensor]
    names, _ = flatten()
    return [plain for name in names for plain in _plain_tensors(getattr(tensor, name))]


class _OncePerMessage(logging.Filter):
    """Lets each distinct message through once: some backend libraries log on every call (every matmul), which
    would bury a command's own output."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def configure_logging(debug: bool) -> None:
    """Show library warnings on stderr, each distinct one once (every one, and qcore's debug messages, with --debug).

    Leaves logging alone when the host already configured it (an application embedding the CLI, a test runner).
    """
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    if not debug:
        handler.addFilter(_OncePerMessage())
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    if debug:
        logging.getLogger("qcore").setLevel(logging.DEBUG)
