"""``qcore convert``: stream a checkpoint of one method into another, never holding the full-precision model.

SRC is loaded as stored (quantized), then each module is dequantized by its backend's ``dequantize_module`` as the
target load reads it (:class:`qcore.convert.DequantizedSource`), quantized by the target method and dropped from the
source; the result is saved to OUT with the tokenizer. Also home of ``--calibration FILE``, which ``qcore quantize``
shares, for a target method that needs calibration data.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from qcore.cli.options import Checkpoint, dtype_option, quantization_options, resolve_dtype, resolve_quantization
from qcore.cli.output import escape, format_bytes, format_seconds, held_nbytes, method_names, stdout

__all__ = ["convert", "calibration_option", "read_calibration"]


def calibration_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--calibration FILE`` (see :func:`read_calibration`)."""
    return click.option(
        "--calibration",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="Calibration data for a method that needs it (GPTQ): a UTF-8 text file, or a JSON list of texts or of "
        "token-id lists. Default: qcore's built-in public-domain corpus.",
    )(f)


def read_calibration(path: Path | None) -> Any:
    """The calibration data in ``path``: its text, or the JSON list of texts or token-id lists it holds.

    :raises click.BadParameter: the file is not UTF-8, or a ``.json`` file is not such a list.
    """
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise click.BadParameter(f"{path} is not UTF-8 text", param_hint="'--calibration'") from None
    if path.suffix.lower() != ".json":
        return text
    try:
        data = json.loads(text)
    except ValueError as error:
        raise click.BadParameter(f"{path} is not valid JSON ({error})", param_hint="'--calibration'") from None
    texts = isinstance(data, list) and data and all(isinstance(item, str) for item in data)
    ids = (
        isinstance(data, list)
        and data
        and all(
            isinstance(item, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in item)
            for item in data
        )
    )
    if not (texts or ids):
        raise click.BadParameter(
            f"{path} must hold a non-empty JSON list of texts or of token-id lists", param_hint="'--calibration'"
        )
    return data


@click.command()
@click.argument("src", type=Checkpoint())
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@quantization_options
@click.option("--full-precision", is_flag=True, help="Write full-precision weights instead of another method.")
@click.option("--gguf-file", metavar="NAME", help="The weight file to read in SRC, when it holds several.")
@calibration_option
@dtype_option
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists and is not empty.")
def convert(
    src: str,
    out: Path,
    preset: str | None,
    config_text: str | None,
    recipe: Path | None,
    full_precision: bool,
    gguf_file: str | None,
    calibration: Path | None,
    dtype: str,
    overwrite: bool,
) -> None:
    """Convert SRC (a checkpoint quantized by any installed method, a directory, a weight file or a hub id) to OUT.

    Exactly one of --preset, --config, --recipe or --full-precision says what OUT holds. Each module of SRC is
    dequantized only when the target needs it and dropped right after, so peak memory stays near the larger of the
    two quantized models plus one module in full precision.
    """
    from qcore.convert import convert as run_convert

    target = resolve_quantization(preset, config_text, recipe, required=not full_precision)
    if full_precision and target is not None:
        raise click.UsageError("give either --full-precision or one of --preset, --config and --recipe")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise click.ClickException(f"{out} exists and is not empty; pass --overwrite or choose another directory")
    data = read_calibration(calibration)
    started = time.perf_counter()
    model = run_convert(
        src, out, target, dtype=resolve_dtype(dtype), gguf_file=gguf_file, calibration=data, overwrite=overwrite
    )
    elapsed = time.perf_counter() - started
    summary = [
        f"converted {escape(src)} -> {escape(str(out))}",
        f"method: {escape(method_names(model) if target is not None else 'full precision')}",
        f"{format_bytes(held_nbytes(model))} in memory, in {format_seconds(elapsed)}",
    ]
    stdout().print("\n".join(summary))
