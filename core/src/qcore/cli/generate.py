"""``qcore generate``: load a model (quantizing it on the fly if asked) and stream a greedy continuation of a prompt.

The tokenizer is loaded before the model: a checkpoint without one fails in a second with a one-line error rather
than after a long load.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from qcore.cli.options import (
    Checkpoint,
    cache_option,
    device_option,
    dtype_option,
    quantization_options,
    resolve_dtype,
    resolve_quantization,
)
from qcore.cli.output import escape, method_names, stderr
from qcore.cli.quantize import TOKENIZER_FILES, TensorProgress

__all__ = ["generate"]


@click.command()
@click.argument("path", type=Checkpoint())
@quantization_options
@click.option("--prompt", required=True, help="The text to continue.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@dtype_option
@device_option
@cache_option
def generate(
    path: str,
    preset: str | None,
    config_text: str | None,
    recipe: Path | None,
    prompt: str,
    max_new_tokens: int,
    dtype: str,
    device: str,
    use_cache: bool,
) -> None:
    """Continue --prompt with the model at PATH_OR_HUB_ID, streaming the text as it is generated.

    A full-precision checkpoint is quantized while loading when --preset, --config or --recipe is given; a
    pre-quantized one loads as saved. Decoding is greedy, so the same prompt gives the same text.
    """
    import qcore

    config = resolve_quantization(preset, config_text, recipe, required=False)
    tokenizer = _load_tokenizer(path)
    with TensorProgress("loading") as progress:
        model = qcore.from_pretrained(
            path, config, dtype=resolve_dtype(dtype), device_map=device, progress=progress, cache=use_cache or None
        )
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    stderr().print(f"[dim]{escape(model.config.model_type)}, {escape(method_names(model))}[/]")
    with warnings_after_the_stream():
        click.echo(prompt, nl=False)
        model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            streamer=_echo_streamer(tokenizer),
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )


@contextlib.contextmanager
def warnings_after_the_stream() -> Iterator[None]:
    """Hold back the warnings and log records libraries emit while the text streams, and write them to stderr after
    it: a kernel's first-call warning (bitsandbytes warns at the first forward) would land in the middle of the text.
    """
    held = _HeldRecords()
    root = logging.getLogger()
    handlers, root.handlers = root.handlers, [held]
    try:
        with warnings.catch_warnings(record=True) as caught:
            yield
    finally:
        root.handlers = handlers
        for record in held.records:
            for handler in handlers:
                if record.levelno >= handler.level:
                    handler.handle(record)
        for warning in caught:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)


class _HeldRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer
    from transformers.utils import logging as transformers_logging

    directory = Path(path)
    if directory.is_dir() and not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise click.ClickException(
            f"{path} has no tokenizer (no tokenizer.json or tokenizer_config.json); copy the tokenizer files of the "
            f"model it was made from into it"
        )
    transformers_logging.set_verbosity_error()  # the CLI reports problems itself, in one line
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise click.ClickException(f"cannot load the tokenizer of {path}: {first_line}") from error


def _echo_streamer(tokenizer: Any) -> Any:
    """transformers' TextStreamer, writing through click so the text lands wherever click's stdout is."""
    from transformers import TextStreamer

    class EchoStreamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            click.echo(text, nl=stream_end)

    return EchoStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
