"""The qcore-compressed-tensors plugin: registration and the hooks for ``quant_method: compressed-tensors``.

    validate          compressed-tensors imports; its own QuantizationConfig accepts the (completed) dict
    preprocess_model  each owned Linear that a config group targets (and ``ignore`` does not name), matched by
                      compressed-tensors itself -> an empty CompressedLinear on meta; one its group does not fit
                      stays full precision, reported (CompressedTensorsConfig.shape_fallback) and saved in ignore
    load_weight       quantize the streamed weight as compressed-tensors does, or check and read its stored tensors
    calibrate_block   with ``"calibration": "gptq"``: GPTQ on the block's calibration inputs, same stored format
    postprocess       every CompressedLinear got its weight
    optimize_runtime  each weight picks its qcore.kernels kernel (int4, int8, _scaled_mm or dequantize)
    dequantize_module the exact float weight back, for ``qcore convert`` and ``qcore.dequantize``

This module is the entry point (``qcore`` group, name ``compressed-tensors``); importing it imports neither torch
nor compressed-tensors.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import qcore

from qcore_compressed_tensors.config import CompressedTensorsConfig
from qcore_compressed_tensors.environment import kernel_notes

if TYPE_CHECKING:
    import torch
    from qcore.calibration import BlockInputs
    from torch import nn
    from transformers import PreTrainedModel

__all__ = [
    "register_backend", "validate", "preprocess_model", "load_weight", "calibrate_block", "postprocess",
    "optimize_runtime", "dequantize_module",
]  # fmt: skip

logger = logging.getLogger("qcore.compressed_tensors")

_REQUIREMENT = "compressed-tensors>=0.20"


#: qcore preset -> (compressed-tensors preset scheme, calibration, summary, devices with a fast kernel)
_PRESETS = {
    "ct-w4a16": ("W4A16", None, "int4 weights, groups of 128, vLLM's format: ~4.3 bits/weight; serve with vllm "
                 "serve; torch's int4 kernel on CPU and CUDA", ("cpu", "cuda")),
    "ct-w4a16-gptq": ("W4A16", "gptq", "as ct-w4a16 with GPTQ codes and scales from calibration data: closer to "
                      "full precision, slower to make", ("cpu", "cuda")),
    "ct-w8a16": ("W8A16", None, "int8 weights, groups of 128, vLLM's format: near-lossless, half of bf16",
                 ("cpu", "cuda")),
    "ct-w8a8": ("W8A8", None, "int8 weights per channel, int8 activations per token (vLLM's int8 GEMM)", ("cpu",)),
    "ct-fp8-dynamic": ("FP8_DYNAMIC", None, "fp8 weights per channel, fp8 activations per token: torch._scaled_mm "
                       "on sm89+ GPUs, dequantized elsewhere", ("cuda",)),
    "ct-fp8-block": ("FP8_BLOCK", None, "fp8 weights in 128x128 blocks (DeepSeek-V3 style), fp8 activations per "
                     "group of 128", ()),
}  # fmt: skip


def _preset(name: str, scheme: str, calibration: str | None, summary: str, fast_on: tuple[str, ...]) -> qcore.Preset:
    config = {"quant_method": "compressed-tensors", "config_groups": {scheme: ["Linear"]}, "ignore": ["lm_head"]}
    if calibration is not None:
        config["calibration"] = calibration
    return qcore.Preset(name, config, summary=summary, fast_on=fast_on, needs_calibration=calibration is not None)


@qcore.hookimpl
def register_backend() -> qcore.Backend:
    return qcore.Backend(
        name="compressed-tensors",
        configs={"compressed-tensors": CompressedTensorsConfig},
        presets=tuple(_preset(name, *entry) for name, entry in _PRESETS.items()),
        requires=(_REQUIREMENT,),
        notes=kernel_notes,
    )


@qcore.hookimpl
def validate(config: CompressedTensorsConfig, context: qcore.LoadContext) -> None:
    try:
        from compressed_tensors.quantization import QuantizationConfig
    except ImportError as error:
        raise qcore.BackendUnavailable(
            f"qcore-compressed-tensors needs the compressed-tensors package ({error}): pip install '{_REQUIREMENT}'"
        ) from None
    try:
        QuantizationConfig.model_validate(config.to_dict())
    except ValueError as error:  # pydantic's ValidationError is a ValueError
        raise qcore.ConfigError(f"compressed-tensors rejects this quantization_config: {error}") from None
    if config.calibration == "gptq" and not context.pre_quantized:
        from qcore_compressed_tensors.calibration import gptq_solver

        gptq_solver()  # fails here, before any weight is read, when no GPTQ implementation is installed


@qcore.hookimpl
def preprocess_model(config: CompressedTensorsConfig, context: qcore.LoadContext, model: PreTrainedModel) -> None:
    import torch

    from qcore_compressed_tensors.layers import CompressedLinear, check_shape

    if not context.pre_quantized:
        # Before any weight is read: a Linear its group does not fit stays in full precision (or, strict, fails).
        for name in targeted(config, context, model):
            module = model.get_submodule(name)
            fallback = config.shape_fallback(name, module.out_features, module.in_features)
            if fallback is not None:
                context.report_fallback(name, fallback)
    if context.calibrating:
        return  # calibrate_block replaces the modules once their block's activations are known
    for name, scheme in targeted(config, context, model).items():
        module = model.get_submodule(name)
        check_shape(scheme, name, module.out_features, module.in_features)
        with torch.device("meta"):
            layer = CompressedLinear(
                module.in_features, module.out_features, module.bias is not None, context.dtype, scheme
            )
        model.set_submodule(name, layer)


def targeted(config: CompressedTensorsConfig, context: qcore.LoadContext, model: nn.Module) -> dict[str, dict]:
    """Owned module -> its group's scheme, for the modules compressed-tensors' ``apply_quantization_config`` would
    quantize (:func:`scheme_for`); the others (transformers' ``Conv1D``, untargeted Linears, and those the
    scheme does not fit: ``context.fallbacks``) stay full precision."""
    chosen = {
        name: scheme_for(config, name, model.get_submodule(name))
        for name in context.modules
        if name not in context.fallbacks
    }
    return {name: scheme for name, scheme in chosen.items() if scheme is not None}


def scheme_for(config: CompressedTensorsConfig, name: str, module: nn.Module) -> dict[str, Any] | None:
    """The scheme compressed-tensors gives ``module``: a Linear matched by a group's targets (exact name, then
    ``re:``, then class; a later group wins a target) and not by ``ignore``; ``None`` for any other module."""
    from compressed_tensors.utils.match import is_match, match_targets
    from torch import nn

    if not isinstance(module, nn.Linear) or is_match(name, module, config.ignore or []):
        return None
    by_target = {target: scheme for scheme in config.config_groups.values() for target in scheme["targets"]}
    matched = match_targets(name, module, list(by_target))
    return by_target[matched[0]] if matched else None


@qcore.hookimpl
def load_weight(
    config: CompressedTensorsConfig,
    context: qcore.LoadContext,
    model: PreTrainedModel,
    module_name: str,
    tensor_name: str,
    tensor: torch.Tensor,
) -> dict[str, Any] | None:
    from qcore_compressed_tensors.layers import CompressedLinear, compress, restore

    layer = model.get_submodule(module_name)
    if context.calibrating and tensor_name == "weight" and scheme_for(config, module_name, layer) is not None:
        raise qcore.ConfigError(
            f"compressed-tensors calibration 'gptq' quantizes the Linears of decoder blocks, and {module_name} lies "
            f"outside them; add it to 'ignore', or quantize without calibration"
        )
    if not isinstance(layer, CompressedLinear) or tensor_name == "bias":
        return None  # an untargeted module, or the bias: the core places it in the model dtype
    device = context.device_for(module_name)
    if context.pre_quantized:
        stored = context.gather(module_name, tensor_name, tensor)
        if stored is None:
            return {}
        stored = {name: value.to(device) for name, value in stored.items()}
    else:
        stored = compress(tensor.to(device=device, dtype=context.dtype), layer.scheme)
    info = context.checkpoint.tensors.get(f"{module_name}.weight") or context.checkpoint.tensors.get(
        f"{module_name}.weight_packed"
    )
    file = str(info.file) if info is not None else str(context.source)
    return {"weight": restore(stored, layer.scheme, layer.out_features, layer.in_features, module_name, file)}


@qcore.hookimpl
def calibrate_block(
    config: CompressedTensorsConfig,
    context: qcore.LoadContext,
    model: PreTrainedModel,
    block_name: str,
    block: nn.Module,
    inputs: BlockInputs,
) -> None:
    from qcore_compressed_tensors.calibration import quantize_block

    quantize_block(config, context, model, block_name, block, inputs)


@qcore.hookimpl
def postprocess(config: CompressedTensorsConfig, context: qcore.LoadContext, model: PreTrainedModel) -> None:
    from qcore_compressed_tensors.layers import CompressedLinear

    for name in context.modules:
        layer = model.get_submodule(name)
        if isinstance(layer, CompressedLinear) and layer.weight is None:
            raise qcore.CheckpointError(
                "never received its weight; the checkpoint is incomplete", file=str(context.source), tensor=name
            )


@qcore.hookimpl
def optimize_runtime(config: CompressedTensorsConfig, context: qcore.LoadContext, model: PreTrainedModel) -> None:
    from qcore.kernels import describe

    from qcore_compressed_tensors.layers import CompressedLinear

    weights = []
    for name in context.modules:
        layer = model.get_submodule(name)
        if not isinstance(layer, CompressedLinear):
            continue
        layer.select(layer.weight.device, context.dtype)
        if layer.weight.kernel == "scaled_mm" and not _kernel_quantizes_inputs_as_scheme(layer.scheme):
            layer.weight.select(layer.weight.device, context.dtype, kernel="dequantize")
        weights.append(layer.weight)
    if weights:
        context.report_kernel(describe(weights))


def _kernel_quantizes_inputs_as_scheme(scheme: dict[str, Any]) -> bool:
    """Whether ``_scaled_mm``'s own fp8 activations (per row with a per-row weight scale, per tensor with a
    per-tensor one) are the scheme's; weight-only fp8 keeps its activations in full precision, as vLLM does."""
    inputs, weights = scheme["input_activations"], scheme["weights"]
    if inputs is None:
        return False
    return (inputs["strategy"], weights["strategy"]) in (("token", "channel"), ("tensor", "tensor"))


@qcore.hookimpl
def dequantize_module(
    config: CompressedTensorsConfig, module_name: str, module: nn.Module, dtype: torch.dtype
) -> dict[str, torch.Tensor] | None:
    from qcore_compressed_tensors.layers import CompressedLinear

    if isinstance(module, CompressedLinear):
        weight = module.weight.dequantize(dtype)
    else:  # owned, but no group targets it (or a Conv1D): it was loaded as is
        weight = module.weight.detach().to(dtype)
    tensors = {"weight": weight}
    if module.bias is not None:
        tensors["bias"] = module.bias.detach().to(dtype)
    return tensors
