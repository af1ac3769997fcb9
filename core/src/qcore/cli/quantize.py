"""``qcore quantize``: load a checkpoint quantized on the fly and save the result as a pre-quantized checkpoint.

The load runs all six phases through :func:`qcore.from_pretrained`, whose per-tensor progress callback drives the bar;
:func:`qcore.save_pretrained` writes the result. The tokenizer files travel with the weights so that the output
is as usable as the input (``qcore generate OUT`` needs them).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import click

from qcore.cli.convert import calibration_option, read_calibration
from qcore.cli.options import (
    Checkpoint,
    device_option,
    dtype_option,
    quantization_options,
    resolve_dtype,
    resolve_quantization,
)
from qcore.cli.output import escape, format_bytes, format_seconds, held_nbytes, method_names, stderr, stdout

__all__ = ["quantize", "copy_tokenizer", "TensorProgress"]

#: Files of a tokenizer, as transformers' tokenizers save them (fast, sentencepiece, BPE and WordPiece vocabularies).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


@click.command()
@click.argument("src", type=Checkpoint())
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@quantization_options
@dtype_option
@device_option
@calibration_option
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists and is not empty.")
def quantize(
    src: str,
    out: Path,
    preset: str | None,
    config_text: str | None,
    recipe: Path | None,
    dtype: str,
    device: str,
    calibration: Path | None,
    overwrite: bool,
) -> None:
    """Quantize SRC (a checkpoint directory or hub id) and save it to OUT.

    Exactly one of --preset, --config or --recipe says how. OUT loads back with qcore.from_pretrained(OUT) (and,
    for a method transformers knows, with transformers itself).
    """
    import qcore
    from qcore.checkpoint import open_checkpoint
    from qcore.loading import from_pretrained  # imports torch and transformers now, outside the timed load

    config = resolve_quantization(preset, config_text, recipe, required=True)
    data = read_calibration(calibration)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        # Checked before loading, which may take minutes; save_pretrained would only refuse at the end.
        raise click.ClickException(f"{out} exists and is not empty; pass --overwrite or choose another directory")

    started = time.perf_counter()
    with TensorProgress("quantizing") as progress:
        model = from_pretrained(
            src, config, dtype=resolve_dtype(dtype), device_map=device, calibration=data, progress=progress
        )
    loaded = time.perf_counter()
    qcore.save_pretrained(model, out, overwrite=overwrite)
    saved = time.perf_counter()

    source = Path(model.name_or_path)  # the local snapshot, also for a hub id
    copied = copy_tokenizer(source, out)
    # The reader the load chose (safetensors, or a container such as a .gguf file named by its path).
    read = open_checkpoint(src if Path(src).is_file() else source)
    before, after = read.total_nbytes(), open_checkpoint(out).total_nbytes()
    _print_summary(model, src, out, before, after, loaded - started, saved - loaded, copied)


def _print_summary(
    model: Any, src: str, out: Path, before: int, after: int, load_s: float, save_s: float, tokenizer: list[str]
) -> None:
    from rich.table import Table

    applied = getattr(model, "qcore_applied", {})
    methods = method_names(model)
    kernels = ", ".join(f"{backend}: {kernel}" for backend, kernel in model.qcore_kernels.items())
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row("saved", escape(f"{src} -> {out}"))
    summary.add_row("method", escape(methods + (f" (kernels {kernels})" if kernels else "")))
    summary.add_row("modules", f"{len(applied)} quantized")
    fallbacks = getattr(model, "qcore_fallbacks", {})
    if fallbacks:
        name, what = next(iter(fallbacks.items()))
        summary.add_row(
            "fallbacks", escape(f"{len(fallbacks)} module(s) did not fit the settings, e.g. {name}: {what}")
        )
    ratio = f" ({before / after:.2f}x smaller)" if after else ""
    summary.add_row(
        "size",
        f"{format_bytes(before)} -> {format_bytes(after)} on disk{ratio}; {format_bytes(held_nbytes(model))} in memory",
    )
    summary.add_row("time", f"load and quantize {format_seconds(load_s)}, save {format_seconds(save_s)}")
    summary.add_row("tokenizer", "copied" if tokenizer else "none in the source ('qcore generate' will need one)")
    stdout().print(summary)


def copy_tokenizer(source: Path, out: Path) -> list[str]:
    """Copy the tokenizer files found in ``source`` into ``out``; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
            copied.append(name)
    return copied


class TensorProgress:
    """A progress bar with ETA over the checkpoint's tensors, fed by ``from_pretrained(progress=...)``."""

    def __init__(self, description: str):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.description = description
        self.task: Any = None
        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("[dim]{task.fields[tensor]}"),
            console=stderr(),
        )

    def __enter__(self) -> TensorProgress:
        self.bar.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.bar.stop()

    def __call__(self, done: int, total: int, name: str) -> None:
        # The total is known only once the checkpoint's headers are read, at the first tensor.
        if self.task is None:
            self.task = self.bar.add_task(self.description, total=total, tensor="")
        self.bar.update(self.task, completed=done, tensor=escape(name))
