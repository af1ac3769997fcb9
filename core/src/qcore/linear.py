"""The modules a backend replaces, as every backend sees them: ``nn.Linear`` and transformers' ``Conv1D``.

Used in phase 3 (``preprocess_model``: the shape of the module being replaced) and by ``dequantize_module`` (the
plain tensors a quantized module stands for). GPT-2-style ``Conv1D`` stores its weight as ``[in, out]`` where
``nn.Linear`` stores ``[out, in]``; backends quantize ``[out, in]`` and give ``Conv1D`` weights back transposed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["LinearShape", "linear_shape", "is_conv1d", "plain_tensors"]


class LinearShape(NamedTuple):
    out_features: int
    in_features: int
    #: Whether the module is a transformers ``Conv1D`` (its plain weight is ``[in, out]``).
    transposed: bool


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (by name, so remote subclasses of it count too)."""
    return type(module).__name__ == "Conv1D"


def linear_shape(module: nn.Module) -> LinearShape:
    """``(out_features, in_features, transposed)`` of an ``nn.Linear`` or a transformers ``Conv1D``."""
    if is_conv1d(module):
        in_features, out_features = module.weight.shape
        return LinearShape(out_features, in_features, True)
    return LinearShape(module.out_features, module.in_features, False)


def plain_tensors(
    weight: torch.Tensor, bias: torch.Tensor | None, *, transposed: bool, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """What ``dequantize_module`` returns: the ``[out, in]`` ``weight`` in the module's own layout (``[in, out]`` for
    a ``Conv1D``) and the ``bias``, both in ``dtype``, new tensors."""
    tensors = {"weight": (weight.T.contiguous() if transposed else weight).to(dtype)}
    if bias is not None:
        tensors["bias"] = bias.detach().to(dtype)
    return tensors
