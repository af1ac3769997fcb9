"""``qcore cache``: list and clear the cache of on-the-fly loads (see :mod:`qcore.cache`)."""

from __future__ import annotations

import datetime

import click

from qcore.cli.options import json_option
from qcore.cli.output import escape, format_bytes, print_json, stdout

__all__ = ["cache"]


@click.group()
def cache() -> None:
    """The cache of quantized copies that 'from_pretrained(..., cache=True)' and '--cache' write.

    It lives in $QCORE_CACHE_DIR (default ~/.cache/qcore/quantized) and is limited to $QCORE_CACHE_SIZE (default
    50GB), least recently used entries going first.
    """


@cache.command("list")
@json_option
def list_entries(as_json: bool) -> None:
    """List every cached quantized model, most recently used first."""
    from qcore import cache as quantized_cache

    found = quantized_cache.entries()
    if as_json:
        print_json([
            {"key": e.key, "path": str(e.path), "source": e.source, "method": e.method, "nbytes": e.nbytes,
             "created": e.created, "last_used": e.last_used}
            for e in found
        ])  # fmt: skip
        return
    console = stdout()
    if not found:
        console.print(f"the cache at {escape(str(quantized_cache.cache_directory()))} is empty")
        return
    from rich.table import Table

    table = Table(title=escape(f"qcore cache: {quantized_cache.cache_directory()}"))
    for column in ("key", "source", "method", "size", "last used"):
        table.add_column(column, overflow="fold")
    for e in found:
        used = datetime.datetime.fromtimestamp(e.last_used).strftime("%Y-%m-%d %H:%M")
        table.add_row(escape(e.key), escape(e.source), escape(e.method), format_bytes(e.nbytes), used)
    console.print(table)
    console.print(f"{len(found)} entries, {format_bytes(sum(e.nbytes for e in found))} in all")


@cache.command("clear")
def clear() -> None:
    """Remove every cached quantized model."""
    from qcore import cache as quantized_cache

    freed = quantized_cache.clear()
    stdout().print(f"removed {format_bytes(freed)} from {escape(str(quantized_cache.cache_directory()))}")
