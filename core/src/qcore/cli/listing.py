"""``qcore backends``: every discovered backend, whether it can run here, and the fix when it cannot.

It only asks the plugin registry, which imports each plugin's entry-point module and reads installed package
metadata: no torch, no backend library. A test runs it under ``python -X importtime`` to keep it that way.
"""

from __future__ import annotations

import warnings

import click

from qcore.cli.options import json_option
from qcore.cli.output import escape, print_json, stdout

__all__ = ["backends"]


@click.command()
@json_option
def backends(as_json: bool) -> None:
    """List every discovered backend: package, version, methods, presets, and whether it can run here.

    An unavailable backend shows why, with the command that fixes it.
    """
    from rich.table import Table

    from qcore import plugins

    with warnings.catch_warnings():
        # A plugin that fails to load is listed with its error below; the warning would say it twice.
        warnings.simplefilter("ignore")
        infos = plugins.backends()
    presets = plugins.presets()
    if as_json:
        print_json([{**info.to_dict(), "preset_summaries": _summaries(info.presets, presets)} for info in infos])
        return
    console = stdout()
    if not infos:
        packages = ", ".join(sorted(set(plugins.KNOWN_PLUGINS.values())))
        console.print(
            f"No qcore backend is installed. Install one, e.g. pip install {packages.split(', ')[0]} "
            f"(known backends: {packages})."
        )
        return
    table = Table(title="qcore backends")
    for column in ("backend", "package", "methods", "presets", "status"):
        table.add_column(column, overflow="fold")
    for info in infos:
        if info.available:
            status = "[green]available[/]" + (f": {escape(info.notes)}" if info.notes else "")
        else:
            status = f"[red]unavailable[/]: {escape(info.reason or '')}"
        table.add_row(
            escape(info.name),
            escape(f"{info.distribution} {info.version}"),
            escape(", ".join(info.methods)),
            escape(", ".join(info.presets)),
            status,
        )
    console.print(table)


def _summaries(names: tuple[str, ...], presets: dict) -> dict[str, str]:
    return {name: presets[name][1].summary for name in names if name in presets}
