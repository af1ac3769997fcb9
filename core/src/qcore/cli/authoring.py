"""``qcore new-backend``: start a backend plugin from qcore's template, passing the conformance suite as generated.

Writes files only (:mod:`qcore.scaffold` renders them); it imports neither torch nor any backend library.
CONTRIBUTING.md's checklist takes the new package from here to a published backend.
"""

from __future__ import annotations

from pathlib import Path

import click

from qcore.errors import QcoreError

__all__ = ["new_backend"]


@click.command("new-backend")
@click.argument("name")
@click.option("--method", help="The quant_method it serves, as transformers spells it. [default: NAME]")
@click.option("--library", help="The pip distribution of the quantization library it wraps. [default: NAME]")
@click.option("--reader", metavar="SUFFIX", help="Also read a container format: files ending in SUFFIX (e.g. .myfmt).")
@click.option("--calibrating", is_flag=True, help="Also quantize with calibration data, one decoder block at a time.")
@click.option(
    "--output", type=click.Path(file_okay=False, path_type=Path), default=Path("."), show_default=True,
    help="Directory to create qcore-NAME in.",
)  # fmt: skip
def new_backend(
    name: str, method: str | None, library: str | None, reader: str | None, calibrating: bool, output: Path
) -> None:
    """Create qcore-NAME: a backend package with all six phases, a config, a quantized layer and the conformance test.

    It works as generated, with an example scheme (per-row absmax int8 in plain torch) standing in for LIBRARY;
    replace it with LIBRARY's calls where the TODO(NAME) comments say, keeping 'python -m pytest' green. --reader
    adds a container reader (an example format to replace with yours), --calibrating a scheme that quantizes each
    decoder block from calibration activations (calibrate_block).
    """
    from qcore import scaffold

    try:
        values = scaffold.template_values(name, method=method, library=library, reader=reader)
    except QcoreError as error:
        raise click.UsageError(str(error)) from None
    directory = scaffold.render(
        name, method=method, library=library, reader=reader, calibrating=calibrating, output=output
    )
    click.echo(f"created {directory}/ (distribution {values['distribution']}, quant_method {values['method']!r})")
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        click.echo(f"  {path.relative_to(directory)}")
    click.echo("next:")
    click.echo(f"  cd {directory}")
    click.echo(f"  python -m pip install {values['library']}")
    click.echo("  python -m pip install -e .")
    click.echo("  python -m pytest          # qcore's conformance suite: passes as generated")
    click.echo(f"  grep -rn 'TODO({name})' .  # where {values['library']}'s calls replace the example scheme")
