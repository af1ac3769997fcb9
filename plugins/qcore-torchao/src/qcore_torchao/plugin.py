"""The qcore-torchao plugin: registration and the hooks for ``quant_method: torchao``.

    validate          torchao imports; the config's torchao objects build; the target device can run them
    preprocess_model  each owned nn.Linear the config quantizes (a stored one: each with ``_weight_*`` tensors)
                      -> an empty TorchAoLinear on meta
    load_weight       quantize the streamed weight with torchao's ``quantize_``, or check and rebuild the stored
                      tensor subclass from its tensors and its header entry
    optimize_runtime  report the tensor subclasses in use; ``"compile": true`` wraps the forward in torch.compile
    save_metadata     transformers' torchao header: one JSON per tensor and ``tensor_names``
    dequantize_module the float weight the tensor subclass computes with

This module is the entry point (``qcore`` group, name ``torchao``); importing it imports neither torch nor torchao.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING, Any

import qcore

from qcore_torchao.config import TorchAoConfig, leaf_configs
from qcore_torchao.environment import device_need, kernel_notes

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PreTrainedModel

__all__ = [
    "register_backend", "validate", "preprocess_model", "load_weight", "optimize_runtime", "save_metadata",
    "dequantize_module",
]  # fmt: skip

logger = logging.getLogger("qcore.torchao")

_REQUIREMENT = "torchao>=0.18,<0.19"

#: qcore preset -> (quant_type, summary, devices with a fast kernel)
_PRESETS = {
    "torchao-int8-weight-only": ("int8_weight_only", "int8 weights per row (torchao Int8Tensor), activations in "
                                 "the model dtype: near-lossless, half of bf16", ("cpu", "cuda")),
    "torchao-int8-dynamic": ("int8_dynamic_activation_int8_weight", "int8 weights per row and int8 activations "
                             "per token (torchao's int8 GEMM)", ("cpu", "cuda")),
    "torchao-float8-weight-only": ("float8_weight_only", "float8 e4m3 weights per row, activations in the model "
                                   "dtype", ()),
    "torchao-intx-weight-only": ("intx_weight_only", "int8 weights per row as IntxUnpackedToInt8Tensor (the "
                                 "form torchao exports to ExecuTorch)", ()),
}  # fmt: skip


@qcore.hookimpl
def register_backend() -> qcore.Backend:
    return qcore.Backend(
        name="torchao",
        configs={"torchao": TorchAoConfig},
        presets=tuple(
            qcore.Preset(
                name,
                {"quant_method": "torchao", "quant_type": kind},
                summary=summary,
                fast_on=fast,
                trainable=kind.startswith("int8"),
                recommended=name == "torchao-int8-weight-only",
            )
            for name, (kind, summary, fast) in _PRESETS.items()
        ),  # fmt: skip
        requires=(_REQUIREMENT,),
        notes=kernel_notes,
    )


@qcore.hookimpl
def validate(config: TorchAoConfig, context: qcore.LoadContext) -> None:
    try:
        import torch
        import torchao  # noqa: F401

        from qcore_torchao import layers
    except ImportError as error:
        raise qcore.BackendUnavailable(
            f"qcore-torchao needs the torchao package ({error}): pip install '{_REQUIREMENT}'"
        ) from None
    for name, leaf in leaf_configs(config.quant_type["default"]).items():
        if leaf is None:
            continue
        try:
            layers.decode(leaf)
        except (AssertionError, ValueError, TypeError, NotImplementedError) as error:
            raise qcore.ConfigError(f"torchao rejects quant_type {name} ({leaf['_type']}): {error}") from None
    if not context.pre_quantized:  # a checkpoint's stored tensors say what runs; its config says how they were made
        _check_devices(config, context.device_map or {"": "cuda" if torch.cuda.is_available() else "cpu"})


@qcore.hookimpl
def update_device_map(config: TorchAoConfig, context: qcore.LoadContext, device_map: dict[str, Any]) -> None:
    # "auto" is resolved only now: a layer it sends to the CPU (the GPU too small) must be one torchao can run there.
    if not context.pre_quantized:
        _check_devices(config, device_map)


def _check_devices(config: TorchAoConfig, device_map: dict[str, Any]) -> None:
    """Refuse, naming a module placed there, a device the config's torchao configs cannot run on."""
    import torch

    placed: dict[torch.device, str] = {}
    for module, target in device_map.items():
        if target != "disk":  # the core refuses disk itself
            placed.setdefault(torch.device(f"cuda:{target}" if isinstance(target, int) else target), module)
    for leaf in leaf_configs(config.quant_type["default"]).values():
        for device, module in placed.items() if leaf is not None else ():
            capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
            need = device_need(leaf, device.type, capability)
            if need is not None:
                where = f"the device map puts {module or 'the whole model'!r} on {device}"
                raise qcore.BackendUnavailable(f"{need} ({where}; give the GPU more max_memory or change the map)")


@qcore.hookimpl
def preprocess_model(config: TorchAoConfig, context: qcore.LoadContext, model: PreTrainedModel) -> None:
    from torch import nn

    from qcore_torchao.layers import TorchAoLinear, decode

    for name in context.modules:
        module = model.get_submodule(name)
        if type(module) is not nn.Linear:
            continue  # transformers' Conv1D (GPT-2): torchao's quantize_ takes nn.Linear only, as in transformers
        if context.pre_quantized and "weight" in context.tensor_names(name):
            continue  # stored in full precision (an FqnToConfig entry of None, or a shape torchao skipped)
        leaf = config.config_for(name)
        if leaf is None and not context.pre_quantized:
            continue
        layer = TorchAoLinear(
            module.in_features, module.out_features, module.bias is not None, context.dtype,
            None if leaf is None else decode(leaf),
        )  # fmt: skip
        model.set_submodule(name, layer)


@qcore.hookimpl
def load_weight(
    config: TorchAoConfig,
    context: qcore.LoadContext,
    model: PreTrainedModel,
    module_name: str,
    tensor_name: str,
    tensor: torch.Tensor,
) -> dict[str, Any] | None:
    from torch import nn

    from qcore_torchao.layers import TorchAoLinear, quantize, restore, weight_kind

    layer = model.get_submodule(module_name)
    if not isinstance(layer, TorchAoLinear) or tensor_name == "bias":
        return None
    device = context.device_for(module_name)
    key = f"{module_name}.{tensor_name}"
    info = context.checkpoint.tensors.get(key)
    file = str(info.file) if info is not None else str(context.source)
    if context.pre_quantized:
        stored = context.gather(module_name, tensor_name, tensor)
        if stored is None:
            return {}
        stored = {name: value.to(device) for name, value in stored.items()}
        weight = restore(
            module_name, stored, context.checkpoint.metadata, layer.out_features, layer.in_features, context.dtype,
            file,
        )  # fmt: skip
    else:
        if tensor_name != "weight":
            raise qcore.CheckpointError("is not a tensor of a full-precision Linear", file=file, tensor=key)
        weight = quantize(tensor.to(device=device, dtype=context.dtype), layer.config)
        if weight_kind(weight) == "Tensor":
            context.report_fallback(
                module_name, f"kept in full precision: torchao's {type(layer.config).__name__} skips a "
                f"{layer.out_features}x{layer.in_features} weight (its group size does not divide it)",
            )  # fmt: skip
    return {"weight": nn.Parameter(weight, requires_grad=False)}


@qcore.hookimpl
def optimize_runtime(config: TorchAoConfig, context: qcore.LoadContext, model: PreTrainedModel) -> None:
    from qcore_torchao.layers import TorchAoLinear, weight_kind

    kinds = Counter(
        weight_kind(model.get_submodule(name).weight)
        for name in context.modules
        if isinstance(model.get_submodule(name), TorchAoLinear)
    )
    if not kinds:
        return
    kernel = ", ".join(f"torchao {kind} x{count}" for kind, count in sorted(kinds.items())) + " under F.linear"
    if config.compile:
        import torch

        # Compiled lazily: the first forward pays the compile time (README: measured), later ones run the graph.
        model.forward = torch.compile(model.forward)
        kernel += ", torch.compile"
    context.report_kernel(kernel)


@qcore.hookimpl
def save_metadata(config: TorchAoConfig, model: PreTrainedModel, modules: tuple[str, ...]) -> dict[str, str]:
    from qcore_torchao.layers import stored_metadata

    return stored_metadata(model, modules)


@qcore.hookimpl
def dequantize_module(
    config: TorchAoConfig, module_name: str, module: nn.Module, dtype: torch.dtype
) -> dict[str, torch.Tensor] | None:
    from qcore_torchao.layers import dequantize

    tensors = {"weight": dequantize(module.weight, dtype)}
    if getattr(module, "bias", None) is not None:
        tensors["bias"] = module.bias.detach().to(dtype)
    return tensors
