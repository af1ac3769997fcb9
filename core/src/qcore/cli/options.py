"""Options several commands share: how to quantize (--preset / --config / --recipe), --dtype, --device, --json.

Parsing a quantization choice only reads JSON and asks the plugin registry for config classes, so a bad preset name
or config fails here, before any model is loaded, as a usage error naming the option.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from qcore.errors import ConfigError

__all__ = [
    "ByteSize",
    "cache_option",
    "Checkpoint",
    "debug_enabled",
    "device_option",
    "dtype_option",
    "json_option",
    "quantization_options",
    "resolve_dtype",
    "resolve_quantization",
]

DTYPES = ("auto", "float32", "float16", "bfloat16")


def quantization_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Add --preset, --config and --recipe (at most one may be given; see :func:`resolve_quantization`)."""
    f = click.option(
        "--recipe",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help='JSON file of per-module rules: {"rules": [{"pattern": "*.mlp.*", "config": {...}}], "default": {...}}.',
    )(f)
    f = click.option(
        "--config",
        "config_text",
        metavar="FILE_OR_JSON",
        help='A quantization config as transformers writes it, inline or in a file: \'{"quant_method": "hqq"}\'.',
    )(f)
    f = click.option("--preset", metavar="NAME", help="A preset name ('qcore backends' lists them), e.g. bnb-nf4.")(f)
    return f


def resolve_quantization(preset: str | None, config_text: str | None, recipe: Path | None, *, required: bool):
    """The config or recipe the user chose, parsed and checked; ``None`` when none was given and none is required.

    :raises click.UsageError: more than one choice, or none when ``required``.
    :raises click.BadParameter: an unknown preset, or a config or recipe that does not parse.
    """
    from qcore.config import QuantConfig
    from qcore.recipe import Recipe

    given = [name for name, value in (("--preset", preset), ("--config", config_text), ("--recipe", recipe)) if value]
    if len(given) > 1:
        raise click.UsageError(f"give only one of --preset, --config and --recipe (got {', '.join(given)})")
    if not given:
        if required:
            raise click.UsageError(
                "choose how to quantize: --preset NAME, --config FILE_OR_JSON or --recipe FILE "
                "('qcore backends' lists the presets)"
            )
        return None
    if preset:
        from qcore.plugins import preset_config

        return _parsed(lambda: QuantConfig.from_dict(preset_config(preset)), "--preset")
    if config_text:
        return _parsed(lambda: QuantConfig.from_dict(_json_argument(config_text, "--config")), "--config")
    assert recipe is not None
    return _parsed(lambda: Recipe.from_dict(_json_argument(str(recipe), "--recipe")), "--recipe")


def _parsed(parse: Callable[[], Any], option: str) -> Any:
    try:
        return parse()
    except ConfigError as error:
        raise click.BadParameter(str(error), param_hint=f"'{option}'") from None


def _json_argument(text: str, option: str) -> Any:
    """Parse ``text`` as inline JSON when it looks like an object, else as the path of a JSON file."""
    if text.lstrip().startswith("{"):
        source, where = text, "inline JSON"
    else:
        path = Path(text)
        if not path.is_file():
            raise click.BadParameter(f"{text!r} is neither a JSON object nor a file", param_hint=f"'{option}'")
        source, where = path.read_text(), str(path)
    try:
        return json.loads(source)
    except ValueError as error:
        raise click.BadParameter(f"{where} is not valid JSON ({error})", param_hint=f"'{option}'") from None


def dtype_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--dtype",
        type=click.Choice(DTYPES),
        default="auto",
        show_default=True,
        help="dtype of the weights kept in full precision; auto takes the checkpoint's.",
    )(f)


def resolve_dtype(dtype: str) -> str | None:
    """The ``dtype=`` argument for the loader: ``None`` lets it take the checkpoint's."""
    return None if dtype == "auto" else dtype


def device_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--device",
        default="cpu",
        show_default=True,
        callback=check_device,
        help="Where to load the model: cpu, cuda, cuda:1, or auto to spread it over the GPUs and CPU.",
    )(f)


def check_device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """Refuse a ``--device`` this machine cannot serve, naming the flag as the user typed it (not ``device_map``)."""
    if not value.startswith("cuda"):
        return value
    import torch

    try:
        index = torch.device(value).index or 0
    except RuntimeError:
        raise click.BadParameter(f"{value!r} is not a device; use cpu, cuda, cuda:N or auto", ctx, param) from None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index >= count:
        found = f"{count} CUDA device(s)" if count else "no CUDA device"
        raise click.BadParameter(f"{value!r}: this machine has {found}; use --device cpu", ctx, param)
    return value


def cache_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--cache", "use_cache", is_flag=True,
        help="Keep an on-the-fly load's result in qcore's cache of quantized copies ($QCORE_CACHE_DIR, default "
        "~/.cache/qcore/quantized) and load it from there next time ('qcore cache list').",
    )(f)  # fmt: skip


def json_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts instead of a table.")(f)


def debug_enabled() -> bool:
    """Whether the global ``--debug`` flag was given (commands that collect failures re-raise them then)."""
    context = click.get_current_context(silent=True)
    return bool(context and context.find_root().params.get("debug"))


class ByteSize(click.ParamType):
    """A memory size: ``8GB`` and ``512MB`` are decimal (as disks and cloud specs count), ``8GiB`` binary."""

    name = "SIZE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        from qcore.sizes import parse_nbytes

        try:
            return parse_nbytes(value)
        except ValueError as error:
            self.fail(str(error), param, ctx)


class Checkpoint(click.ParamType):
    """A checkpoint argument: a local directory or file or, where ``hub_ids``, a hub id (``org/name``).

    A path that does not exist is a usage error (exit code 2) worded the same by every command, before anything is
    imported or loaded.
    """

    name = "PATH_OR_HUB_ID"

    def __init__(self, hub_ids: bool = True) -> None:
        self.hub_ids = hub_ids
        if not hub_ids:
            self.name = "PATH"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value)
        if Path(text).exists() or (self.hub_ids and text.count("/") == 1 and _is_hub_id(text)):
            return text
        self.fail(f"{text}: no such file or directory", param, ctx)


def _is_hub_id(text: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True
