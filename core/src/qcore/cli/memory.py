"""``qcore estimate`` and ``qcore recommend``: the memory a model takes under each preset, before loading it.

Both build the skeleton the loader would build, on the meta device, from config.json alone (for a hub id nothing
else is downloaded), and ask :meth:`qcore.loading.LoadPlan.nbytes` what each preset makes of it: the loader's own
module assignment, each config's ``quantized_nbytes`` for the modules it quantizes, full precision for the rest.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import click

from qcore.cli.options import ByteSize, dtype_option, json_option, resolve_dtype
from qcore.cli.output import escape, format_bytes, print_json, stdout

__all__ = ["estimate", "recommend"]


@dataclasses.dataclass
class _Sized:
    """One preset and what it would take for this model."""

    preset: Any  # qcore.Preset
    backend: str
    available: bool
    method: str
    nbytes: int

    def to_dict(self, full_precision: int) -> dict[str, Any]:
        return {
            "preset": self.preset.name,
            "backend": self.backend,
            "available": self.available,
            "method": self.method,
            "nbytes": self.nbytes,
            "ratio": round(self.nbytes / full_precision, 4),
        }


def _plan(source: str, dtype: str) -> Any:
    from qcore.loading import plan

    model_plan = plan(source, dtype=resolve_dtype(dtype))
    if model_plan.pre_quantized:
        raise click.ClickException(
            f"{source} is already quantized, so its size is fixed: 'qcore inspect {source}' shows it; estimate a "
            f"full-precision checkpoint instead"
        )
    return model_plan


def _size_presets(model_plan: Any, names: list[str] | None) -> list[_Sized]:
    """Size ``names`` (every installed preset when None), in the order given or registered."""
    from qcore import plugins
    from qcore.config import QuantConfig

    presets = plugins.presets()
    available = {info.name: info.available for info in plugins.backends()}
    unknown = [name for name in names or () if name not in presets]
    if unknown:
        raise click.BadParameter(
            f"unknown preset {unknown[0]!r}; installed presets: {', '.join(sorted(presets)) or 'none'}",
            param_hint="'--preset'",
        )
    sized = []
    for name in names if names is not None else list(presets):
        backend, preset = presets[name]
        config = QuantConfig.from_dict(dict(preset.config))
        sized.append(
            _Sized(preset, backend, available.get(backend, False), config.short_name(), model_plan.nbytes(config))
        )
    return sized


# -- estimate ------------------------------------------------------------------------------------------------


@click.command()
@click.argument("source", metavar="PATH_OR_HUB_ID")
@click.option(
    "--preset",
    "preset_names",
    multiple=True,
    metavar="NAME",
    help="Preset to size; repeat it (or separate names with commas). Default: every installed preset.",
)
@dtype_option
@json_option
def estimate(source: str, preset_names: tuple[str, ...], dtype: str, as_json: bool) -> None:
    """Memory the model at PATH_OR_HUB_ID would take under each preset, next to full precision.

    Computed from config.json alone (nothing else is downloaded): the weights, buffers and quantization
    statistics the loaded model will hold. Activations and the KV cache come on top.
    """
    names = [name.strip() for item in preset_names for name in item.split(",") if name.strip()] or None
    model_plan = _plan(source, dtype)
    full_precision = model_plan.nbytes()
    sized = _size_presets(model_plan, names)
    dtype_name = str(model_plan.dtype).removeprefix("torch.")
    if as_json:
        print_json(
            {
                "model": source,
                "dtype": dtype_name,
                "parameters": model_plan.parameter_count(),
                "full_precision_nbytes": full_precision,
                "presets": [row.to_dict(full_precision) for row in sized],
            }
        )
        return
    from rich.table import Table

    table = Table(title=escape(f"estimated memory of {source}"))
    for column, justify in (
        ("preset", "left"),
        ("backend", "left"),
        ("method", "left"),
        ("size", "right"),
        ("vs full", "right"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    table.add_row(f"full precision ({dtype_name})", "", "", format_bytes(full_precision), "100%", style="bold")
    for row in sized:
        note = "" if row.available else " [red](backend unavailable)[/]"
        table.add_row(
            escape(row.preset.name) + note,
            escape(row.backend),
            escape(row.method),
            format_bytes(row.nbytes),
            f"{100 * row.nbytes / full_precision:.0f}%",
        )
    stdout().print(table)
    if not sized:
        stdout().print("No preset is installed; 'qcore backends' says how to install a backend.")


# -- recommend -----------------------------------------------------------------------------------------------

#: How each goal orders the presets that fit. Ties fall to the preset that keeps more bits (the larger one).
_GOALS = {
    "quality": lambda row, device: (-row.nbytes,),
    "speed": lambda row, device: (device not in row.preset.fast_on, -row.nbytes),
    "finetune": lambda row, device: (not row.preset.trainable, -row.nbytes),
}


@click.command()
@click.argument("source", metavar="PATH_OR_HUB_ID")
@click.option(
    "--memory",
    "budget",
    type=ByteSize(),
    required=True,
    help="Memory the weights may take: 8GB and 512MB are decimal, 8GiB binary.",
)
@click.option(
    "--device",
    type=click.Choice(["cpu", "cuda"]),
    default=None,
    help="The device the model will run on. Default: cuda when one is visible, else cpu.",
)
@click.option(
    "--goal",
    type=click.Choice(sorted(_GOALS)),
    default="quality",
    show_default=True,
    help="quality: most bits that fit; speed: a fast kernel on the device first; finetune: LoRA-trainable first.",
)
@dtype_option
@json_option
def recommend(source: str, budget: int, device: str | None, goal: str, dtype: str, as_json: bool) -> None:
    """Which installed presets fit the model at PATH_OR_HUB_ID into --memory, best first for --goal.

    Each line gives the predicted size and the trade-off: calibration, LoRA training, and whether the device has
    a fast kernel for it. Sizes are the weights only; leave room for activations and the KV cache. Exits 1 when
    nothing fits.
    """
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    model_plan = _plan(source, dtype)
    full_precision = model_plan.nbytes()
    candidates = [row for row in _size_presets(model_plan, None) if row.available]
    if not candidates:
        raise click.ClickException("no backend that can run here is installed; 'qcore backends' says how to get one")
    order = _GOALS[goal]
    fitting = sorted((row for row in candidates if row.nbytes <= budget), key=lambda row: order(row, device))
    too_big = sorted((row for row in candidates if row.nbytes > budget), key=lambda row: row.nbytes)

    if as_json:
        print_json(
            {
                "model": source,
                "memory": budget,
                "device": device,
                "goal": goal,
                "full_precision_nbytes": full_precision,
                "full_precision_fits": full_precision <= budget,
                "presets": [
                    {
                        **row.to_dict(full_precision),
                        "rank": rank,
                        "fits": rank is not None,
                        "fast_on_device": device in row.preset.fast_on,
                        "trainable": row.preset.trainable,
                        "needs_calibration": row.preset.needs_calibration,
                        "summary": row.preset.summary,
                    }
                    for rank, row in [*enumerate(fitting, start=1), *((None, row) for row in too_big)]
                ],
            }
        )
    else:
        _print_recommendation(source, budget, device, goal, full_precision, fitting, too_big)
    if not fitting:
        smallest = too_big[0]
        raise click.ClickException(
            f"no installed preset fits in {format_bytes(budget)}: the smallest, {smallest.preset.name}, needs "
            f"{format_bytes(smallest.nbytes)}; raise --memory or choose a smaller model"
        )


def _trade_off(row: _Sized, device: str) -> str:
    preset = row.preset
    parts = [preset.summary] if preset.summary else []
    parts.append("needs calibration data" if preset.needs_calibration else "no calibration")
    parts.append("LoRA-trainable" if preset.trainable else "not trainable")
    parts.append(f"fast kernel on {device}" if device in preset.fast_on else f"no fast kernel on {device}")
    return "; ".join(parts)


def _print_recommendation(
    source: str, budget: int, device: str, goal: str, full_precision: int, fitting: list[_Sized], too_big: list[_Sized]
) -> None:
    from rich.table import Table

    table = Table(title=escape(f"{source} in {format_bytes(budget)} on {device}, best for {goal}"))
    for column, justify in (("#", "right"), ("preset", "left"), ("size", "right"), ("trade-off", "left")):
        table.add_column(column, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for rank, row in enumerate(fitting, start=1):
        table.add_row(str(rank), escape(row.preset.name), format_bytes(row.nbytes), escape(_trade_off(row, device)))
    for row in too_big:
        table.add_row("-", escape(row.preset.name), format_bytes(row.nbytes), "[red]does not fit[/]", style="dim")
    console = stdout()
    console.print(table)
    fits = "fits" if full_precision <= budget else "does not fit"
    console.print(
        f"Full precision takes {format_bytes(full_precision)} and {fits}. "
        f"Sizes are weights only: leave room for activations and the KV cache."
    )
