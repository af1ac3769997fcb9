"""The qcore-quanto plugin: registration and the hooks for ``quant_method: quanto``.

    validate          optimum-quanto imports (its extensions are never built: nothing here calls them)
    preprocess_model  each owned nn.Linear the config (or a saved map) quantizes -> an empty QuantoLinear on meta;
                      a shape its group size does not fit stays full precision, reported
    load_weight       quantize the streamed weight as quanto does, or check and read the stored tensors (qcore's
                      layout, or quanto's own through :func:`qcore_quanto.quanto_checkpoint`)
    postprocess       the config records the per-module map, which a save writes into config.json
    optimize_runtime  each weight picks its qcore.kernels kernel
    dequantize_module the float weight the kernel computes with

This module is the entry point (``qcore`` group, name ``quanto``); importing it imports neither torch nor quanto.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import qcore

from qcore_quanto.config import QuantoConfig
from qcore_quanto.environment import kernel_notes

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PreTrainedModel

__all__ = [
    "register_backend", "validate", "preprocess_model", "load_weight", "postprocess", "optimize_runtime",
    "dequantize_module",
]  # fmt: skip

logger = logging.getLogger("qcore.quanto")

_REQUIREMENT = "optimum-quanto>=0.2.7,<0.3"

_PRESETS = {
    "quanto-int8": ({"weights": "int8"}, "int8 weights per row: near-lossless, half of bf16", ("cpu", "cuda")),
    "quanto-int4": ({"weights": "int4"}, "int4 weights, quanto's groups (128 where they divide): ~4.3 bits/weight",
                    ("cpu", "cuda")),
    "quanto-int2": ({"weights": "int2"}, "int2 weights, quanto's groups: smallest, coarse; int4 kernels in memory",
                    ("cpu", "cuda")),
    "quanto-float8": ({"weights": "float8"}, "float8 e4m3 weights per row", ("cuda",)),
}  # fmt: skip


@qcore.hookimpl
def register_backend() -> qcore.Backend:
    return qcore.Backend(
        name="quanto",
        configs={"quanto": QuantoConfig},
        presets=tuple(
            qcore.Preset(
                name,
                {"quant_method": "quanto", **fields},
                summary=summary,
                fast_on=fast,
                trainable=False,
                recommended=name == "quanto-int8",
            )
            for name, (fields, summary, fast) in _PRESETS.items()
        ),  # fmt: skip
        requires=(_REQUIREMENT,),
        notes=kernel_notes,
    )


@qcore.hookimpl
def validate(config: QuantoConfig, context: qcore.LoadContext) -> None:
    try:
        import optimum.quanto  # noqa: F401
    except ImportError as error:
        raise qcore.BackendUnavailable(
            f"qcore-quanto needs the optimum-quanto package ({error}): pip install '{_REQUIREMENT}'"
        ) from None


@qcore.hookimpl
def preprocess_model(config: QuantoConfig, context: qcore.LoadContext, model: PreTrainedModel) -> None:
    import torch
    from torch import nn

    from qcore_quanto.layers import QuantoLinear

    for name in context.modules:
        module = model.get_submodule(name)
        kind = config.weights_for(name)
        if type(module) is not nn.Linear or kind is None:
            continue  # transformers' Conv1D (GPT-2) stays full precision, as in transformers' quanto path
        fallback = config.shape_fallback(name, module.out_features, module.in_features)
        if fallback is not None:
            if context.pre_quantized:
                raise qcore.CheckpointError(
                    f"is mapped to {kind}, but {fallback}", file=str(context.source), tensor=name
                )
            context.report_fallback(name, fallback)
            continue
        with torch.device("meta"):
            layer = QuantoLinear(
                module.in_features, module.out_features, module.bias is not None, context.dtype, kind,
                config.group_for(kind, module.in_features),
            )  # fmt: skip
        model.set_submodule(name, layer)


@qcore.hookimpl
def load_weight(
    config: QuantoConfig,
    context: qcore.LoadContext,
    model: PreTrainedModel,
    module_name: str,
    tensor_name: str,
    tensor: torch.Tensor,
) -> dict[str, Any] | None:
    from qcore_quanto.layers import QuantoLinear, quantize, restore
    from qcore_quanto.reader import QUANTO_TENSORS, from_quanto_layout

    layer = model.get_submodule(module_name)
    if not isinstance(layer, QuantoLinear) or tensor_name == "bias":
        return None
    device = context.device_for(module_name)
    info = context.checkpoint.tensors.get(f"{module_name}.{tensor_name}")
    file = str(info.file) if info is not None else str(context.source)

    def refuse(name: str, message: str) -> qcore.CheckpointError:
        return qcore.CheckpointError(message, file=file, tensor=f"{module_name}.{name}")

    if context.pre_quantized:
        stored = context.gather(module_name, tensor_name, tensor)
        if stored is None:
            return {}
        if any(name in stored for name in QUANTO_TENSORS):
            stored = from_quanto_layout(
                stored, layer.kind, layer.group_size, layer.out_features, layer.in_features, refuse
            )
        stored = {name: value.to(device) for name, value in stored.items()}
    elif tensor_name == "weight":
        stored = quantize(tensor.to(device=device, dtype=context.dtype), layer.kind, layer.group_size)
    else:
        raise refuse(tensor_name, "is not a tensor of a full-precision Linear")
    weight, shift = restore(stored, layer, module_name, file)
    return {"weight": weight, "shift": shift}


@qcore.hookimpl
def postprocess(config: QuantoConfig, context: qcore.LoadContext, model: PreTrainedModel) -> None:
    from qcore_quanto.layers import QuantoLinear

    quantized = {name: model.get_submodule(name) for name in context.modules}
    quantized = {name: layer.kind for name, layer in quantized.items() if isinstance(layer, QuantoLinear)}
    # The checkpoint says what each module is: a save writes this map as ``weights`` (see the config's docstring).
    if quantized:
        config.weights = quantized


@qcore.hookimpl
def optimize_runtime(config: QuantoConfig, context: qcore.LoadContext, model: PreTrainedModel) -> None:
    from qcore.kernels import describe

    from qcore_quanto.layers import QuantoLinear

    weights = []
    for name in context.modules:
        layer = model.get_submodule(name)
        if isinstance(layer, QuantoLinear):
            layer.select(layer.weight.device, context.dtype)
            weights.append(layer.weight)
    if weights:
        context.report_kernel(describe(weights))


@qcore.hookimpl
def dequantize_module(
    config: QuantoConfig, module_name: str, module: nn.Module, dtype: torch.dtype
) -> dict[str, torch.Tensor] | None:
    from qcore_quanto.layers import QuantoLinear

    weight = module.weight.dequantize(dtype) if isinstance(module, QuantoLinear) else module.weight.detach().to(dtype)
    tensors = {"weight": weight}
    if module.bias is not None:
        tensors["bias"] = module.bias.detach().to(dtype)
    return tensors
