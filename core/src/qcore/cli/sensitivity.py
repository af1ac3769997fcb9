"""``qcore sensitivity``: per-layer error of candidate presets, and the automatic recipe under a memory budget.

The measuring and the choice live in :mod:`qcore.sensitivity`; this module parses options and prints tables.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from qcore.cli.options import ByteSize, dtype_option, json_option, resolve_dtype
from qcore.cli.output import escape, format_bytes, print_json, stderr, stdout

__all__ = ["sensitivity"]


@click.command()
@click.argument("source", metavar="PATH_OR_HUB_ID")
@click.option(
    "--presets", "preset_names", required=True, metavar="NAMES",
    help="Candidate presets, separated by commas (e.g. hqq-4bit,bnb-int8).",
)  # fmt: skip
@click.option("--budget", type=ByteSize(), help="Choose a preset per layer so the model fits this size, e.g. 300MB.")
@click.option(
    "--save-recipe", type=click.Path(dir_okay=False, path_type=Path),
    help="With --budget: write the chosen recipe as JSON, for 'qcore quantize --recipe'.",
)  # fmt: skip
@click.option(
    "--inputs", type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="JSON file with a list of token-id lists to measure on; default: a fixed synthetic batch.",
)  # fmt: skip
@dtype_option
@json_option
def sensitivity(
    source: str, preset_names: str, budget: int | None, save_recipe: Path | None, inputs: Path | None,
    dtype: str, as_json: bool,
) -> None:  # fmt: skip
    """Measure each candidate preset's output error on every layer of the model at PATH_OR_HUB_ID.

    Each layer is fed the inputs its full-precision version saw and its relative output error is measured in
    isolation. With --budget, also choose the per-layer mix of presets (or full precision) with the least total error
    that fits the budget, and print it.
    """
    import torch

    from qcore.plugins import preset_config
    from qcore.sensitivity import auto_recipe, measure_sensitivity

    names = [name.strip() for name in preset_names.split(",") if name.strip()]
    candidates = {name: preset_config(name) for name in names}
    input_ids = torch.tensor(json.loads(inputs.read_text())) if inputs else None
    torch_dtype = getattr(torch, resolve_dtype(dtype)) if resolve_dtype(dtype) else None
    stderr().print(f"measuring {len(names)} preset(s) on {escape(source)} ...")
    measured = measure_sensitivity(source, candidates, input_ids=input_ids, dtype=torch_dtype)
    chosen = auto_recipe(measured, budget) if budget is not None else None
    if save_recipe is not None:
        if chosen is None:
            raise click.UsageError("--save-recipe needs --budget")
        save_recipe.write_text(json.dumps(chosen.recipe.to_dict(), indent=2) + "\n")
    if as_json:
        data = {"errors": measured.errors, "nbytes": measured.nbytes, "fixed_nbytes": measured.fixed_nbytes}
        if chosen is not None:
            data["auto_recipe"] = {
                "choice": chosen.choice, "predicted_nbytes": chosen.predicted_nbytes,
                "predicted_error": chosen.predicted_error, "budget": chosen.budget,
            }  # fmt: skip
        print_json(data)
        return
    from rich.table import Table

    table = Table(title=escape(f"relative output error per layer of {source}"))
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
    console = stdout()
    console.print(table)
    if chosen is not None:
        best_single = _best_single(measured, names, budget)
        console.print(
            f"auto recipe: {format_bytes(chosen.predicted_nbytes)} of {format_bytes(chosen.budget)} budget, "
            f"total error {chosen.predicted_error:.3e}"
            + (f" (best single preset that fits: {best_single[0]}, {best_single[1]:.3e})" if best_single else "")
        )
        if save_recipe is not None:
            console.print(
                f"recipe written to {escape(str(save_recipe))}; use: qcore quantize SRC OUT --recipe {escape(str(save_recipe))}"
            )


def _best_single(measured, names, budget):
    fits = [
        (name, measured.total_error({layer: name for layer in measured.errors}))
        for name in names
        if measured.total_nbytes({layer: name for layer in measured.errors}) <= budget
    ]
    return min(fits, key=lambda item: item[1]) if fits else None
