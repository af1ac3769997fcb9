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

__all__ = ["replace_linears", "quantize_weight", "restore_weight", "is_bnb_layer"]


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


def restore_weight(context: qcore.LoadContext, layer: Any, module_name: str, stored: dict[str, Any]) -> Any:
    """The layer's weight rebuilt from its stored tensors (``weight`` plus its statistics), on its device."""
    import bitsandbytes as bnb

    if isinstance(layer, bnb.nn.Linear8bitLt) and layer.state.has_fp16_weights:
        # Saved unquantized (bitsandbytes writes no SCB for 16-bit weights): load it as a full-precision weight.
        # It is already in Linear orientation. transformers cannot load these checkpoints (it casts the skeleton's
        # trainable weight to int8 and fails).
        return _quantized(layer, stored["weight"].to(device=context.device_for(module_name), dtype=context.dtype))
    device = context.device_for(module_name)
    stored = {name: tensor.to(device) for name, tensor in stored.items()}
    weight = stored.pop("weight")
    if isinstance(layer, bnb.nn.Linear4bit):
        if not any(name.startswith("weight.quant_state.") for name in stored):
            raise _not_quantized(context, module_name, "weight.quant_state.bitsandbytes__<nf4|fp4>")
        return bnb.nn.Params4bit.from_prequantized(
            data=weight, quantized_stats=stored, requires_grad=False, device=weight.device, module=layer
        )
    weight_format = stored.get("weight_format")
    if weight_format is not None and int(weight_format) != 0:
        raise qcore.CheckpointError(
            f"weight_format {int(weight_format)} is a GPU-specific int8 layout bitsandbytes no longer reads; "
            f"re-save the model with bitsandbytes >= 0.45 (row-major, weight_format 0)",
            file=str(context.source),
            tensor=f"{module_name}.weight_format",
        )
    if "SCB" not in stored:
        raise _not_quantized(context, module_name, "SCB")
    settings = dict(layer.weight.__dict__)
    settings["SCB"] = stored["SCB"]
    return bnb.nn.Int8Params(weight, requires_grad=False, **settings).to(weight.device)


def _not_quantized(context: qcore.LoadContext, module_name: str, missing: str) -> qcore.CheckpointError:
    return qcore.CheckpointError(
        f"module {module_name!r} is bitsandbytes-quantized by the checkpoint's config but has no {missing!r}: its "
        f"weight was saved in full precision; add the module to llm_int8_skip_modules in config.json",
        file=str(context.source),
        tensor=f"{module_name}.weight",
    )
