"""``qcore demo``: every installed backend, end to end, on a small random Llama, with nothing to download.

The checkpoint is built once with random weights and cached (``$XDG_CACHE_HOME/qcore/demo``, else
``~/.cache/qcore/demo``). Then, for each preset of each backend that can run here, the demo quantizes it while
loading (all six phases), runs a forward pass, measures the output against the full-precision model, saves the
result and reloads it, and checks that the reloaded model computes the same output. A backend that fails any step
makes the demo exit 1; one that turns out not to run on this device (``BackendUnavailable`` at validation) is
listed as skipped.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from qcore.cli.options import check_device, debug_enabled
from qcore.cli.output import (
    escape,
    format_bytes,
    format_count,
    format_seconds,
    held_nbytes,
    method_names,
    stderr,
    stdout,
)

__all__ = ["demo", "demo_checkpoint"]

#: The demo model: Llama's architecture at a size every backend quantizes in seconds on a CPU. Widths are
#: multiples of 128 so that every backend's block and group sizes divide them.
DEMO_CONFIG = dict(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
#: Bumped whenever DEMO_CONFIG, the way weights are drawn or the files beside them change, so an old cached
#: checkpoint is not reused (2: a byte-level tokenizer, so ``qcore eval`` and ``qcore generate`` run on it).
DEMO_VERSION = 2
#: A reloaded model computes with the same stored weights and kernels, so anything above float noise is a bug.
ROUND_TRIP_TOLERANCE = 1e-4


@dataclasses.dataclass
class _Result:
    preset: str
    method: str = ""
    footprint: int = 0
    load_s: float = 0.0
    forward_s: float = 0.0
    error: float | None = None
    round_trip: float | None = None
    failure: str | None = None
    skipped: str | None = None
    #: The output on the demo input, kept for comparing presets against full precision.
    logits: Any = dataclasses.field(default=None, repr=False)


@click.command()
@click.option(
    "--all-presets", is_flag=True, help="Run every preset of every backend, not only each backend's recommended one."
)
@click.option("--device", default="cpu", show_default=True, callback=check_device, help="Where to run: cpu or cuda.")
def demo(all_presets: bool, device: str) -> None:
    """Try every installed backend on a small random Llama: quantize, run, save, reload.

    Needs no download and no arguments. Prints, for each backend's recommended preset (every preset with
    --all-presets), the memory footprint, load and forward times, and the output error against full precision.
    Exits 1 if any backend that can run here fails.
    """
    import torch

    from qcore import plugins

    checkpoint = demo_checkpoint()
    # Import the loader and the model class now so that the first timed load does not pay for them.
    from transformers import LlamaForCausalLM  # noqa: F401

    import qcore.loading  # noqa: F401

    infos = plugins.backends()
    unavailable = [info for info in infos if not info.available]
    presets = plugins.presets()
    chosen = [
        name for info in infos if info.available
        for name in (info.presets if all_presets else recommended_presets(info, presets)[:1])
    ]  # fmt: skip

    input_ids = torch.randint(0, DEMO_CONFIG["vocab_size"], (1, 32), generator=torch.Generator().manual_seed(0))
    status = stderr().status("demo: full precision")
    with status:
        reference = _run_preset("full precision", None, checkpoint, input_ids, device, None)
        if reference.failure is not None:
            raise click.ClickException(f"the full-precision model failed: {reference.failure}")
        results = [reference]
        for name in chosen:
            status.update(f"demo: {escape(name)}")
            results.append(_run_preset(name, presets[name][1], checkpoint, input_ids, device, reference))

    _print_results(results, unavailable)
    failed = [result for result in results if result.failure is not None]
    if failed:
        raise click.ClickException(
            f"{len(failed)} preset(s) failed: {', '.join(result.preset for result in failed)}; "
            f"rerun with 'qcore --debug demo' for the traceback"
        )


def recommended_presets(info: Any, presets: dict[str, Any]) -> list[str]:
    """A backend's presets, the one it recommends (``Preset.recommended``) first."""
    return sorted(info.presets, key=lambda name: not presets[name][1].recommended)


def demo_checkpoint() -> Path:
    """The cached random-weight checkpoint, built on first use."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qcore" / "demo"
    directory = cache / f"llama-random-v{DEMO_VERSION}"
    if (directory / "config.json").is_file() and (directory / "model.safetensors").is_file():
        stdout().print(f"Using the demo checkpoint cached in {escape(str(directory))} (random weights).")
        return directory

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import qcore

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**DEMO_CONFIG))
    # transformers' own save_pretrained records the class; the loader reads it to build the right head.
    model.config.architectures = [type(model).__name__]
    qcore.save_pretrained(model, directory, overwrite=True)
    from qcore.testing.models import add_byte_tokenizer

    add_byte_tokenizer(directory)  # any text encodes, one token per byte: enough to score and generate
    stdout().print(
        f"Built a demo checkpoint: Llama architecture, {format_count(model.num_parameters())} random parameters, "
        f"no download; cached in {escape(str(directory))}."
    )
    return directory


def _run_preset(
    name: str, preset: Any, checkpoint: Path, input_ids: Any, device: str, reference: _Result | None
) -> _Result:
    """Load ``checkpoint`` under ``preset`` (None: full precision), run it, and for a preset save and reload it."""
    import qcore
    from qcore.errors import BackendUnavailable

    result = _Result(name)
    try:
        config = dict(preset.config) if preset is not None else None
        started = time.perf_counter()
        model = qcore.from_pretrained(checkpoint, config, device_map=device)
        result.load_s = time.perf_counter() - started
        result.method, result.footprint = method_names(model), held_nbytes(model)
        result.logits, result.forward_s = _forward(model, input_ids)
        if reference is not None:
            result.error = _relative_error(result.logits, reference.logits)
            result.round_trip = _round_trip(model, checkpoint.parent, input_ids, result.logits)
            if result.round_trip > ROUND_TRIP_TOLERANCE:
                result.failure = (
                    f"the reloaded model's output differs from the saved model's by {result.round_trip:.2e}"
                )
    except BackendUnavailable as error:
        result.skipped = str(error)
    except Exception as error:
        if debug_enabled():
            raise
        result.failure = f"{type(error).__name__}: {' '.join(str(error).split())}"
        stderr().print(f"[red]{escape(name)} failed[/]: {escape(result.failure)}")
    return result


def _forward(model: Any, input_ids: Any) -> tuple[Any, float]:
    """The logits on ``input_ids`` and the best of three timed passes (the machine may be busy with other work)."""
    import torch

    with torch.inference_mode():
        ids = input_ids.to(model.device)
        model(ids)  # warm-up: first calls pay for kernel selection and allocation
        timings = []
        for _ in range(3):
            started = time.perf_counter()
            logits = model(ids).logits
            timings.append(time.perf_counter() - started)
        return logits.float().cpu(), min(timings)


def _relative_error(logits: Any, reference: Any) -> float:
    return float((logits - reference).norm() / reference.norm())


def _round_trip(model: Any, scratch: Path, input_ids: Any, logits: Any) -> float:
    """Save, reload and rerun; the relative difference from ``logits``."""
    import qcore

    with tempfile.TemporaryDirectory(dir=scratch, prefix="roundtrip-") as directory:
        saved = Path(directory) / "model"
        qcore.save_pretrained(model, saved)
        reloaded = qcore.from_pretrained(saved, device_map=str(model.device))
        again, _ = _forward(reloaded, input_ids)
    return _relative_error(again, logits)


def _print_results(results: list[_Result], unavailable: list[Any]) -> None:
    from rich.table import Table

    table = Table(title="qcore demo")
    for column, justify in (
        ("preset", "left"),
        ("method", "left"),
        ("memory", "right"),
        ("load", "right"),
        ("forward", "right"),
        ("error", "right"),
        ("save + reload", "left"),
    ):
        table.add_column(column, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for result in results:
        table.add_row(*_cells(result))
    console = stdout()
    console.print(table)
    console.print(
        "[dim]memory: weights, buffers and quantization statistics; error: relative L2 error of the logits "
        "against full precision\nsave + reload: the reloaded model's logits against the quantized model's\n"
        "The weights are random, which quantizes worse than a trained model's: these errors overstate what a real "
        "model loses. 'qcore eval' measures a real one.[/]"
    )
    for info in unavailable:
        console.print(
            f"[yellow]not run[/]: {escape(info.name)} ({escape(info.distribution)}): {escape(info.reason or '')}"
        )
    if len(results) == 1 and not unavailable:
        console.print("No qcore backend is installed; 'qcore backends' says how to get one.")


def _cells(result: _Result) -> tuple[str, ...]:
    """One table row: the measurements, or why there are none."""
    name = escape(result.preset)
    if result.skipped is not None:
        return (name, "", "", "", "", "", f"[yellow]skipped[/]: {escape(result.skipped)}")
    if result.failure is not None:
        return (name, escape(result.method), "", "", "", "", f"[red]failed[/]: {escape(result.failure)}")
    error = "-" if result.error is None else f"{100 * result.error:.2f}%"
    if result.round_trip is None:
        reload = "-"
    elif result.round_trip == 0:
        reload = "[green]identical[/]"
    else:
        reload = f"[green]ok[/] ({result.round_trip:.1e})"
    return (
        name,
        escape(result.method),
        format_bytes(result.footprint),
        format_seconds(result.load_s),
        format_seconds(result.forward_s),
        error,
        reload,
    )
