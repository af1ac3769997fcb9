"""The qcore-fp8 plugin: registration and the hooks for ``quant_method: fp8``.

    validate           torch has float8; the config's fields are ones qcore-fp8 serves
    preprocess_model   each owned Linear -> an empty Fp8Linear on meta; pre-quantized: every stored tensor checked
                       from the header first (dtype, shape against the blocks)
    load_weight        on the fly: the weight quantized exactly as transformers' FP8 quantizer does; pre-quantized:
                       weight, weight_scale_inv (and activation_scale) gathered and checked
    postprocess        every Fp8Linear received its weight
    optimize_runtime   each weight's kernel chosen by qcore.kernels for its device and dtype, and reported
    dequantize_module  the float weight back (``qcore convert``, ``qcore.dequantize``)

With ``dequantize: true`` a pre-quantized checkpoint loads as full-precision Linears (the weights are dequantized
as they stream in, as transformers does on a machine without FP8 matmul). Importing this module imports no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import qcore

from qcore_fp8.config import Fp8Config
from qcore_fp8.environment import kernel_note, unavailable_reason

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PreTrainedModel

__all__ = [
    "register_backend", "validate", "preprocess_model", "load_weight", "postprocess", "optimize_runtime",
    "dequantize_module",
]  # fmt: skip


@qcore.hookimpl
def register_backend() -> qcore.Backend:
    return qcore.Backend(
        name="fp8",
        configs={"fp8": Fp8Config},
        presets=(
            qcore.Preset(
                "fp8-block128",
                {"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "dynamic"},
                summary="float8 e4m3, one scale per 128x128 block: ~8 bits/weight, the DeepSeek-V3 / Qwen3-FP8 "
                "format; near full precision; fast on FP8 GPUs (sm89+), dequantized per forward elsewhere",
                fast_on=("cuda",),
            ),
            qcore.Preset(
                "fp8-tensor",
                {"quant_method": "fp8", "weight_block_size": None, "activation_scheme": "dynamic"},
                summary="float8 e4m3, one scale per tensor: ~8 bits/weight; torch._scaled_mm on FP8 GPUs",
                fast_on=("cuda",),
            ),
        ),
        check=unavailable_reason,
        notes=kernel_note,
    )


@qcore.hookimpl
def validate(config: Fp8Config, context: qcore.LoadContext) -> None:
    reason = unavailable_reason()
    if reason is not None:
        raise qcore.BackendUnavailable(f"fp8: {reason}")


@qcore.hookimpl
def preprocess_model(config: Fp8Config, context: qcore.LoadContext, model: PreTrainedModel) -> None:
    import torch
    from qcore.linear import linear_shape

    from qcore_fp8.layers import Fp8Linear, check_stored

    for name in context.modules:
        source = model.get_submodule(name)
        names = context.tensor_names(name)
        prefix = getattr(model, "base_model_prefix", "")
        if context.pre_quantized and "weight_scale_inv" not in names:
            if context.stored_info(name, "weight", prefix).dtype.startswith("F8_"):
                raise qcore.CheckpointError(
                    "the fp8 weight has no weight_scale_inv beside it; the checkpoint is corrupt or not in "
                    "transformers' FP8 format", file=str(context.source), tensor=f"{name}.weight_scale_inv",
                )  # fmt: skip
            continue  # kept in full precision by whoever quantized the checkpoint
        if context.pre_quantized and config.dequantize:
            continue  # a plain Linear, its weight dequantized as it arrives
        out_features, in_features, transposed = linear_shape(source)
        with torch.device("meta"):
            layer = Fp8Linear(
                in_features, out_features, source.bias is not None, config.block,
                config.activation_scheme == "static", context.dtype,
            )  # fmt: skip
        layer.transposed = transposed
        if context.pre_quantized:
            infos = {tensor: context.stored_info(name, tensor, prefix) for tensor in names}
            check_stored(layer, name, infos, str(context.source), config.scale_fmt)
        model.set_submodule(name, layer)


@qcore.hookimpl
def load_weight(
    config: Fp8Config, context: qcore.LoadContext, model: PreTrainedModel, module_name: str, tensor_name: str,
    tensor: torch.Tensor,
) -> dict[str, Any] | None:  # fmt: skip
    from qcore_fp8.layers import Fp8Linear, quantize, restore

    layer = model.get_submodule(module_name)
    device = context.device_for(module_name)
    if not isinstance(layer, Fp8Linear):
        if context.pre_quantized and config.dequantize and tensor_name == "activation_scale":
            return {}  # weight-only once dequantized: the static activation scale has no use
        if context.pre_quantized and config.dequantize and tensor_name in ("weight", "weight_scale_inv"):
            return _dequantize_on_arrival(config, context, model, module_name, tensor_name, tensor, device)
        return None
    if tensor_name == "bias":
        return None
    if not context.pre_quantized:
        weight = tensor.to(device)
        weight = weight.T if layer.transposed else weight
        codes, inverse = quantize(weight, config.block, config.scale_fmt)
        return {"weight": codes, "weight_scale_inv": inverse}
    stored = context.gather(module_name, tensor_name, tensor)
    if stored is None:
        return {}
    return restore(layer, module_name, stored, device, str(context.source))


@qcore.hookimpl
def postprocess(config: Fp8Config, context: qcore.LoadContext, model: PreTrainedModel) -> None:
    from qcore_fp8.layers import Fp8Linear

    empty = [
        name for name in context.modules
        if isinstance(layer := model.get_submodule(name), Fp8Linear) and layer.weight.device.type == "meta"
    ]  # fmt: skip
    if empty:
        raise qcore.CheckpointError(
            f"{len(empty)} fp8 module(s) never received their weight: {empty[:5]}; the checkpoint is incomplete",
            file=str(context.source), tensor=f"{empty[0]}.weight",
        )  # fmt: skip


@qcore.hookimpl
def optimize_runtime(config: Fp8Config, context: qcore.LoadContext, model: PreTrainedModel) -> None:
    from qcore.kernels import describe

    from qcore_fp8.layers import Fp8Linear

    weights = []
    for name in context.modules:
        layer = model.get_submodule(name)
        if isinstance(layer, Fp8Linear):
            weight = layer.attach()
            weight.select(context.device_for(name), context.dtype)
            weights.append(weight)
    if weights:
        context.report_kernel(describe(weights))


@qcore.hookimpl
def dequantize_module(
    config: Fp8Config, module_name: str, module: nn.Module, dtype: torch.dtype
) -> dict[str, torch.Tensor] | None:
    from qcore_fp8.layers import Fp8Linear

    if not isinstance(module, Fp8Linear):
        return None
    from qcore.linear import plain_tensors

    return plain_tensors(module.dequantized(dtype), module.bias, transposed=module.transposed, dtype=dtype)


# -- helpers --------------------------------------------------------------------------------------------------


def _dequantize_on_arrival(config, context, model, module_name, tensor_name, tensor, device):
    """``dequantize: true``: the plain Linear gets ``codes * scale`` once both tensors of it have arrived."""
    from qcore.kernels import Fp8Weight
    from qcore.linear import is_conv1d

    stored = context.gather(module_name, tensor_name, tensor, exclude=("bias", "activation_scale"))
    if stored is None:
        return {}
    import torch

    codes, scale = stored["weight"], stored["weight_scale_inv"].to(torch.float32)
    block = config.block if scale.dim() == 2 else None
    weight = Fp8Weight.from_codes(codes, scale, block).dequantize(context.dtype).to(device)
    module = model.get_submodule(module_name)
    return {"weight": weight.T.contiguous() if is_conv1d(module) else weight}
