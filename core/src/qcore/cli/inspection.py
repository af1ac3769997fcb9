"""``qcore inspect``: what a checkpoint holds, from its config and headers alone (no weight is read).

Any container the loader reads works: a safetensors directory, or a weight file a plugin's reader takes (a GGUF
file carries its config; its tensors show their stored block types, e.g. ``Q4_K``).

Parameters are counted on the model skeleton the loader would build on the meta device, so a quantized checkpoint
reports the parameters of the model it came from, not the number of packed elements it stores. Tensors are grouped
by module kind (``self_attn.q_proj``, ``mlp.down_proj``, ``embed_tokens``): the repeated layers of a transformer
collapse into one row each, which is where the bytes go.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from qcore.cli.options import Checkpoint, json_option
from qcore.cli.output import escape, format_bytes, format_count, print_json, stdout

__all__ = ["inspect", "describe_checkpoint", "module_kind"]


@click.command()
@click.argument("path", type=Checkpoint(hub_ids=False))
@click.option("--gguf-file", metavar="NAME", help="The weight file to describe in PATH, when it holds several.")
@json_option
def inspect(path: str, gguf_file: str | None, as_json: bool) -> None:
    """Describe the checkpoint in PATH (a directory or a weight file such as model.gguf) without reading its weights.

    Shows the architecture, parameter count, quantization method and config, the plugin it needs (and whether it
    is installed), and the bytes each kind of module takes.
    """
    report = describe_checkpoint(Path(path), gguf_file)
    if as_json:
        print_json(report)
    else:
        _print_report(report)


def describe_checkpoint(path: Path, gguf_file: str | None = None) -> dict[str, Any]:
    """The ``qcore inspect`` report as a JSON-ready dict."""
    from qcore.checkpoint import open_checkpoint
    from qcore.loading import plan

    skeleton = plan(path, gguf_file=gguf_file)  # a one-line CheckpointError when the config is missing or unusable
    reader = open_checkpoint(path, weights_file=gguf_file)
    directory = path if path.is_dir() else path.parent
    container_config = reader.model_config()
    if container_config is not None:
        raw_config = container_config.to_dict()
    elif (directory / "config.json").is_file():
        raw_config = json.loads((directory / "config.json").read_text())
    else:
        raw_config = {}
    quantization = raw_config.get("quantization_config")
    return {
        "path": str(path),
        "architecture": (raw_config.get("architectures") or [type(skeleton.model).__name__])[0],
        "model_type": raw_config.get("model_type"),
        "parameters": skeleton.parameter_count(),
        "dtype": str(skeleton.dtype).removeprefix("torch."),
        "quantization": _quantization(quantization) if quantization else None,
        "files": [file.name for file in reader.files],
        "total_nbytes": reader.total_nbytes(),
        "modules": _group_tensors(reader.tensors, skeleton.model),
    }


def _quantization(stored: Mapping[str, Any]) -> dict[str, Any]:
    from qcore.recipe import RECIPE_METHOD

    method = stored.get("quant_method")
    if method == RECIPE_METHOD:
        parts = [
            *stored.get("configs", []),
            *(rule.get("config") for rule in stored.get("rules", [])),
            stored.get("default"),
        ]
        methods = list(dict.fromkeys(part["quant_method"] for part in parts if isinstance(part, Mapping)))
    else:
        methods = [method]
    return {"method": method, "config": dict(stored), "backends": [_backend_for(m) for m in methods]}


def _backend_for(method: str) -> dict[str, Any]:
    """Which plugin serves ``method`` here, whether it can run, and what to install when it is missing."""
    from qcore import plugins
    from qcore.errors import ConfigError

    try:
        registered = plugins.backend_for(method)
    except ConfigError as error:
        package = plugins.KNOWN_PLUGINS.get(method)
        return {"method": method, "plugin": package, "installed": False, "available": False, "reason": str(error)}
    assert registered.backend is not None
    reason = registered.backend.unavailable_reason()
    return {
        "method": method,
        "plugin": f"{registered.distribution} {registered.version}",
        "installed": True,
        "available": reason is None,
        "reason": reason,
    }


def module_kind(module_name: str, base_prefix: str) -> str:
    """The kind of a module: its name inside a repeated layer, with expert or block indexes as ``*``.

    ``model.layers.3.self_attn.q_proj`` -> ``self_attn.q_proj``; ``model.layers.0.mlp.experts.7.w1`` ->
    ``mlp.experts.*.w1``; ``model.embed_tokens`` -> ``embed_tokens``; ``lm_head`` -> ``lm_head``.
    """
    parts = module_name.split(".")
    first_index = next((i for i, part in enumerate(parts) if part.isdigit()), None)
    if first_index is not None:
        parts = ["*" if part.isdigit() else part for part in parts[first_index + 1 :]]
    elif parts and parts[0] == base_prefix:
        parts = parts[1:]
    return ".".join(parts) or module_name


def _group_tensors(tensors: Mapping[str, Any], model: Any) -> list[dict[str, Any]]:
    from qcore.loading import _KeyMapper

    keys = _KeyMapper(model, tensors)
    prefix = getattr(model, "base_model_prefix", "")
    groups: dict[str, dict[str, Any]] = {}
    for key, info in tensors.items():
        split = keys.split(key)
        # A key the model has no module for (an unexpected tensor) is grouped under its own parent name.
        module_name = split[0] if split else key.rpartition(".")[0]
        group = groups.setdefault(
            module_kind(module_name, prefix), {"tensors": 0, "nbytes": 0, "dtypes": set(), "modules": set()}
        )
        group["tensors"] += 1
        group["nbytes"] += info.nbytes
        group["dtypes"].add(info.dtype)
        group["modules"].add(module_name)
    rows = [
        {
            "kind": kind,
            "modules": len(g["modules"]),
            "tensors": g["tensors"],
            "nbytes": g["nbytes"],
            "dtypes": sorted(g["dtypes"]),
        }
        for kind, g in groups.items()
    ]
    return sorted(rows, key=lambda row: -row["nbytes"])


def _print_report(report: dict[str, Any]) -> None:
    from rich.table import Table

    console = stdout()
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column(overflow="fold")
    facts.add_row("checkpoint", escape(report["path"]))
    facts.add_row("architecture", escape(f"{report['architecture']} ({report['model_type']})"))
    facts.add_row("parameters", f"{format_count(report['parameters'])} ({report['parameters']:,})")
    facts.add_row("dtype", report["dtype"])
    quantization = report["quantization"]
    if quantization is None:
        facts.add_row("quantization", "none (full precision)")
    else:
        facts.add_row("quantization", escape(f"{quantization['method']}: {json.dumps(quantization['config'])}"))
        for backend in quantization["backends"]:
            if backend["available"]:
                status = f"[green]{escape(backend['plugin'])}, installed[/]"
            elif backend["installed"]:
                status = f"[red]{escape(backend['plugin'])}, installed but unavailable[/]: {escape(backend['reason'])}"
            else:
                status = f"[red]not installed[/]: {escape(backend['reason'])}"
            facts.add_row(f"needs ({escape(backend['method'])})", status)
    facts.add_row("size", f"{format_bytes(report['total_nbytes'])} in {len(report['files'])} file(s)")
    console.print(facts)

    table = Table(title="bytes per module kind")
    for column, justify in (
        ("module", "left"),
        ("count", "right"),
        ("tensors", "right"),
        ("dtypes", "left"),
        ("size", "right"),
        ("share", "right"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    total = report["total_nbytes"] or 1
    for row in report["modules"]:
        table.add_row(
            escape(row["kind"]),
            str(row["modules"]),
            str(row["tensors"]),
            ", ".join(row["dtypes"]),
            format_bytes(row["nbytes"]),
            f"{100 * row['nbytes'] / total:.1f}%",
        )
    console.print(table)
