"""The qcore-bnb plugin: registration and the six phases for ``quant_method: bitsandbytes``.

This is the module the ``qcore`` entry point names. Importing it imports neither torch nor bitsandbytes; each
phase imports what it needs when called. The phases run in the order qcore runs them::

    validate -> update_device_map -> preprocess_model -> load_weight (per tensor) -> postprocess -> optimize_runtime

``dequantize_module``, the inverse of ``load_weight``, gives ``qcore.dequantize`` and ``qcore convert`` the plain
weight of each bnb layer.
"""

from __future__ import annotations

from typing import Any

import qcore

from qcore_bnb.config import BnbConfig
from qcore_bnb.environment import REQUIREMENT

__all__ = [
    "PRESETS",
    "register_backend",
    "validate",
    "update_device_map",
    "preprocess_model",
    "load_weight",
    "postprocess",
    "optimize_runtime",
    "dequantize_module",
]

_NF4 = {
    "quant_method": "bitsandbytes",
    "load_in_4bit": True,
    "bnb_4bit_quant_type": "nf4",
    "bnb_4bit_compute_dtype": "bfloat16",
}

PRESETS = (
    qcore.Preset(
        "bnb-nf4",
        _NF4,
        summary="4-bit NormalFloat (QLoRA), ~4.5 bits/weight; the best bnb 4-bit quality, fast on CUDA only; computes "
        "in bfloat16 (bnb_4bit_compute_dtype), also for a float32 model, where transformers' default is float32",
        trainable=True,
        fast_on=("cuda",),
    ),
    qcore.Preset(
        "bnb-nf4-dq",
        {**_NF4, "bnb_4bit_use_double_quant": True},
        summary="nf4 with 8-bit block scales, ~4.1 bits/weight; smallest bnb format, slightly slower dequantization",
        trainable=True,
        fast_on=("cuda",),
    ),
    qcore.Preset(
        "bnb-fp4",
        {**_NF4, "bnb_4bit_quant_type": "fp4"},
        summary="4-bit float, ~4.5 bits/weight; same size and speed as nf4, usually a little less accurate",
        trainable=True,
        fast_on=("cuda",),
    ),
    qcore.Preset(
        "bnb-int8",
        {"quant_method": "bitsandbytes", "load_in_8bit": True},
        summary="LLM.int8(), 8 bits/weight with fp16 outlier columns; near-lossless, half of 4-bit's savings",
        trainable=True,
        fast_on=("cuda",),
    ),
)


@qcore.hookimpl
def register_backend() -> qcore.Backend:
    return qcore.Backend(name="bnb", configs={"bitsandbytes": BnbConfig}, presets=PRESETS, requires=(REQUIREMENT,))


@qcore.hookimpl
def validate(config: BnbConfig, context: qcore.LoadContext) -> None:
    from qcore_bnb.environment import check_devices, import_bitsandbytes

    # Only the devices the caller named ({} for "auto" and the other strategies): the resolved map is checked again
    # in update_device_map, still before any weight is read.
    check_devices(import_bitsandbytes(), context.device_map)


@qcore.hookimpl
def update_device_map(config: BnbConfig, context: qcore.LoadContext, device_map: dict[str, Any]) -> None:
    from qcore_bnb.environment import check_devices, check_offload, import_bitsandbytes

    # The final map is known only now ("auto" resolved), and still no weight has been read.
    check_devices(import_bitsandbytes(), device_map)
    check_offload(config, device_map)


@qcore.hookimpl
def preprocess_model(config: BnbConfig, context: qcore.LoadContext, model: Any) -> None:
    from qcore_bnb.layers import replace_linears

    replace_linears(config, context, model)


@qcore.hookimpl
def load_weight(
    config: BnbConfig,
    context: qcore.LoadContext,
    model: Any,
    module_name: str,
    tensor_name: str,
    tensor: Any,
) -> dict[str, Any] | None:
    from qcore_bnb.layers import is_bnb_layer, quantize_weight, restore_weight

    layer = model.get_submodule(module_name)
    # The bias, and every tensor of a module left unquantized (fp32 CPU offload), are placed by the core as is.
    if tensor_name == "bias" or not is_bnb_layer(layer):
        return None
    if not context.pre_quantized:
        return {"weight": quantize_weight(context, layer, module_name, tensor)}
    stored = context.gather(module_name, tensor_name, tensor)
    if stored is None:
        return {}
    return {"weight": restore_weight(context, config, layer, module_name, stored)}


@qcore.hookimpl
def postprocess(config: BnbConfig, context: qcore.LoadContext, model: Any) -> None:
    # The flags transformers' bnb quantizers set; PEFT's prepare_model_for_kbit_training and LoRA dispatch read them.
    if config.load_in_8bit:
        model.is_loaded_in_8bit = True
    else:
        model.is_loaded_in_4bit = True


@qcore.hookimpl
def optimize_runtime(config: BnbConfig, context: qcore.LoadContext, model: Any) -> None:
    from qcore_bnb.environment import kernel_name
    from qcore_bnb.layers import is_bnb_layer, save_as_loaded

    quantized = [name for name in context.modules if is_bnb_layer(model.get_submodule(name))]
    if not config.load_in_8bit:
        for name in quantized:
            save_as_loaded(model.get_submodule(name))
    context.report_kernel(kernel_name(config, {context.device_for(name).type for name in quantized}))


@qcore.hookimpl
def dequantize_module(config: BnbConfig, module_name: str, module: Any, dtype: Any) -> dict[str, Any] | None:
    from qcore_bnb.layers import dequantized, is_bnb_layer

    return dequantized(module, dtype) if is_bnb_layer(module) else None
