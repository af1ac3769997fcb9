"""bitsandbytes layers: the skeleton swap of phase 3 and the per-tensor conversion of phase 4.

Mirrors transformers' own bitsandbytes path (``integrations/bitsandbytes.py``: ``replace_with_bnb_linear``,
``Bnb4bitQuantize``, ``Bnb8bitQuantize``, ``Bnb4bitDeserialize``, ``Bnb8bitDeserialize``) step for step, so that a
model loaded here computes bit for bit what transformers' model computes and saves the same tensors.
"""

from __future__ import annotations

from typing import Any

import qcore

from qcore_bnb.config import BnbConfig
from qcore_bnb.environment import offloaded_prefixes

__all__ = [
    "replace_linears",
    "quantize_weight",
    "restore_weight",
    "is_bnb_layer",
    "save_as_loaded",
    "dequantized",
]


def replace_linears(config: BnbConfig, context: qcore.LoadContext, model: Any) -> None:
    """Swap each owned ``nn.Linear``/``Conv1D`` for a bitsandbytes layer on the meta device."""
    import torch
    from torch import nn
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.quantizers_utils import should_convert_module

    keep = offloaded_prefixes(config, context.device_map)
    for name in context.modules:
        module = model.get_submodule(name)
        # transformers converts exact nn.Linear only (not subclasses with their own forward), and Conv1D.
        if not (isinstance(module, Conv1D) or type(module) is nn.Linear) or not should_convert_module(name, keep):
            continue
        with torch.device("meta"):
            layer = _bnb_layer(config, module, context.pre_quantized, context.dtype)
        # Conv1D stores its weight transposed; load_weight transposes it back before quantizing.
        layer.source_cls = type(module)
        layer.requires_grad_(False)
        model.set_submodule(name, layer)


def _bnb_layer(config: BnbConfig, module: Any, pre_quantized: bool, dtype: Any) -> Any:
    import bitsandbytes as bnb
    import torch
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        in_features, out_features = module.weight.shape
    else:
        in_features, out_features = module.in_features, module.out_features
    has_bias = module.bias is not None
    if config.load_in_8bit:
        layer = bnb.nn.Linear8bitLt(
            in_features,
            out_features,
            has_bias,
            has_fp16_weights=config.llm_int8_has_fp16_weight,
            threshold=float(config.llm_int8_threshold),
        )
        # With 16-bit weights LLM.int8() stores them unquantized and quantizes them per call.
        stored_dtype = None if config.llm_int8_has_fp16_weight else torch.int8
    else:
        stored_dtype = getattr(torch, config.bnb_4bit_quant_storage)
        layer = bnb.nn.Linear4bit(
            in_features,
            out_features,
            has_bias,
            getattr(torch, config.compute_dtype),
            compress_statistics=config.bnb_4bit_use_double_quant,
            quant_type=config.bnb_4bit_quant_type,
            quant_storage=stored_dtype,
        )
        # Linear4bit takes no block size; Params4bit carries it into quantize_4bit.
        layer.weight.blocksize = config.bnb_4bit_blocksize
    if has_bias:
        # transformers builds these layers with the model dtype as torch's default, so the bias loads in that dtype.
        layer.bias.data = layer.bias.data.to(dtype)
    if pre_quantized and stored_dtype is not None:
        # As transformers does: the skeleton's weight has the stored dtype, so the core's placement and memory
        # estimates see the checkpoint's dtype rather than a float one.
        layer.weight.data = layer.weight.data.to(dtype=stored_dtype)
    return layer


def is_bnb_layer(module: Any) -> bool:
    import bitsandbytes as bnb

    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def quantize_weight(context: qcore.LoadContext, layer: Any, module_name: str, tensor: Any) -> Any:
    """A full-precision ``weight`` quantized on its target device: the new ``Params4bit`` or ``Int8Params``.

    The tensor is cast to the model dtype first, as transformers casts it; the full-precision copy is dropped by
    bitsandbytes as soon as the quantized data replaces it.
    """
    from transformers.pytorch_utils import Conv1D

    value = tensor.to(device=context.device_for(module_name), dtype=context.dtype)
    if issubclass(layer.source_cls, Conv1D):
        value = value.T
    return _quantized(layer, value)


def _quantized(layer: Any, value: Any) -> Any:
    import bitsandbytes as bnb

    if isinstance(layer, bnb.nn.Linear4bit):
        # The skeleton's Params4bit carries quant type, block size, storage and the module to attach the state to.
        return bnb.nn.Params4bit(value, requires_grad=False, **layer.weight.__dict__).to(value.device)
    settings = dict(layer.weight.__dict__)
    settings.pop("SCB", None)
    # Int8Params quantizes only when moved off a CPU tensor (to any device, the CPU included).
    return bnb.nn.Int8Params(value.to("cpu"), requires_grad=False, **settings).to(value.device)


def restore_weight(
    context: qcore.LoadContext, config: BnbConfig, layer: Any, module_name: str, stored: dict[str, Any]
) -> Any:
    """The layer's weight rebuilt from its stored tensors (``weight`` plus its statistics), on its device.

    Every stored tensor is checked against the module's shape and the config first (:mod:`qcore_bnb.stored`):
    bitsandbytes' kernels index the statistics by the sizes they claim, so none of them may reach it unchecked.
    """
    import bitsandbytes as bnb

    from qcore_bnb.stored import check_4bit, check_int8

    files = {name: _file_of(context, f"{module_name}.{name}") for name in stored}
    device = context.device_for(module_name)
    if isinstance(layer, bnb.nn.Linear4bit):
        if set(stored) == {"weight"} and stored["weight"].is_floating_point():
            raise _not_quantized(context, module_name, "weight.quant_state.bitsandbytes__<nf4|fp4>")
        checked = check_4bit(config, module_name, stored, layer.out_features, layer.in_features, files)
        stats = {k: v.to(device) if hasattr(v, "to") else v for k, v in checked["stats"].items()}
        weight = checked["weight"].to(device)
        return bnb.nn.Params4bit.from_prequantized(
            data=weight, quantized_stats=stats, requires_grad=False, device=weight.device, module=layer
        )
    fp16_weights = layer.state.has_fp16_weights
    if not fp16_weights and set(stored) == {"weight"} and stored["weight"].is_floating_point():
        raise _not_quantized(context, module_name, "SCB")
    checked = check_int8(module_name, stored, layer.out_features, layer.in_features, files, fp16_weights=fp16_weights)
    if fp16_weights:
        # Saved unquantized (bitsandbytes writes no SCB for 16-bit weights): load it as a full-precision weight.
        # It is already in Linear orientation. transformers cannot load these checkpoints (it casts the skeleton's
        # trainable weight to int8 and fails).
        return _quantized(layer, checked["weight"].to(device=device, dtype=context.dtype))
    weight = checked["weight"].to(device)
    settings = dict(layer.weight.__dict__)
    settings["SCB"] = checked["SCB"].to(device)
    return bnb.nn.Int8Params(weight, requires_grad=False, **settings).to(weight.device)


def _file_of(context: qcore.LoadContext, key: str) -> str:
    """The checkpoint file holding tensor ``key`` (the directory when the key was renamed on the way in)."""
    info = context.checkpoint.tensors.get(key)
    return str(info.file if info is not None else context.source)


def _not_quantized(context: qcore.LoadContext, module_name: str, missing: str) -> qcore.CheckpointError:
    return qcore.CheckpointError(
        f"module {module_name!r} is bitsandbytes-quantized by the checkpoint's config but has no {missing!r}: its "
        f"weight was saved in full precision; add the module to llm_int8_skip_modules in config.json",
        file=str(context.source),
        tensor=f"{module_name}.weight",
    )


def save_as_loaded(layer: Any) -> None:
    """Make a 4-bit layer save the tensors it was loaded with, also after bitsandbytes repacked it for the CPU.

    bitsandbytes (0.48 and later) repacks a 4-bit layer for its AVX512-BF16 CPU kernel at the first inference
    forward, turning ``absmax`` into bfloat16 blocks, and its ``_save_to_state_dict`` undoes that only in part: without
    double quantization it writes the repacked ``absmax`` (a checkpoint no loader accepts), with it it re-quantizes
    ``absmax`` (other bytes than were loaded), and either way it leaves the layer changed. The layer saves instead
    the statistics it was loaded with, kept here, and its weight unpacked on a copy, so a model saved after
    ``generate`` reloads into exactly the model that was saved.
    """
    import types

    if not getattr(layer, "support_avx512bf16_for_cpu", False) or layer.weight.device.type != "cpu":
        return  # this bitsandbytes or this CPU never repacks
    layer.qcore_loaded_stats = {
        key: value.detach().clone() for key, value in layer.weight.quant_state.as_dict(packed=True).items()
    }
    layer._save_to_state_dict = types.MethodType(_save_as_loaded, layer)


def _save_as_loaded(layer: Any, destination: dict, prefix: str, keep_vars: bool) -> None:
    import copy

    import bitsandbytes as bnb
    from torch import nn

    state = layer.weight.quant_state
    if not getattr(state, "packing_format_for_cpu", False):
        bnb.nn.Linear4bit._save_to_state_dict(layer, destination, prefix, keep_vars)
        return
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    nn.Module._save_to_state_dict(layer, destination, prefix, keep_vars)  # the bias; the weight is replaced below
    weight, _ = _convert_weight_packed_for_cpu_inverse(layer.weight.data, copy.copy(state))
    destination[prefix + "weight"] = weight
    for key, value in layer.qcore_loaded_stats.items():
        destination[prefix + "weight." + key] = value


def dequantized(layer: Any, dtype: Any) -> dict[str, Any]:
    """The plain ``weight`` (``[out, in]``, or ``[in, out]`` for a ``Conv1D``) and ``bias`` a bnb layer computes with.

    bitsandbytes' own functions decode it: ``dequantize_4bit`` with the layer's ``quant_state`` (nf4/fp4, double
    quantization included), ``int8_vectorwise_dequant`` of the int8 rows with their ``SCB`` for LLM.int8(). A 4-bit
    layer repacked for the AVX512-BF16 CPU kernel has its bytes unpacked on a copy and decodes with the bfloat16
    block scales that kernel computes with. New tensors in ``dtype``, on the layer's device; the layer is unchanged.
    """
    import copy

    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    from transformers.pytorch_utils import Conv1D

    data = layer.weight.data
    if isinstance(layer, bnb.nn.Linear4bit):
        state = layer.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            unpacking = copy.copy(state)
            unpacking.original_nested = False  # the inverse would re-quantize absmax, which the kernel does not use
            data, _ = F._convert_weight_packed_for_cpu_inverse(data, unpacking)
            state = F.QuantState(
                absmax=state.absmax.T.reshape(-1).float(),
                shape=state.shape,
                code=state.code,
                blocksize=state.blocksize,
                quant_type=state.quant_type,
                dtype=state.original_dtype,
            )
        weight = F.dequantize_4bit(data, state)
    elif layer.state.has_fp16_weights:
        weight = data.clone()
    else:
        # SCB sits on the weight until the first forward moves it to the layer's matmul state.
        scb = layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB
        weight = F.int8_vectorwise_dequant(data, scb)
    weight = weight.to(dtype)
    tensors = {"weight": weight.T.contiguous() if issubclass(layer.source_cls, Conv1D) else weight}
    if layer.bias is not None:
        tensors["bias"] = layer.bias.detach().to(dtype=dtype, copy=True)
    return tensors
