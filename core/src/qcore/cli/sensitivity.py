"""``qcore sensitivity``: per-layer error of candidate presets on real text, the automatic recipe under a memory
budget, its end-to-end perplexity, and a chart of it all.

The measuring and the choice live in :mod:`qcore.sensitivity`, perplexity in :mod:`qcore.evaluate`, the chart in
:mod:`qcore.charts`; this module parses options and prints tables.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from qcore.cli.options import ByteSize, Checkpoint, dtype_option, json_option, resolve_dtype
from qcore.cli.output import escape, format_bytes, print_json, stderr, stdout

__all__ = ["sensitivity"]


@click.command()
@click.argument("source", type=Checkpoint())
@click.option(
    "--preset", "--presets", "preset_names", required=True, multiple=True, metavar="NAMES",
    help="Candidate presets: repeat the option or separate names by commas (e.g. hqq-4bit,bnb-int8).",
)  # fmt: skip
@click.option("--budget", type=ByteSize(), help="Choose a preset per layer so the model fits this size, e.g. 300MB.")
@click.option(
    "--save-recipe", type=click.Path(dir_okay=False, path_type=Path),
    help="With --budget: write the chosen recipe as JSON, for 'qcore quantize --recipe'.",
)  # fmt: skip
@click.option(
    "--text", "text_files", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Text to measure on (repeatable); default: the calibration part of qcore's built-in corpus.",
)  # fmt: skip
@click.option(
    "--synthetic", is_flag=True,
    help="Measure on a fixed batch of random token ids instead of text (for a model without a tokenizer).",
)  # fmt: skip
@click.option(
    "--inputs", type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="JSON file with a list of token-id lists to measure on, instead of text.",
)  # fmt: skip
@click.option(
    "--objective", type=click.Choice(["loss", "relative"]), default="loss", show_default=True,
    help="loss: each layer's predicted increase of the next-token loss (gradient-weighted output error); "
    "relative: its output error relative to its output, blind to where the layer sits.",
)  # fmt: skip
@click.option("--batch", type=click.IntRange(min=1), default=4, show_default=True, help="Sequences measured on.")
@click.option("--length", type=click.IntRange(min=2), default=128, show_default=True, help="Tokens per sequence.")
@click.option(
    "--eval-text", type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="With --budget: text to score the chosen recipe's perplexity on; default: the held-out built-in corpus.",
)  # fmt: skip
@click.option("--eval-tokens", type=click.IntRange(min=2), default=4096, show_default=True,
              help="With --budget: tokens of that text to score.")  # fmt: skip
@click.option(
    "--check/--no-check", default=True, show_default=True,
    help="With --budget and text: load the chosen mix, the mixes restricted to presets at least 80% and 100% of the "
    "size of the best single preset that fits, and that preset, score each on calibration text the measurement did "
    "not use, and offer the best (a mix only when it beats the single preset).",
)  # fmt: skip
@click.option("--check-tokens", type=click.IntRange(min=2), default=2048, show_default=True,
              help="Tokens of calibration text --check scores on.")  # fmt: skip
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), help="Write a heat map PNG of the errors.")
@click.option("--html", type=click.Path(dir_okay=False, path_type=Path), help="Write the same chart as an HTML page.")
@dtype_option
@json_option
def sensitivity(
    source: str, preset_names: tuple[str, ...], budget: int | None, save_recipe: Path | None,
    text_files: tuple[Path, ...], synthetic: bool, inputs: Path | None, objective: str, batch: int, length: int,
    eval_text: Path | None, eval_tokens: int, check: bool, check_tokens: int, plot: Path | None, html: Path | None,
    dtype: str, as_json: bool,
) -> None:  # fmt: skip
    """Measure each candidate preset's output error on every layer of the model at PATH_OR_HUB_ID.

    Each layer is fed the inputs its full-precision version saw on real text and its output error is measured in
    isolation, weighted by how much the next-token loss depends on each output (the predicted loss increase, in
    nats per token; --objective relative for the unweighted relative error). With --budget, also choose the
    per-layer mix of presets (or full precision) with the least total error that fits the budget, check it end to
    end against the best single preset that fits (--check), and score the offered recipe's perplexity on held-out
    text next to full precision and that preset.
    """
    import torch

    from qcore.plugins import preset_config
    from qcore.sensitivity import auto_recipe, measure_sensitivity

    names = [name.strip() for group in preset_names for name in group.split(",") if name.strip()]
    candidates = {name: preset_config(name) for name in names}
    if save_recipe is not None and budget is None:
        raise click.UsageError("--save-recipe needs --budget")
    if synthetic and (inputs or text_files):
        raise click.UsageError("give only one of --synthetic, --inputs and --text")
    torch_dtype = getattr(torch, resolve_dtype(dtype)) if resolve_dtype(dtype) else None
    tokenizer, texts = None, None
    if inputs:
        input_ids, measured_on = torch.tensor(json.loads(inputs.read_text())), inputs.name
    elif synthetic:
        input_ids, measured_on = None, "a synthetic batch of random token ids"
    else:
        input_ids, measured_on, tokenizer, texts = _text_batch(source, text_files, batch, length)
    stderr().print(f"measuring {len(names)} preset(s) on {escape(source)}, on {escape(measured_on)} ...")
    measured = measure_sensitivity(source, candidates, input_ids=input_ids, dtype=torch_dtype, objective=objective)
    chosen = auto_recipe(measured, budget) if budget is not None else None
    checked = None
    if chosen is not None and check and tokenizer is not None:
        checked = _check(source, measured, budget, tokenizer, texts, batch * length, check_tokens, torch_dtype)
        chosen = checked.chosen if checked is not None else chosen
    if save_recipe is not None and chosen is not None:
        save_recipe.write_text(json.dumps(chosen.recipe.to_dict(), indent=2) + "\n")
    if plot or html:
        from qcore import charts

        data = charts.heat_map(measured, chosen)
        if plot:
            charts.save_png(data, plot)
        if html:
            charts.save_html(data, html, title=f"qcore sensitivity of {source}")
    scores = None
    if chosen is not None:
        scores = _end_to_end(source, measured, chosen, names, budget, tokenizer, eval_text, eval_tokens, torch_dtype)

    if as_json:
        data = {"measured_on": measured_on, "objective": measured.objective, "errors": measured.errors,
                "nbytes": measured.nbytes, "fixed_nbytes": measured.fixed_nbytes}  # fmt: skip
        if chosen is not None:
            data["auto_recipe"] = {
                "choice": chosen.choice, "predicted_nbytes": chosen.predicted_nbytes,
                "predicted_error": chosen.predicted_error, "budget": chosen.budget,
            }  # fmt: skip
            if checked is not None:
                data["auto_recipe"]["checked"] = {"perplexity": checked.perplexity, "offered": checked.label}
            data["perplexity"] = scores
        print_json(data)
        return
    _print_table(source, names, measured, chosen)
    console = stdout()
    if chosen is not None:
        best_single = _best_single(measured, names, budget)
        console.print(
            f"auto recipe: {format_bytes(chosen.predicted_nbytes)} of {format_bytes(chosen.budget)} budget, "
            f"total {_ERROR_NAMES[measured.objective]} {chosen.predicted_error:.3e}"
            + (f" (best single preset that fits: {best_single[0]}, {best_single[1]:.3e})" if best_single else "")
        )
        if checked is not None:
            console.print(
                "checked on calibration text the measurement did not use: "
                + ", ".join(f"{escape(label)} {value:.3f}" for label, value in checked.perplexity.items())
                + f"; offered: {escape(checked.label)}"
            )
        if scores:
            console.print(
                "perplexity on held-out text: "
                + ", ".join(f"{escape(name)} {value:.3f}" for name, value in scores.items())
            )
        if save_recipe is not None:
            console.print(
                f"recipe written to {escape(str(save_recipe))}; use: qcore quantize SRC OUT --recipe "
                f"{escape(str(save_recipe))}"
            )
    for path in (plot, html):
        if path:
            console.print(f"chart written to {escape(str(path))}")


def _check(source, measured, budget, tokenizer, texts, skip, tokens, dtype):
    """:func:`qcore.sensitivity.validated_recipe` on the measurement text's next ``tokens`` tokens, or None (with a
    line on stderr) where the text runs out or no single preset fits the budget."""
    from qcore.errors import ConfigError
    from qcore.sensitivity import validated_recipe, validation_ids

    try:
        validation = validation_ids(tokenizer, texts, skip=skip, tokens=tokens)
        return validated_recipe(
            source, measured, budget, validation, dtype=dtype, progress=lambda line: stderr().print(escape(line))
        )
    except ConfigError as error:
        stderr().print(f"not checking the recipe end to end: {escape(str(error))}")
        return None


def _text_batch(source: str, text_files: tuple[Path, ...], batch: int, length: int) -> tuple[Any, str, Any, Any]:
    from qcore.cli.generate import _load_tokenizer
    from qcore.sensitivity import text_batch

    try:
        tokenizer = _load_tokenizer(source)
    except click.ClickException as error:
        raise click.ClickException(f"{error.message}; or measure on random token ids with --synthetic") from None
    texts = [file.read_text(encoding="utf-8") for file in text_files] or None
    where = ", ".join(file.name for file in text_files) or "the calibration part of qcore's built-in corpus"
    ids = text_batch(tokenizer, texts, batch=batch, length=length)
    return ids, f"{batch} x {length} tokens of {where}", tokenizer, texts


def _end_to_end(source, measured, chosen, names, budget, tokenizer, eval_text, eval_tokens, dtype):
    """Perplexity of full precision, the best single preset that fits and the chosen recipe, on held-out text."""
    if tokenizer is None:
        stderr().print("no tokenizer: skipping the end-to-end perplexity of the recipe")
        return None
    import qcore
    from qcore.evaluate import encode_texts, perplexity

    texts = [eval_text.read_text(encoding="utf-8")] if eval_text else None
    if texts is None:
        from qcore.corpus import evaluation_texts

        texts = evaluation_texts()
    ids = encode_texts(tokenizer, texts, max_tokens=eval_tokens)
    loads: dict[str, Any] = {"full precision": None}
    best_single = _best_single(measured, names, budget)
    if best_single is not None:
        loads[best_single[0]] = measured.configs[best_single[0]]
    loads["auto recipe"] = chosen.recipe
    scores = {}
    for name, config in loads.items():
        stderr().print(f"scoring {escape(name)} on {ids.shape[1]} held-out tokens ...")
        model = qcore.from_pretrained(source, config, dtype=dtype)
        scores[name] = perplexity(model, input_ids=ids).perplexity
        del model
    return scores


#: What a table or chart calls a measured error, by objective.
_ERROR_NAMES = {"loss": "predicted loss increase (nats/token)", "relative": "relative output error"}


def _print_table(source, names, measured, chosen) -> None:
    from rich.table import Table

    table = Table(title=escape(f"{_ERROR_NAMES[measured.objective]} per layer of {source}"))
    table.add_column("layer")
    for name in names:
        table.add_column(escape(name), justify="right")
    if chosen is not None:
        table.add_column("chosen", justify="left")
    for layer, errors in measured.errors.items():
        row = [escape(layer), *(f"{errors[name]:.2e}" for name in names)]
        if chosen is not None:
            row.append(escape(chosen.choice[layer] or "full precision"))
        table.add_row(*row)
    stdout().print(table)


def _best_single(measured, names, budget):
    fits = [
        (name, measured.total_error({layer: name for layer in measured.errors}))
        for name in names
        if measured.total_nbytes({layer: name for layer in measured.errors}) <= budget
    ]
    return min(fits, key=lambda item: item[1]) if fits else None
