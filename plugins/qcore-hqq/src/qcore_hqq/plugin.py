"""The qcore-hqq plugin: registration and the phase hooks that quantize ``nn.Linear`` layers with hqq's HQQLinear.

    validate          hqq importable and recent enough
    update_device_map refuse HQQ layers offloaded to CPU/disk beside an accelerator
    preprocess_model  each owned Linear -> an empty HQQLinear on meta (layers.make_skeleton)
    load_weight       quantize the streamed weight, or restore the saved HQQ tensors (layers), decoded and
                      checked by qcore first (stored), never by hqq's eval-based decoder
    postprocess       every skeleton filled; transformers' HQQ flags set
    optimize_runtime  pin the fastest hqq backend per layer (kernels)
    dequantize_module the plain weight each HQQ layer computes with (layers.dequantized), for qcore.dequantize
                      and qcore convert

This module is the entry point (``qcore`` group, name ``hqq``): importing it imports neither torch nor hqq; the
hooks import them when they run.
"""

from __future__ import annotations

import importlib.metadata
from typing import TYPE_CHECKING, Any

import qcore
from packaging.requirements import Requirement

from qcore_hqq.config import HqqConfig

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

#: The hqq release this plugin is written and tested against, and newer.
HQQ_REQUIREMENT = "hqq>=0.2.8"

_PRESET_SUMMARIES = {
    2: "2-bit HQQ, groups of 64: ~2.5 bits/weight; smallest, noticeably lossy",
    3: "3-bit HQQ, groups of 64: ~3.7 bits/weight (3-bit packs 10 per int32); between 2- and 4-bit in size and quality",
    4: "4-bit HQQ, groups of 64: ~4.5 bits/weight; the usual size/quality trade-off",
    8: "8-bit HQQ, groups of 64: ~8.5 bits/weight; near full-precision quality at about half of bf16's size",
}


@qcore.hookimpl
def register_backend() -> qcore.Backend:
    return qcore.Backend(
        name="hqq",
        configs={"hqq": HqqConfig},
        presets=tuple(
            qcore.Preset(
                name=f"hqq-{nbits}bit",
                config={"quant_method": "hqq", "nbits": nbits, "group_size": 64, "axis": 1},
                summary=summary,
                trainable=True,
                fast_on=("cuda",),
                recommended=nbits == 4,
            )
            for nbits, summary in _PRESET_SUMMARIES.items()
        ),
        requires=(HQQ_REQUIREMENT,),
    )


@qcore.hookimpl
def validate(config: HqqConfig, context: qcore.LoadContext) -> None:
    requirement = Requirement(HQQ_REQUIREMENT)
    try:
        installed = importlib.metadata.version(requirement.name)
    except importlib.metadata.PackageNotFoundError:
        raise qcore.BackendUnavailable(f"hqq is not installed: pip install '{HQQ_REQUIREMENT}'") from None
    if installed not in requirement.specifier:
        raise qcore.BackendUnavailable(f"hqq {installed} is too old for qcore-hqq: pip install -U '{HQQ_REQUIREMENT}'")
    try:
        import hqq.core.quantize  # noqa: F401
    except ImportError as error:
        raise qcore.BackendUnavailable(
            f"hqq {installed} is installed but does not import ({error}); reinstall it: "
            f"pip install --force-reinstall '{HQQ_REQUIREMENT}'"
        ) from None


@qcore.hookimpl
def update_device_map(config: HqqConfig, context: qcore.LoadContext, device_map: dict[str, Any]) -> None:
    accelerators = sorted({str(d) for d in device_map.values() if str(d) not in ("cpu", "disk")})
    if not accelerators:
        return None
    for name in context.modules:
        placement = _placement(device_map, name)
        if placement in ("cpu", "disk"):
            raise qcore.ConfigError(
                f"hqq: module {name!r} is mapped to {placement!r} while the model runs on {accelerators[0]}; HQQ "
                f"layers cannot be offloaded (accelerate would move W_q but not the scales and zeros hqq keeps beside "
                f"it). Map every HQQ layer to the accelerator, skip it (skip_modules), or load the whole model on 'cpu'"
            )
    return None


@qcore.hookimpl
def preprocess_model(config: HqqConfig, context: qcore.LoadContext, model: PreTrainedModel) -> None:
    import torch

    from qcore_hqq.layers import make_skeleton

    if not context.pre_quantized:
        _check_dynamic_tags(config, context.modules)
    for name in context.modules:
        if context.pre_quantized:
            # The stored tensors say which layers hqq quantized and how; a per-module config may have left some in
            # full precision, stored as a plain weight.
            if "W_q" not in context.tensor_names(name):
                continue
            quant_config = None
        else:
            module = model.get_submodule(name)
            out_features, in_features = _shape(module)
            fallback = config.shape_fallback(name, out_features, in_features)
            if fallback is not None:
                context.report_fallback(name, fallback)
            quant_config = config.quant_config_for(name, out_features, in_features)
            if quant_config is None:
                continue
        with torch.device("meta"):
            layer = make_skeleton(
                name, model.get_submodule(name), quant_config, context.dtype, context.device_for(name)
            )
        model.set_submodule(name, layer)


@qcore.hookimpl
def load_weight(
    config: HqqConfig,
    context: qcore.LoadContext,
    model: PreTrainedModel,
    module_name: str,
    tensor_name: str,
    tensor: torch.Tensor,
) -> dict[str, Any] | None:
    from hqq.core.quantize import HQQLinear

    from qcore_hqq.layers import place_bias, quantize_weight, restore

    layer = model.get_submodule(module_name)
    if not isinstance(layer, HQQLinear):
        return None  # kept in full precision: the core places it
    if context.pre_quantized:
        stored = context.gather(module_name, tensor_name, tensor, exclude=())
        if stored is not None:
            settings = config.quant_config_for(module_name, layer.out_features, layer.in_features)
            restore(
                layer,
                module_name,
                stored,
                file=_file_of(context, f"{module_name}.{tensor_name}"),
                expected=settings["weight_quant_params"] if settings is not None else None,
            )
        return {}
    if tensor_name == "weight":
        quantize_weight(layer, tensor, context.dtype)
        return {}
    if tensor_name == "bias":
        place_bias(layer, tensor, context.dtype)
        return {}
    return None


@qcore.hookimpl
def postprocess(config: HqqConfig, context: qcore.LoadContext, model: PreTrainedModel) -> None:
    from qcore_hqq.layers import unfilled

    empty = unfilled(model, context.modules)
    if empty:
        raise qcore.CheckpointError(
            f"{len(empty)} HQQ layer(s) never received their weight: {empty[:5]}; the checkpoint is incomplete",
            file=str(context.source),
            tensor=f"{empty[0]}.weight",
        )
    # The flags transformers' HQQ quantizer sets, which code written for transformers' HQQ models looks for.
    model.is_hqq_quantized = True
    model.is_hqq_serializable = True


@qcore.hookimpl
def optimize_runtime(config: HqqConfig, context: qcore.LoadContext, model: PreTrainedModel) -> None:
    from hqq.core.quantize import HQQLinear

    from qcore_hqq.kernels import pin_backends

    layers = [layer for name in context.modules if isinstance(layer := model.get_submodule(name), HQQLinear)]
    if layers:
        context.report_kernel(pin_backends(layers))


@qcore.hookimpl
def dequantize_module(
    config: HqqConfig, module_name: str, module: torch.nn.Module, dtype: torch.dtype
) -> dict[str, torch.Tensor] | None:
    from hqq.core.quantize import HQQLinear

    from qcore_hqq.layers import dequantized

    return dequantized(module, dtype) if isinstance(module, HQQLinear) else None


def _file_of(context: qcore.LoadContext, key: str) -> str:
    """The checkpoint file holding tensor ``key`` (the directory when the key was renamed on the way in)."""
    info = context.checkpoint.tensors.get(key)
    return str(info.file if info is not None else context.source)


def _shape(module: Any) -> tuple[int, int]:
    """(out_features, in_features) of an ``nn.Linear`` or of transformers' ``Conv1D``, which stores (in, out)."""
    rows, columns = module.weight.shape
    return (columns, rows) if type(module).__name__ == "Conv1D" else (rows, columns)


def _placement(device_map: dict[str, Any], module_name: str) -> str:
    """The device-map entry that places ``module_name`` (longest matching prefix), as a string."""
    best, placement = -1, "cpu"
    for prefix, device in device_map.items():
        if (prefix == "" or module_name == prefix or module_name.startswith(prefix + ".")) and len(prefix) > best:
            best, placement = len(prefix), str(device)
    return placement


def _check_dynamic_tags(config: HqqConfig, module_names: tuple[str, ...]) -> None:
    """A ``dynamic_config`` tag that names no layer is a typo that would silently leave layers unquantized."""
    from qcore_hqq.config import linear_tag

    if config.dynamic_config is None:
        return
    tags = {linear_tag(name) for name in module_names}
    unknown = sorted(set(config.dynamic_config) - tags)
    if unknown:
        raise qcore.ConfigError(
            f"hqq config: dynamic_config tag(s) {unknown} match no linear layer; this model's tags are {sorted(tags)}"
        )
