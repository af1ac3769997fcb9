"""``"calibration": "gptq"``: GPTQ scales and codes in compressed-tensors' format (phase 4 with calibration).

The GPTQ algorithm is qcore-gptq's (:func:`qcore_gptq.gptq.quantize_layer`, with its Hessian collector and its
grouping of a block's Linears by shared input); this module only runs it on one decoder block and turns each
result into a :class:`~qcore_compressed_tensors.layers.CompressedLinear`. GPTQ's grid is compressed-tensors' own
for symmetric and asymmetric int4/int8 (``scale = 2 max|w| / (2^b - 1)`` symmetric, ``(max - min) / (2^b - 1)``
asymmetric, codes ``-2^(b-1) .. 2^(b-1) - 1``), with scales rounded to float16 as GPTQ makes them; they are stored as
float32, which holds them exactly, so every reader dequantizes the weights GPTQ chose. Groups stay contiguous (no
``g_idx``, which compressed-tensors' ``actorder: "weight"`` also never writes). Dampening is 1% of the mean Hessian
diagonal, llm-compressor's ``GPTQModifier`` default.
"""

from __future__ import annotations

import logging
from types import ModuleType
from typing import TYPE_CHECKING

import qcore

if TYPE_CHECKING:
    from qcore.calibration import BlockInputs
    from torch import nn
    from transformers import PreTrainedModel

    from qcore_compressed_tensors.config import CompressedTensorsConfig

__all__ = ["gptq_solver", "quantize_block", "DAMPENING"]

logger = logging.getLogger("qcore.compressed_tensors")

#: Fraction of the mean Hessian diagonal added to it (llm-compressor's ``dampening_frac`` default).
DAMPENING = 0.01


def gptq_solver() -> ModuleType:
    """qcore-gptq's GPTQ module, or :class:`qcore.BackendUnavailable` naming the install."""
    try:
        from qcore_gptq import gptq
    except ImportError as error:
        raise qcore.BackendUnavailable(
            f"compressed-tensors calibration 'gptq' runs qcore-gptq's GPTQ, which does not import ({error}): "
            f"pip install 'qcore-compressed-tensors[gptq]' (or qcore-gptq), or leave 'calibration' unset for "
            f"round-to-nearest"
        ) from None
    return gptq


def quantize_block(
    config: CompressedTensorsConfig,
    context: qcore.LoadContext,
    model: PreTrainedModel,
    block_name: str,
    block: nn.Module,
    inputs: BlockInputs,
) -> None:
    """GPTQ every module of ``block`` this backend owns and a config group targets, in execution order (each stage
    of Linears sharing an input on the inputs the already quantized stages produce); the rest stay as they are."""
    import torch

    from qcore_compressed_tensors.layers import CompressedLinear, weight_from_codes
    from qcore_compressed_tensors.plugin import targeted

    gptq = gptq_solver()
    prefix = len(block_name) + 1
    schemes = {
        name[prefix:]: scheme
        for name, scheme in targeted(config, context, model).items()
        if name in context.block_modules(block_name)
    }
    for name, hessian in gptq.stage_hessians(block, list(schemes), inputs):
        source, scheme = block.get_submodule(name), schemes[name]
        weights = scheme["weights"]
        decoded = gptq.quantize_layer(
            source.weight.detach(),
            hessian,
            bits=weights["num_bits"],
            group_size=weights["group_size"] if weights["strategy"] == "group" else -1,
            sym=weights["symmetric"],
            desc_act=False,
            damp_percent=DAMPENING,
            overwrite_hessian=True,
        )
        half = 1 << (weights["num_bits"] - 1)
        codes = (decoded.codes.to(torch.int16) - half).to(torch.int8)
        zero = None if weights["symmetric"] else (decoded.zero.to(torch.int16) - half).to(torch.int8)
        device = source.weight.device
        layer = CompressedLinear(
            source.in_features, source.out_features, source.bias is not None, context.dtype, scheme
        )
        layer.weight = weight_from_codes(
            codes.to(device),
            decoded.scale.to(device, torch.float32),
            None if zero is None else zero.to(device),
            weights,
            source.out_features,
            source.in_features,
        )
        if source.bias is not None:
            layer.bias = torch.nn.Parameter(source.bias.detach().clone(), requires_grad=False)
        block.set_submodule(name, layer)
        del source, hessian
    logger.info(
        "compressed-tensors: %s: GPTQ on %d linear(s), %d calibration sequences", block_name, len(schemes), len(inputs)
    )
