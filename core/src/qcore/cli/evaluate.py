"""``qcore eval``: perplexity on real text, full precision and each requested quantization side by side.

Each model is a fresh :func:`qcore.from_pretrained` load (all six phases), so the load time shown is what a user
waits for; the measuring itself lives in :mod:`qcore.evaluate`.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import click

from qcore.cli.generate import _load_tokenizer
from qcore.cli.options import Checkpoint, cache_option, dtype_option, json_option, resolve_dtype, resolve_quantization
from qcore.cli.output import escape, format_bytes, format_seconds, held_nbytes, print_json, stderr, stdout

__all__ = ["evaluate"]


@dataclasses.dataclass
class _Row:
    name: str
    nbytes: int
    perplexity: float
    tokens: int
    load_s: float
    tokens_per_s: float
    ratio: float | None = None


@click.command("eval")
@click.argument("path", type=Checkpoint())
@click.option("--preset", "presets", multiple=True, metavar="NAME", help="A preset to evaluate; repeat for several.")
@click.option("--config", "config_text", metavar="FILE_OR_JSON", help="A quantization config to evaluate.")
@click.option(
    "--recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="A recipe file to evaluate."
)
@click.option(
    "--text", "text_files", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A UTF-8 text file to score; repeat for several. Default: the held-out part of qcore's built-in corpus.",
)  # fmt: skip
@click.option(
    "--max-tokens", type=click.IntRange(min=2), default=8192, show_default=True,
    help="Score only the first N tokens of the text (the whole built-in held-out text is about 25K tokens for a "
    "typical tokenizer, 96K for a byte-level one).",
)  # fmt: skip
@click.option("--window", type=click.IntRange(min=2), help="Tokens per forward pass (default 512, or the context).")
@click.option("--stride", type=click.IntRange(min=1), help="Tokens between window starts (default 256).")
@click.option("--no-baseline", is_flag=True, help="Skip the full-precision model (no ratio column then).")
@dtype_option
@cache_option
@json_option
def evaluate(
    path: str, presets: tuple[str, ...], config_text: str | None, recipe: Path | None, text_files: tuple[Path, ...],
    max_tokens: int | None, window: int | None, stride: int | None, no_baseline: bool, dtype: str, use_cache: bool,
    as_json: bool,
) -> None:  # fmt: skip
    """Perplexity of the model at PATH_OR_HUB_ID in full precision and with each --preset/--config/--recipe.

    Lower is better; a quantized model whose ratio to full precision is close to 1.00 lost little. A pre-quantized
    checkpoint is evaluated as stored.
    """
    from qcore.evaluate import encode_texts

    choices: list[tuple[str, Any]] = [] if no_baseline else [("full precision", None)]
    choices += [(name, resolve_quantization(name, None, None, required=True)) for name in presets]
    if config_text:
        choices.append(("--config", resolve_quantization(None, config_text, None, required=True)))
    if recipe:
        choices.append((recipe.name, resolve_quantization(None, None, recipe, required=True)))
    if not choices:
        raise click.UsageError("nothing to evaluate: drop --no-baseline or give --preset/--config/--recipe")

    tokenizer = _load_tokenizer(path)
    if text_files:
        texts = [_read_text(file) for file in text_files]
        source = ", ".join(file.name for file in text_files)
    else:
        from qcore.corpus import evaluation_texts

        texts, source = evaluation_texts(), "qcore's built-in held-out corpus"
    input_ids = encode_texts(tokenizer, texts, max_tokens=max_tokens)
    stderr().print(f"scoring {input_ids.shape[1]} tokens of {escape(source)}")

    rows = [_evaluate_one(path, name, config, input_ids, dtype, window, stride, use_cache) for name, config in choices]
    baseline = rows[0].perplexity if not no_baseline else None
    for row in rows:
        row.ratio = row.perplexity / baseline if baseline else None
    if as_json:
        print_json(
            {"text": source, "tokens": int(input_ids.shape[1]), "results": [dataclasses.asdict(r) for r in rows]}
        )
        return
    _print_table(path, rows)


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise click.BadParameter(f"{file} is not UTF-8 text ({error.reason})", param_hint="'--text'") from None


def _evaluate_one(path, name, config, input_ids, dtype, window, stride, use_cache) -> _Row:
    import qcore
    from qcore.evaluate import perplexity

    started = time.perf_counter()
    model = qcore.from_pretrained(path, config, dtype=resolve_dtype(dtype), cache=use_cache or None)
    load_s = time.perf_counter() - started
    from rich.progress import BarColumn, Progress, TextColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} tokens"),
                  console=stderr(), transient=True) as bar:  # fmt: skip
        task = bar.add_task(escape(name), total=int(input_ids.shape[1]))
        result = perplexity(
            model, input_ids=input_ids, window=window, stride=stride,
            progress=lambda done, total: bar.update(task, completed=done),
        )  # fmt: skip
    row = _Row(name, held_nbytes(model), result.perplexity, result.tokens, load_s, result.tokens_per_second)
    del model
    return row


def _print_table(path: str, rows: list[_Row]) -> None:
    from rich.table import Table

    table = Table(title=escape(f"perplexity of {path} (lower is better)"))
    for column in ("model", "size", "perplexity", "vs full precision", "load", "tokens/s"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in rows:
        ratio = f"{row.ratio:.3f}x" if row.ratio is not None else "-"
        table.add_row(
            escape(row.name), format_bytes(row.nbytes), f"{row.perplexity:.3f}", ratio,
            format_seconds(row.load_s), f"{row.tokens_per_s:.0f}",
        )  # fmt: skip
    stdout().print(table)
