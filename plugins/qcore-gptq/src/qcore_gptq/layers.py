"""The torch side of phases 3 to 6: the quantized module, built from stored GPTQ/AWQ tensors or from GPTQ's result.

Phase 3 (``preprocess_model``) puts an empty :class:`GptqLinear` in place of each owned Linear, after
:func:`check_stored` has checked every stored tensor's shape and dtype from the header; phase 4 (``load_weight``)
gives it its weight with :func:`restore` once the module's tensors have all arrived; with calibration,
``calibrate_block`` builds one with :func:`from_result`; phase 6 (``optimize_runtime``) selects its kernel.

The weight lives in the core's kernel layer (:class:`qcore.kernels.Int4Weight` for 2-, 3- and 4-bit codes, which all
fit in 0..15; :class:`~qcore.kernels.Int8Weight` for 8-bit). Act-order checkpoints (``desc_act`` with a permuted
``g_idx``) are sorted by group once at load, so groups are contiguous as the kernels need, and each forward gathers
the input features in that order: the same one-time permutation the fast GPTQ kernels make. ``state_dict`` writes
the module back in its own format, exactly as it was read (:func:`qcore_gptq.formats.encode`).
"""

from __future__ import annotations

import math

import qcore
import torch
from qcore.kernels import Int4Weight, Int8Weight, PackedLinear
from torch import nn

from qcore_gptq.formats import Decoded, Layout, decode, encode, expected_tensors

__all__ = ["GptqLinear", "check_stored", "check_g_idx", "restore", "from_result"]

#: torch dtype -> the safetensors name the header checks use.
_STORED_DTYPES = {
    torch.int32: "I32",
    torch.int64: "I64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
}


class GptqLinear(PackedLinear):
    """A GPTQ or AWQ linear layer: one :class:`~qcore.kernels.PackedWeight` matmul, saved in its stored format."""

    def __init__(self, layout: Layout, bias: torch.Tensor | None):
        nn.Module.__init__(self)
        self.layout = layout
        self.in_features, self.out_features = layout.in_features, layout.out_features
        #: Set by :meth:`set_weight`; ``None`` while the module waits for its tensors.
        self.weight = None
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        #: The dtype the checkpoint stores scales in (float16 as gptqmodel and AutoAWQ write them), kept for saving.
        self.scale_dtype = torch.float16
        #: Whether the model's module was a transformers ``Conv1D`` (its plain weight is stored [in, out]).
        self.transposed = False
        self.register_buffer("g_idx", None, persistent=False)
        #: Input features in group order (act-order checkpoints only), applied to every input.
        self.register_buffer("order", None, persistent=False)

    def set_weight(self, decoded: Decoded, device: torch.device) -> None:
        """Hold ``decoded`` in the kernel layer: groups made contiguous, stored group size made kernel-friendly."""
        layout, codes, scale, zero = self.layout, decoded.codes, decoded.scale, decoded.zero
        self.scale_dtype = scale.dtype
        self.g_idx = decoded.g_idx.to(device)
        if not torch.equal(decoded.g_idx, _plain_groups(layout)):
            self.order = torch.argsort(decoded.g_idx, stable=True).to(device)
            codes = codes[:, self.order.cpu()]
        # A last group shorter than the others (in_features not a multiple of group_size) is expressed exactly
        # with smaller groups sharing their statistics.
        group = math.gcd(layout.group_size, layout.in_features)
        repeat = layout.group_size // group
        scale = scale.repeat_interleave(repeat, dim=1)[:, : layout.in_features // group]
        zero = zero.to(torch.float16).repeat_interleave(repeat, dim=1)[:, : layout.in_features // group]
        codes, scale, zero = codes.to(device), scale.to(device), zero.to(device)
        if layout.bits == 8:
            self.weight = Int8Weight.from_codes((codes.to(torch.int16) - 128).to(torch.int8), scale, zero - 128, group)
        else:
            self.weight = Int4Weight.from_codes(codes, scale, zero, group)

    def decoded(self) -> Decoded:
        """The codes, scales and zero points exactly as they were stored."""
        layout, weight = self.layout, self.weight
        group = math.gcd(layout.group_size, layout.in_features)
        every = layout.group_size // group
        codes = weight.codes().cpu()
        zero = weight.zero.cpu().float()
        if layout.bits == 8:
            codes, zero = codes.to(torch.int16) + 128, zero + 128
        if self.order is not None:
            codes = codes[:, torch.argsort(self.order.cpu())]
        scale = weight.scale.cpu()[:, ::every].to(self.scale_dtype)
        return Decoded(codes.to(torch.uint8), scale, zero[:, ::every].round().to(torch.uint8), self.g_idx.cpu())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.order is not None:
            x = x.index_select(-1, self.order)
        return self.weight.matmul(x, self.bias)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight ``[out, in]`` in the model's feature order (act-order undone)."""
        weight = self.weight.dequantize(dtype)
        if self.order is not None:
            weight = weight[:, torch.argsort(self.order)]
        return weight

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)
        if self.weight is not None:
            for name, tensor in encode(self.layout, self.decoded()).items():
                destination[prefix + name] = tensor

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        names = {prefix + name: name for name in expected_tensors(self.layout)}
        stored = {name: state_dict[key] for key, name in names.items() if key in state_dict}
        infos = {
            name: (tuple(tensor.shape), _STORED_DTYPES.get(tensor.dtype, str(tensor.dtype)))
            for name, tensor in stored.items()
        }
        try:
            check_stored(self.layout, prefix.rstrip("."), infos, "state_dict")
            device = self.weight.device if self.weight is not None else torch.device("cpu")
            restore(self, prefix.rstrip("."), stored, device, "state_dict")
        except qcore.CheckpointError as error:
            errors.append(str(error))
        rest = {key: value for key, value in state_dict.items() if key not in names}
        nn.Module._load_from_state_dict(
            self, rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
        )

    def extra_repr(self) -> str:
        kernel = self.weight.kernel if self.weight is not None else "unset"
        layout = self.layout
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"format={layout.kind}, bits={layout.bits}, group_size={layout.group_size}, kernel={kernel}"
        )


def _plain_groups(layout: Layout) -> torch.Tensor:
    return torch.arange(layout.in_features, dtype=torch.int32) // layout.group_size


def check_stored(layout: Layout, module_name: str, infos: dict[str, tuple[tuple[int, ...], str]], file: str) -> None:
    """Refuse, from the header alone, a module whose stored tensors do not fit its layout.

    :param infos: stored tensor name (relative to the module) -> (shape, safetensors dtype).
    """
    expected = expected_tensors(layout)
    names = set(infos) - {"bias"}
    method = "awq" if layout.kind.startswith("awq") else "gptq"
    setting = f"bits={layout.bits}, group_size={layout.group_size}"
    missing = sorted(set(expected) - names - {"g_idx"})
    unknown = sorted(names - set(expected))
    if missing or unknown:
        problem = f"lacks {missing}" if missing else f"has tensors a {layout.kind} module does not store: {unknown}"
        raise qcore.CheckpointError(
            f"{method} module {module_name!r} {problem}; a {layout.kind} module stores {sorted(expected)} (+ bias). "
            f"The checkpoint is incomplete or its quantization_config does not describe it",
            file=file,
            tensor=f"{module_name}.{(missing or unknown)[0]}",
        )
    for name in [tensor for tensor in (*expected, "bias") if tensor in infos]:  # qweight first: it names bits
        shape, dtype = infos[name]
        if name == "bias":
            want, dtypes = (layout.out_features,), ("F16", "BF16", "F32")
        else:
            want, dtypes = expected[name]
        if tuple(shape) != want or dtype not in dtypes:
            raise qcore.CheckpointError(
                f"{method} module {module_name!r} ({layout.out_features}x{layout.in_features}, {setting}, "
                f"{layout.kind}) must store {name} as {list(want)} {'/'.join(dtypes)}, found {list(shape)} {dtype}. "
                f"Fix bits/group_size/format in quantization_config to those the checkpoint was made with",
                file=file,
                tensor=f"{module_name}.{name}",
            )


def check_g_idx(layout: Layout, module_name: str, g_idx: torch.Tensor, file: str) -> None:
    """A ``g_idx`` must give every group exactly ``group_size`` input features (the last one the rest)."""
    counts = torch.bincount(g_idx.to(torch.int64).clamp(0, layout.groups), minlength=layout.groups + 1)
    expected = torch.full((layout.groups + 1,), layout.group_size)
    expected[-2] = layout.in_features - layout.group_size * (layout.groups - 1)
    expected[-1] = 0
    if int(g_idx.min()) < 0 or not torch.equal(counts, expected):
        raise qcore.CheckpointError(
            f"gptq module {module_name!r}: g_idx must assign each of the {layout.groups} groups {layout.group_size} "
            f"input features (values 0..{layout.groups - 1}); this one does not (found values "
            f"{int(g_idx.min())}..{int(g_idx.max())}). The tensor is corrupt or group_size is wrong in the config",
            file=file,
            tensor=f"{module_name}.g_idx",
        )


def restore(layer: GptqLinear, module_name: str, stored: dict[str, torch.Tensor], device: torch.device, file: str):
    """Give ``layer`` its weight from the stored tensors (checked against the header already, values here)."""
    if "g_idx" in stored:
        check_g_idx(layer.layout, module_name, stored["g_idx"], file)
    decoded = decode(layer.layout, {name: tensor for name, tensor in stored.items() if name != "bias"})
    layer.set_weight(decoded, device)


def from_result(layout: Layout, decoded: Decoded, bias: torch.Tensor | None, device: torch.device) -> GptqLinear:
    """A finished module from GPTQ's codes, scales and zero points (:func:`qcore_gptq.gptq.quantize_layer`)."""
    layer = GptqLinear(layout, None if bias is None else bias.detach().to(device))
    layer.set_weight(decoded, device)
    return layer
