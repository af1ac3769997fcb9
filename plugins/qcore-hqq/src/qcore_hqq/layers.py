"""The torch side of phases 3 to 5: ``HQQLinear`` skeletons, quantizing weights as they stream in, restoring saved ones.

Phase 3 (``preprocess_model``) swaps each owned ``nn.Linear``/``Conv1D`` for an empty ``HQQLinear`` that holds no
tensor; phase 4 (``load_weight``) fills it, either by quantizing the full-precision weight with hqq on the target
device or, for a pre-quantized checkpoint, by handing hqq's own ``load_state_dict`` the tensors its ``state_dict``
wrote, decoded and checked by :mod:`qcore_hqq.stored` first; phase 5 (``postprocess``) checks that every skeleton
was filled. The resulting modules are plain ``hqq.core.quantize.HQQLinear`` objects, so PEFT, transformers and
hqq's own tools recognise them.

Imported only from inside the hooks: it imports torch and hqq.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import qcore
import torch
from hqq.core.quantize import HQQLinear
from torch import nn
from transformers.pytorch_utils import Conv1D

from qcore_hqq.config import check_module_shape, resolved_group_size
from qcore_hqq.stored import decode

__all__ = [
    "make_skeleton",
    "quantize_weight",
    "place_bias",
    "restore",
    "unfilled",
    "dequantized",
    "STORED_KEYS",
]

#: Every tensor ``HQQLinear.state_dict`` writes besides ``bias``: the stored form of one quantized module.
STORED_KEYS = frozenset(HQQLinear(None, None, device="cpu", initialize=False).state_dict_keys() - {"bias"})


def make_skeleton(
    module_name: str,
    source: nn.Module,
    quant_config: Mapping[str, Any] | None,
    compute_dtype: torch.dtype,
    device: torch.device,
) -> HQQLinear:
    """An ``HQQLinear`` with no tensors yet, standing in for ``source`` until its weight arrives.

    ``quant_config`` is hqq's dict (:meth:`HqqConfig.quant_config_for`) for a layer to quantize, or ``None`` for
    one to restore (its stored tensors carry the config). A ``group_size`` of ``None`` is resolved here from the
    module's shape, as ``HQQLinear`` does when it quantizes a layer itself, so the saved config records the group
    size actually used.
    """
    out_features, in_features = _shape(source)
    config = None
    if quant_config is not None:
        config = {**quant_config, "weight_quant_params": dict(quant_config["weight_quant_params"])}
        params = config["weight_quant_params"]
        check_module_shape(params, module_name, out_features, in_features)
        params["group_size"] = resolved_group_size(params, out_features, in_features)
    layer = HQQLinear(None, config, compute_dtype=compute_dtype, device=device, initialize=False)
    layer.in_features, layer.out_features = in_features, out_features
    # transformers' own HQQ integration records the replaced class the same way: Conv1D stores its weight transposed.
    layer.source_cls = type(source)
    return layer


def quantize_weight(layer: HQQLinear, weight: torch.Tensor, dtype: torch.dtype) -> None:
    """Quantize a full-precision checkpoint weight into ``layer``, on the layer's device.

    The weight is cast to the load's dtype first, as transformers casts it before quantizing, so the result equals
    ``HQQLinear(linear, ...)`` built from the same model loaded in that dtype.
    """
    weight = weight.to(device=layer.device, dtype=dtype)
    if issubclass(layer.source_cls, Conv1D):
        weight = weight.t().contiguous()
    if tuple(weight.shape) != (layer.out_features, layer.in_features):
        raise qcore.CheckpointError(
            f"weight of shape {tuple(weight.shape)} does not fit the model's {layer.out_features}x{layer.in_features} "
            f"layer; the checkpoint does not match config.json"
        )
    _map_large_allocations()
    with torch.no_grad():
        layer.quantize(weight, **layer.quant_config)


def place_bias(layer: HQQLinear, bias: torch.Tensor, dtype: torch.dtype) -> None:
    """Give ``layer`` its bias as a frozen parameter in the compute dtype (as transformers does for HQQ)."""
    # Set through nn.Module.__setattr__ rather than returned to the core: HQQLinear keeps ``bias`` as a plain
    # attribute, which would shadow a parameter written into ``_parameters`` directly.
    layer.bias = nn.Parameter(bias.to(device=layer.device, dtype=dtype), requires_grad=False)


def restore(
    layer: HQQLinear,
    module_name: str,
    stored: Mapping[str, torch.Tensor],
    *,
    file: str | None,
    expected: Mapping[str, Any] | None = None,
) -> None:
    """Rebuild a quantized layer from the tensors ``HQQLinear.state_dict`` saved, without re-quantizing.

    The tensors are decoded and checked by :func:`qcore_hqq.stored.decode` first (``expected`` and ``file`` as
    there), so hqq receives plain values only and never decodes, or evaluates, anything from the file.
    """
    plain = decode(module_name, stored, layer.out_features, layer.in_features, file=file, expected=expected)
    # hqq's loader moves everything to layer.device and casts scales and zeros to the compute dtype; it consumes
    # the dict it is given.
    layer.load_state_dict(plain)
    if layer.bias is not None:
        layer.bias = nn.Parameter(layer.bias, requires_grad=False)


def unfilled(model: nn.Module, module_names: tuple[str, ...]) -> list[str]:
    """The skeletons among ``module_names`` that never received their weight."""
    return [
        name
        for name in module_names
        if isinstance(layer := model.get_submodule(name), HQQLinear) and not layer.is_initialized()
    ]


def dequantized(layer: HQQLinear, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The plain ``weight`` (``[out, in]``, or ``[in, out]`` for a ``Conv1D``) and ``bias`` ``layer`` computes with.

    A layer running a :mod:`qcore.kernels` kernel (:mod:`qcore_hqq.kernels`) gives that kernel weight's exact
    dequantization, which the kernel's error bound is stated against; any other gives hqq's own
    ``HQQLinear.dequantize()``, the weight its forward multiplies by. New tensors in ``dtype``, on the layer's device;
    the layer is unchanged.
    """
    with torch.no_grad():
        kernel_weight = getattr(layer, "qcore_weight", None)
        weight = kernel_weight.dequantize(dtype) if kernel_weight is not None else layer.dequantize().to(dtype)
    tensors = {"weight": weight.t().contiguous() if issubclass(layer.source_cls, Conv1D) else weight}
    if layer.bias is not None:
        tensors["bias"] = layer.bias.detach().to(dtype=dtype, copy=True)
    return tensors


def _map_large_allocations() -> None:
    """hqq's optimizer makes about ten float32 temporaries of each weight it quantizes; glibc would keep them in its
    heap (measured on the 336M benchmark model: the load peaked 905 MiB above its baseline for a ~280 MiB model, and
    4 blocks of it kept 313 MiB after quantizing 24 MiB of weights; with the fixed threshold 34 MiB)."""
    from qcore.memory import map_large_allocations

    map_large_allocations()


def _shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of an ``nn.Linear`` or a transformers ``Conv1D`` (whose weight is transposed)."""
    if isinstance(module, Conv1D):
        in_features, out_features = module.weight.shape
        return out_features, in_features
    return module.out_features, module.in_features
