"""The qcore-gptq plugin: registration and the hooks for ``quant_method: gptq`` and ``quant_method: awq``.

    validate           AWQ only loads (no AWQ search here); a quantizing GPTQ load needs no library
    preprocess_model   pre-quantized: every stored tensor checked from the header, each quantized Linear -> an
                       empty GptqLinear; quantizing: a Linear group_size does not fit is reported as kept in full
                       precision (GptqConfig.shape_fallback), modules left as they are
    load_weight        a module's qweight/qzeros/scales/g_idx gathered, decoded into the kernel layer
    calibrate_block    GPTQ on each Linear of one decoder block, in execution order (gptq.py), but the fallbacks
    postprocess        every GptqLinear received its weight
    optimize_runtime   each weight's kernel selected for its device and dtype (qcore.kernels), and reported
    dequantize_module  the float weight back, in the model's feature order

update_device_map is not needed: the kernel layer runs on every device. This module is the entry point (``qcore``
group, name ``gptq``); importing it imports neither torch nor the model code; the hooks import them when they run.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import qcore
from qcore.linear import is_conv1d, linear_shape, plain_tensors

from qcore_gptq.config import AwqConfig, GptqConfig

if TYPE_CHECKING:
    import torch
    from qcore.calibration import BlockInputs
    from torch import nn
    from transformers import PreTrainedModel

    from qcore_gptq.formats import Layout

__all__ = [
    "register_backend", "validate", "preprocess_model", "load_weight", "calibrate_block", "postprocess",
    "optimize_runtime", "dequantize_module",
]  # fmt: skip

logger = logging.getLogger("qcore.gptq")


@qcore.hookimpl
def register_backend() -> qcore.Backend:
    # No `requires`: the packed weights run on qcore's kernel layer and GPTQ is implemented here.
    return qcore.Backend(
        name="gptq",
        configs={"gptq": GptqConfig, "awq": AwqConfig},
        presets=(
            qcore.Preset(
                "gptq-4bit",
                {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True},
                summary="GPTQ int4, groups of 128: ~4.3 bits/weight; calibrated error compensation, better than "
                "round-to-nearest at the same size; writes a standard GPTQ checkpoint (transformers, vLLM)",
                needs_calibration=True,
                fast_on=("cpu", "cuda"),
            ),
            qcore.Preset(
                "gptq-8bit",
                {"quant_method": "gptq", "bits": 8, "group_size": 128, "sym": True},
                summary="GPTQ int8, groups of 128: ~8.2 bits/weight; near full precision; calibrated",
                needs_calibration=True,
                fast_on=("cpu", "cuda"),
            ),
        ),
        notes=lambda: (
            "kernel: torch int4 (CPU _weight_int4pack_mm_for_cpu, CUDA tinygemm) for 2/3/4-bit groups of "
            "32..256; dequantize + matmul otherwise; no gptqmodel or autoawq needed"
        ),
    )


@qcore.hookimpl
def validate(config: GptqConfig | AwqConfig, context: qcore.LoadContext) -> None:
    if isinstance(config, AwqConfig) and not context.pre_quantized:
        raise qcore.ConfigError(
            "awq: qcore-gptq loads AWQ checkpoints but does not run AWQ's scale search; quantize with AutoAWQ, or "
            "use {'quant_method': 'gptq', ...} to quantize with GPTQ here"
        )


@qcore.hookimpl
def preprocess_model(config: GptqConfig | AwqConfig, context: qcore.LoadContext, model: PreTrainedModel) -> None:
    import torch

    from qcore_gptq.layers import GptqLinear, check_stored

    if context.calibrating:
        # Before any weight is read: a Linear the settings do not fit stays in full precision (or, strict, fails).
        for name in context.modules:
            out_features, in_features, _ = linear_shape(model.get_submodule(name))
            fallback = config.shape_fallback(name, out_features, in_features)
            if fallback is not None:
                context.report_fallback(name, fallback)
        return
    for name in context.modules:
        names = context.tensor_names(name)
        if "qweight" not in names:
            continue  # kept in full precision by whoever quantized the checkpoint: a plain weight
        source = model.get_submodule(name)
        infos = {tensor: _header(context, model, name, tensor) for tensor in names}
        layout = layout_for(config, source, has_zeros="qzeros" in names)
        check_stored(layout, name, infos, str(context.source))
        with torch.device("meta"):
            bias = torch.empty(layout.out_features, dtype=context.dtype) if "bias" in names else None
            layer = GptqLinear(layout, bias)
        layer.transposed = is_conv1d(source)
        model.set_submodule(name, layer)


@qcore.hookimpl
def load_weight(
    config: GptqConfig | AwqConfig,
    context: qcore.LoadContext,
    model: PreTrainedModel,
    module_name: str,
    tensor_name: str,
    tensor: torch.Tensor,
) -> dict[str, Any] | None:
    from qcore_gptq.layers import GptqLinear, restore

    layer = model.get_submodule(module_name)
    if not isinstance(layer, GptqLinear) or tensor_name == "bias":
        return None  # full-precision modules and biases: the core places them in the model dtype
    stored = context.gather(module_name, tensor_name, tensor)
    if stored is not None:
        restore(layer, module_name, stored, context.device_for(module_name), str(context.source))
    return {}


@qcore.hookimpl
def calibrate_block(
    config: GptqConfig,
    context: qcore.LoadContext,
    model: PreTrainedModel,
    block_name: str,
    block: nn.Module,
    inputs: BlockInputs,
) -> None:
    from qcore_gptq.gptq import quantize_layer, stage_hessians
    from qcore_gptq.layers import from_result

    started = time.perf_counter()
    names = [name[len(block_name) + 1 :] for name in context.block_modules(block_name) if name not in context.fallbacks]
    for name, hessian in stage_hessians(block, names, inputs, true_sequential=config.true_sequential):
        source = block.get_submodule(name)
        weight = source.weight.detach()
        weight = weight.T if is_conv1d(source) else weight
        layout = layout_for(config, source)
        decoded = quantize_layer(
            weight, hessian, bits=config.bits, group_size=layout.group_size, sym=config.sym,
            desc_act=config.desc_act, damp_percent=config.damp_percent,
            zero_at_least=1 if config.checkpoint_format == "gptq" and not config.sym else 0, overwrite_hessian=True,
        )  # fmt: skip
        del hessian
        layer = from_result(layout, decoded, source.bias, weight.device)
        layer.transposed = is_conv1d(source)
        block.set_submodule(name, layer)
        del source, weight
    logger.info(
        "gptq: %s: %d linear(s) quantized in %.1fs (%d calibration sequences)",
        block_name, len(names), time.perf_counter() - started, len(inputs),
    )  # fmt: skip


@qcore.hookimpl
def postprocess(config: GptqConfig | AwqConfig, context: qcore.LoadContext, model: PreTrainedModel) -> None:
    from qcore_gptq.layers import GptqLinear

    empty = [
        name
        for name in context.modules
        if isinstance(layer := model.get_submodule(name), GptqLinear) and layer.weight is None
    ]
    if empty:
        raise qcore.CheckpointError(
            f"{len(empty)} {config.quant_method} module(s) never received their tensors: {empty[:5]}; the "
            f"checkpoint is incomplete",
            file=str(context.source),
            tensor=f"{empty[0]}.qweight",
        )


@qcore.hookimpl
def optimize_runtime(config: GptqConfig | AwqConfig, context: qcore.LoadContext, model: PreTrainedModel) -> None:
    from qcore.kernels import describe

    from qcore_gptq.layers import GptqLinear

    weights = []
    for name in context.modules:
        layer = model.get_submodule(name)
        if isinstance(layer, GptqLinear):
            layer.select(context.device_for(name), context.dtype)
            weights.append(layer.weight)
    if weights:
        context.report_kernel(describe(weights))


@qcore.hookimpl
def dequantize_module(
    config: GptqConfig | AwqConfig, module_name: str, module: nn.Module, dtype: torch.dtype
) -> dict[str, torch.Tensor] | None:
    from qcore_gptq.layers import GptqLinear

    if not isinstance(module, GptqLinear):
        return None
    return plain_tensors(module.dequantized(dtype), module.bias, transposed=module.transposed, dtype=dtype)


# -- helpers --------------------------------------------------------------------------------------------------


def layout_for(config: GptqConfig | AwqConfig, module: nn.Module, has_zeros: bool = True) -> Layout:
    """The stored layout of ``module`` under ``config``."""
    from qcore_gptq.formats import Layout

    out_features, in_features, _ = linear_shape(module)
    group_size = in_features if config.group_size == -1 else config.group_size
    if isinstance(config, AwqConfig):
        return Layout(f"awq-{config.version}", 4, group_size, in_features, out_features, has_zeros or config.zero_point)
    return Layout(config.checkpoint_format, config.bits, group_size, in_features, out_features)


def _header(context: qcore.LoadContext, model: PreTrainedModel, module_name: str, tensor: str) -> tuple[Any, str]:
    """(shape, stored dtype) of one of a module's checkpoint tensors, from the header."""
    info = context.stored_info(module_name, tensor, getattr(model, "base_model_prefix", ""))
    return info.shape, info.dtype
