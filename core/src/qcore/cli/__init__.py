"""The ``qcore`` command line: list backends, quantize, inspect, size and try models from a shell.

Each command group lives in its own module and imports torch, transformers and backend libraries inside the command
that needs them, so ``qcore backends`` and ``qcore --help`` stay as light as ``import qcore``.

Every failure a user can cause ends in one line on stderr saying what went wrong and what to do, with exit code 1
(a :class:`~qcore.QcoreError` or any other failure), 2 (a usage error, a path that does not exist among them) or
130 (interrupted with Ctrl-C); ``qcore --debug COMMAND`` lets the exception through instead, with its traceback.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from qcore.cli import (
    authoring,
    cache,
    convert,
    demo,
    evaluate,
    generate,
    inspection,
    listing,
    memory,
    quantize,
    sensitivity,
)  # fmt: skip
from qcore.cli.output import configure_logging
from qcore.errors import QcoreError

__all__ = ["cli", "main"]


class _QcoreGroup(click.Group):
    """A group whose errors are one line each, unless ``--debug`` asks for the traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as error:
            if ctx.params.get("debug"):
                raise
            message = " ".join(str(error).split())
            if not isinstance(error, QcoreError):
                # Not a failure qcore anticipated: its type helps a bug report more than its message alone.
                message = f"{type(error).__name__}: {message} (run 'qcore --debug ...' for the traceback)"
            raise click.ClickException(message) from error

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:  # fmt: skip
        # Click's own report of a usage error spans four lines (usage, hint, blank, error); run it non-standalone
        # to print each failure as one line instead.
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            code = result if isinstance(result, int) else 0
        except click.UsageError as error:
            where = f"; see '{error.ctx.command_path} --help'" if error.ctx is not None else ""
            message = " ".join(error.format_message().split()).rstrip(".")
            click.echo(f"error: {message}{where}", err=True)
            code = 2
        except click.ClickException as error:
            click.echo(f"error: {error.format_message()}", err=True)
            code = error.exit_code
        except click.Abort as error:
            if isinstance(error.__context__, KeyboardInterrupt):
                # Ctrl-C: the shell's convention for a command ended by SIGINT is 128 + 2.
                click.echo("interrupted", err=True)
                code = 130
            else:
                click.echo("aborted", err=True)
                code = 1
        if standalone_mode:
            sys.exit(code)
        return code


@click.group("qcore", cls=_QcoreGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show the full traceback of a failure instead of a one-line error.")
@click.version_option(package_name="qcore")
def cli(debug: bool) -> None:
    """qcore: load Hugging Face models quantized by any installed backend plugin.

    Start with 'qcore backends' to see what is installed, or 'qcore demo' to try every backend on a small random
    model without downloading anything.
    """
    configure_logging(debug)


for _command in (
    listing.backends,
    quantize.quantize,
    convert.convert,
    inspection.inspect,
    generate.generate,
    memory.estimate,
    memory.recommend,
    demo.demo,
    sensitivity.sensitivity,
    evaluate.evaluate,
    cache.cache,
    authoring.new_backend,
):
    cli.add_command(_command)


def main(argv: list[str] | None = None) -> None:
    """The ``qcore`` console script."""
    cli.main(args=argv, prog_name="qcore")
