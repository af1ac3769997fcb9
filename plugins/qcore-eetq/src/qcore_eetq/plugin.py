"""The qcore-eetq plugin: registration and the phase hooks for ``quant_method: eetq``.

    validate          log what runs here (eetq package or not, CUDA or not) and the kernel each device gets
    preprocess_model  each owned Linear/Conv1D -> an empty EetqLinear on meta
    load_weight       quantize the streamed weight on its device, or rebuild the saved int8 rows and scales
    optimize_runtime  pick each module's kernel (eetq GEMM, else qcore.kernels' choice) and report it
    dequantize_module int8 rows times scales back as the plain weight, for qcore.dequantize and qcore convert

update_device_map and postprocess are not needed: every device can run some kernel, and nothing is deferred.

This module is the entry point (``qcore`` group, name ``eetq``): importing it imports neither torch nor eetq; the
hooks import them when they run.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import qcore

from qcore_eetq.config import EetqConfig

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

__all__ = [
    "register_backend",
    "validate",
    "preprocess_model",
    "load_weight",
    "optimize_runtime",
    "dequantize_module",
]

logger = logging.getLogger("qcore.eetq")


@qcore.hookimpl
def register_backend() -> qcore.Backend:
    # No `requires`: without the eetq package (which has no wheel and needs a CUDA build) torch's own int8 kernel
    # runs, so the backend is available wherever torch is.
    return qcore.Backend(
        name="eetq",
        configs={"eetq": EetqConfig},
        presets=(
            qcore.Preset(
                "eetq-int8",
                {"quant_method": "eetq", "weights": "int8"},
                summary="int8 weights, one fp16 scale per output channel: ~8 bits/weight, half of bf16; "
                "near-lossless, no calibration; decodes faster than bf16 on CPU, and on CUDA with the eetq package",
                trainable=False,
                fast_on=("cuda", "cpu"),
            ),
        ),
        notes=kernel_notes,
    )


def kernel_notes() -> str:
    """Which kernels will run, for ``qcore backends``; looks the eetq package up without importing it (or torch)."""
    import importlib.util

    if importlib.util.find_spec("eetq") is not None:
        return "kernel: eetq w8_a16_gemm on CUDA in float16; qcore.kernels int8 elsewhere"
    return (
        "kernel: qcore.kernels int8 (eetq package not installed): torch's int4 kernel on two 4-bit halves on CPU "
        "bfloat16, torch._weight_int8pack_mm on CUDA, dequantize + matmul for CPU float16/float32"
    )


@qcore.hookimpl
def validate(config: EetqConfig, context: qcore.LoadContext) -> None:
    import torch

    from qcore_eetq.environment import describe

    # context.device_map holds only the devices the caller named ({} for "auto" and the other strategies, resolved
    # later): describe those, or every device the model could be placed on.
    available = {"cpu", "cuda"} if torch.cuda.is_available() else {"cpu"}
    named = {context.device_for(prefix).type for prefix in context.device_map}
    unavailable = sorted(named - available)
    if unavailable:
        raise qcore.BackendUnavailable(
            f"eetq: device_map {context.device_map} asks for {', '.join(unavailable)}, which torch cannot use here; "
            f"place the model on {' or '.join(sorted(available))}"
        )
    logger.info("eetq: %s", describe(named or available, context.dtype))


@qcore.hookimpl
def preprocess_model(config: EetqConfig, context: qcore.LoadContext, model: PreTrainedModel) -> None:
    import torch

    from qcore_eetq.linear import EetqLinear

    for name in context.modules:
        with torch.device("meta"):
            layer = EetqLinear.replacing(model.get_submodule(name), context.dtype)
        model.set_submodule(name, layer)


@qcore.hookimpl
def load_weight(
    config: EetqConfig,
    context: qcore.LoadContext,
    model: PreTrainedModel,
    module_name: str,
    tensor_name: str,
    tensor: torch.Tensor,
) -> dict[str, Any] | None:
    from qcore_eetq.linear import EetqLinear, quantize_weight, restore

    layer = model.get_submodule(module_name)
    if not isinstance(layer, EetqLinear) or tensor_name == "bias":
        return None  # the core places the bias in the model dtype
    device = context.device_for(module_name)
    if context.pre_quantized:
        stored = context.gather(module_name, tensor_name, tensor)
        return {} if stored is None else restore(layer, module_name, stored, device, str(context.source))
    if tensor_name != "weight":
        return None
    return quantize_weight(layer, module_name, tensor, context.dtype, device, str(context.source))


@qcore.hookimpl
def optimize_runtime(config: EetqConfig, context: qcore.LoadContext, model: PreTrainedModel) -> None:
    from qcore_eetq.environment import choose_kernel, summarize
    from qcore_eetq.linear import EetqLinear

    choices = []
    for name in context.modules:
        layer = model.get_submodule(name)
        if isinstance(layer, EetqLinear):
            choice = choose_kernel(layer.weight.device, context.dtype, layer.in_features, layer.out_features)
            choices.append(layer.use_kernel(choice, context.dtype))
    if choices:
        context.report_kernel(summarize(choices))


@qcore.hookimpl
def dequantize_module(
    config: EetqConfig, module_name: str, module: torch.nn.Module, dtype: torch.dtype
) -> dict[str, torch.Tensor] | None:
    from qcore_eetq.linear import EetqLinear, dequantized

    return dequantized(module, dtype) if isinstance(module, EetqLinear) else None
