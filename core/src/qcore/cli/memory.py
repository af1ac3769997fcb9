"""``qcore estimate`` and ``qcore recommend``: the memory a model takes under each preset, before loading it.

Both build the skeleton the loader would build, on the meta device, from config.json alone (for a hub id nothing
else is downloaded), and ask :meth:`qcore.loading.LoadPlan.nbytes` what each preset makes of it: the loader's own
module assignment, each config's ``quantized_nbytes`` for the modules it quantizes, full precision for the rest.
Placement (``estimate --device-map``, and whether a preset fits ``recommend``'s device) is the loader's own
computation too, :func:`qcore.placement.place`, reserve for activations and the tensor in flight included.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import click

from qcore.cli.options import ByteSize, Checkpoint, dtype_option, json_option, resolve_dtype
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
    #: Module -> bytes it holds once loaded, and the largest weight converted in flight (for placement).
    sizes: dict[str, int]
    in_flight: int
    #: Module -> the fallback the preset takes for it, where its settings do not fit the module's shape.
    fallbacks: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def device_nbytes(self) -> int:
        """Memory one device must have to hold the whole model, the placement reserve included."""
        from qcore.placement import required_budget

        return required_budget(sum(self.sizes.values()), self.in_flight)

    def place(self, model_plan: Any, strategy: str, max_memory: dict[Any, int] | None) -> Any:
        from qcore.placement import place

        return place(model_plan.model, self.sizes, strategy, max_memory, in_flight=self.in_flight)

    def to_dict(self, full_precision: int) -> dict[str, Any]:
        return {
            "preset": self.preset.name,
            "backend": self.backend,
            "available": self.available,
            "method": self.method,
            "nbytes": self.nbytes,
            "ratio": round(self.nbytes / full_precision, 4),
            "device_nbytes": self.device_nbytes,
            "fallbacks": self.fallbacks,
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
    from qcore.placement import in_flight_nbytes, module_sizes

    sized = []
    for name in names if names is not None else list(presets):
        backend, preset = presets[name]
        config = QuantConfig.from_dict(dict(preset.config))
        applied = model_plan.assign(config)
        sized.append(
            _Sized(
                preset,
                backend,
                available.get(backend, False),
                config.short_name(),
                model_plan.nbytes(config),
                module_sizes(model_plan.model, applied, model_plan.dtype),
                in_flight_nbytes(model_plan.model, applied, model_plan.dtype, False),
                model_plan.fallbacks(config),
            )
        )
    return sized


class MaxMemory(click.ParamType):
    """``0=24GiB,cpu=64GiB``: a budget per device, GPU indexes and ``cpu``."""

    name = "DEVICE=SIZE,..."

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> dict[Any, int]:
        from qcore.errors import ConfigError
        from qcore.placement import parse_max_memory

        if isinstance(value, dict):
            return value
        pairs = [item.partition("=") for item in str(value).split(",") if item.strip()]
        if not pairs or any(not sep or not key.strip() for key, sep, _ in pairs):
            self.fail(f"{value!r} is not DEVICE=SIZE pairs such as 0=24GiB,cpu=64GiB", param, ctx)
        try:
            return parse_max_memory({key.strip(): size.strip() for key, _, size in pairs})
        except ConfigError as error:
            self.fail(str(error), param, ctx)


# -- estimate ------------------------------------------------------------------------------------------------


@click.command()
@click.argument("source", type=Checkpoint())
@click.option(
    "--preset",
    "--presets",
    "preset_names",
    multiple=True,
    metavar="NAME",
    help="Preset to size; repeat it (or separate names with commas). Default: every installed preset.",
)
@click.option(
    "--device-map",
    "strategy",
    type=click.Choice(["auto", "balanced", "balanced_low_0", "sequential"]),
    default=None,
    help="Also print where from_pretrained(device_map=...) would put each module under each preset.",
)
@click.option(
    "--max-memory",
    type=MaxMemory(),
    default=None,
    help="Budgets for --device-map, e.g. 0=24GiB,cpu=64GiB (GPU indexes need not exist here). Default: free memory.",
)
@dtype_option
@json_option
def estimate(
    source: str,
    preset_names: tuple[str, ...],
    strategy: str | None,
    max_memory: dict[Any, int] | None,
    dtype: str,
    as_json: bool,
) -> None:
    """Memory the model at PATH_OR_HUB_ID would take under each preset, next to full precision.

    Computed from config.json alone (nothing else is downloaded): the weights, buffers and quantization
    statistics the loaded model will hold. Activations and the KV cache come on top. With --device-map, also the
    placement the loader would compute: module groups and bytes per device, each device's reserve for activations
    and the tensor converted in flight, and what would not fit.
    """
    names = [name.strip() for item in preset_names for name in item.split(",") if name.strip()] or None
    if max_memory is not None and strategy is None:
        raise click.UsageError("--max-memory needs --device-map (auto, balanced, balanced_low_0 or sequential)")
    model_plan = _plan(source, dtype)
    full_precision = model_plan.nbytes()
    sized = _size_presets(model_plan, names)
    placements = {row.preset.name: row.place(model_plan, strategy, max_memory) for row in sized} if strategy else {}
    dtype_name = str(model_plan.dtype).removeprefix("torch.")
    if as_json:
        rows = [row.to_dict(full_precision) for row in sized]
        for row in rows:
            if row["preset"] in placements:
                row["placement"] = placements[row["preset"]].to_dict()
        print_json(
            {
                "model": source,
                "dtype": dtype_name,
                "parameters": model_plan.parameter_count(),
                "full_precision_nbytes": full_precision,
                "presets": rows,
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
        note += " [yellow](fallbacks below)[/]" if row.fallbacks else ""
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
    _print_fallbacks(sized)
    for name, placed in placements.items():
        _print_placement(name, strategy, placed)


def _print_fallbacks(sized: list[_Sized]) -> None:
    """One line per preset and fallback: what it does, for how many modules, with the first one named."""
    for row in sized:
        by_fallback: dict[str, list[str]] = {}
        for module, what in row.fallbacks.items():
            by_fallback.setdefault(what, []).append(module)
        for what, modules in by_fallback.items():
            stdout().print(
                f"{escape(row.preset.name)}: {escape(what)} for {len(modules)} module(s), e.g. {escape(modules[0])}"
            )


def _print_placement(preset: str, strategy: str | None, placed: Any) -> None:
    from rich.table import Table

    table = Table(title=escape(f"{preset} with device_map={strategy!r}"))
    for column, justify in (("device", "left"), ("modules", "left"), ("placed", "right"), ("budget", "right")):
        table.add_column(column, justify=justify, overflow="fold")  # type: ignore[arg-type]
    groups = placed.groups()
    for device, budget in placed.budgets.items():
        room = f"{format_bytes(budget)} ({format_bytes(placed.reserves[device])} reserve)"
        table.add_row(
            escape(_device_name(device)),
            escape(", ".join(groups.get(device, [])) or "-"),
            format_bytes(placed.nbytes.get(device, 0)),
            room,
        )
    if not placed.fits:
        table.add_row("[red]does not fit[/]", escape(", ".join(groups["disk"])), "", "", style="red")
    stdout().print(table)


def _device_name(device: Any) -> str:
    return f"cuda:{device}" if isinstance(device, int) else str(device)


# -- recommend -----------------------------------------------------------------------------------------------

#: How each goal orders the presets that fit. Ties fall to the preset that keeps more bits (the larger one).
_GOALS = {
    "quality": lambda row, device: (-row.nbytes,),
    "speed": lambda row, device: (device not in row.preset.fast_on, -row.nbytes),
    "finetune": lambda row, device: (not row.preset.trainable, -row.nbytes),
}


@click.command()
@click.argument("source", type=Checkpoint())
@click.option(
    "--memory",
    "budget",
    type=ByteSize(),
    required=True,
    help="Memory of the device: 8GB and 512MB are decimal, 8GiB binary. A preset fits when its weights and the "
    "loader's reserve (activations, the tensor converted in flight) do.",
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
    a fast kernel for it. Whether a preset fits is the placement from_pretrained(device_map="auto") computes for
    one device of --memory, so the reserve for activations and the tensor converted in flight is left free.
    Exits 1 when nothing fits.
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
    # The loader's own placement on one device of --memory, so "fits" leaves its reserve free too.
    on_device = {0 if device == "cuda" else "cpu": budget}
    fits = {id(row): row.place(model_plan, "sequential", on_device).fits for row in candidates}
    fitting = sorted((row for row in candidates if fits[id(row)]), key=lambda row: order(row, device))
    too_big = sorted((row for row in candidates if not fits[id(row)]), key=lambda row: row.nbytes)

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
            f"{format_bytes(smallest.device_nbytes)} ({format_bytes(smallest.nbytes)} of weights and the load's "
            f"reserve); raise --memory or choose a smaller model"
        )


def _trade_off(row: _Sized, device: str) -> str:
    """The preset's summary, then each fact its flags state that the summary does not already say."""
    preset = row.preset
    facts = [
        "needs calibration data" if preset.needs_calibration else "no calibration",
        "LoRA-trainable" if preset.trainable else "not trainable",
        f"fast kernel on {device}" if device in preset.fast_on else f"no fast kernel on {device}",
    ]
    said = preset.summary.lower()
    return "; ".join([*([preset.summary] if preset.summary else []), *(f for f in facts if f.lower() not in said)])


def _print_recommendation(
    source: str, budget: int, device: str, goal: str, full_precision: int, fitting: list[_Sized], too_big: list[_Sized]
) -> None:
    from rich.table import Table

    from qcore.placement import ACTIVATION_FRACTION

    table = Table(title=escape(f"{source} in {format_bytes(budget)} on {device}, best for {goal}"))
    for column, justify in (("#", "right"), ("preset", "left"), ("size", "right"), ("trade-off", "left")):
        table.add_column(column, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for rank, row in enumerate(fitting, start=1):
        table.add_row(str(rank), escape(row.preset.name), format_bytes(row.nbytes), escape(_trade_off(row, device)))
    for row in too_big:
        needs = f"[red]does not fit[/] (needs {format_bytes(row.device_nbytes)} with the reserve)"
        table.add_row("-", escape(row.preset.name), format_bytes(row.nbytes), needs, style="dim")
    console = stdout()
    console.print(table)
    fits = "fits" if full_precision <= budget else "does not fit"
    console.print(
        f"Full precision takes {format_bytes(full_precision)} and {fits}. Sizes are the weights; a preset fits when "
        f"{100 * ACTIVATION_FRACTION:.0f}% of --memory (activations, KV cache) and twice the largest weight "
        f"converted in flight stay free as well."
    )
