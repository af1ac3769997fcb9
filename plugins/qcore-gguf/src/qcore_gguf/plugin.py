"""The qcore-gguf plugin: registration, the ``.gguf`` reader, and the hooks for ``quant_method: gguf``.

    reader             ``.gguf`` files -> :class:`~qcore_gguf.reader.GgufReader` (header checked, names mapped)
    validate           gguf is importable; quantizing on the fly, ``weight_type`` is one the gguf package writes
    preprocess_model   each owned Linear/Conv1D -> an empty GgufLinear on meta; a quantized token embedding
                       -> a GgufEmbedding, and a tied head (Q4_0/Q4_1/Q8_0) a GgufLinear (taken from the core)
    load_weight        check the stored blocks (or quantize a float weight with gguf.quants) and fill the module;
                       the types of config.KERNEL_TYPES become qcore.kernels weights, the others keep their blocks
    postprocess        tie the head to the embedding's weight
    optimize_runtime   pick each kernel-layer weight's kernel and report what runs
    dequantize_module  the module's GGUF values, for qcore.dequantize and qcore convert

update_device_map is not needed: every device can dequantize.

This module is the entry point (``qcore`` group, name ``gguf``): importing it imports neither torch nor gguf.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import qcore

from qcore_gguf.config import KERNEL_TYPES, SUPPORTED_TYPES, WRITABLE_TYPES, GgufConfig

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PreTrainedModel

__all__ = [
    "register_backend", "open_gguf", "validate", "preprocess_model", "load_weight", "postprocess",
    "optimize_runtime", "dequantize_module",
]  # fmt: skip


@qcore.hookimpl
def register_backend() -> qcore.Backend:
    presets = tuple(
        qcore.Preset(
            f"gguf-{name.lower()}",
            {"quant_method": "gguf", "weight_type": name},
            summary=summary,
            fast_on=("cpu", "cuda"),
        )
        for name, summary in (
            ("Q8_0", "GGUF Q8_0 blocks (int8, a half scale per 32): 8.5 bits/weight, near-lossless, no calibration"),
            ("Q4_0", "GGUF Q4_0 blocks (int4, a half scale per 32): 4.5 bits/weight, coarse, no calibration"),
        )
    )
    return qcore.Backend(
        name="gguf",
        configs={"gguf": GgufConfig},
        presets=presets,
        requires=("gguf>=0.17.1",),
        readers={".gguf": open_gguf},
        notes=lambda: (
            f"kernels: qcore.kernels for {', '.join(KERNEL_TYPES)} (see kernel_types); dequantize per forward "
            f"for the rest"
        ),
    )


def open_gguf(path: Path) -> Any:
    """The ``.gguf`` reader ``Backend.readers`` names; imports the reader (torch, transformers) when called."""
    from qcore_gguf.reader import GgufReader

    return GgufReader(path)


@qcore.hookimpl
def validate(config: GgufConfig, context: qcore.LoadContext) -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise qcore.BackendUnavailable("qcore-gguf needs the gguf package: pip install 'gguf>=0.17.1'") from None
    if not context.pre_quantized and config.weight_type not in WRITABLE_TYPES:
        raise qcore.ConfigError(
            f"gguf config: weight_type {config.weight_type!r} cannot be written by the gguf package; quantize on the "
            f"fly to one of {list(WRITABLE_TYPES)}, or load a file llama.cpp quantized to it"
        )


@qcore.hookimpl
def preprocess_model(config: GgufConfig, context: qcore.LoadContext, model: PreTrainedModel) -> None:
    import torch

    from qcore_gguf.layers import GgufEmbedding, GgufLinear

    table = _quantized_table(config, context, model)
    if table is not None:
        embedding, head = table
        for name in (embedding, head):
            if name is not None:
                context.take(name)
        with torch.device("meta"):
            layer = GgufEmbedding.replacing(model.get_submodule(embedding), context.dtype)
        layer.ties_a_head = head is not None
        model.set_submodule(embedding, layer)
    for name in context.modules:
        if table is None or name != table[0]:
            with torch.device("meta"):
                layer = GgufLinear.replacing(model.get_submodule(name), context.dtype)
            model.set_submodule(name, layer)


#: Block types a tied head runs on the kernel layer; a tied table in another type stays a dequantized nn.Embedding
#: (its head would decode the whole table in every forward).
_TIED_TYPES = ("Q4_0", "Q4_1", "Q8_0")


def _quantized_table(
    config: GgufConfig, context: qcore.LoadContext, model: PreTrainedModel
) -> tuple[str, str | None] | None:
    """(embedding, tied head or None) when the model's input embedding stays in its blocks: a GGUF file's quantized
    ``token_embd`` (any block type when untied, Q4_0/Q4_1/Q8_0 when tied: the head runs on the kernel layer), or a
    GgufEmbedding saved by qcore."""
    from torch import nn

    if not context.pre_quantized:
        return None
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if type(embedding) is not nn.Embedding:
        return None  # a scaled embedding (Gemma) computes more than a lookup
    names = {id(module): name for name, module in model.named_modules()}
    embedding_name, head_name = names.get(id(embedding)), names.get(id(head))
    tensors = context.checkpoint.tensors
    saved = f"{embedding_name}.weight_type" in tensors
    info = tensors.get(f"{embedding_name}.weight")
    if info is None or not (saved or not info.is_plain):
        return None  # a float table: dequantizing it costs nothing
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    if tied.get(f"{head_name}.weight") != f"{embedding_name}.weight":
        return embedding_name, None
    if type(head) is not nn.Linear or head.bias is not None or head_name in context.modules:
        return None
    on_kernel = saved or (info.dtype in _TIED_TYPES and config.on_kernel(info.dtype))
    return (embedding_name, head_name) if on_kernel else None


@qcore.hookimpl
def load_weight(
    config: GgufConfig,
    context: qcore.LoadContext,
    model: PreTrainedModel,
    module_name: str,
    tensor_name: str,
    tensor: torch.Tensor,
) -> dict[str, Any] | None:
    from qcore_gguf.layers import GgufEmbedding, GgufLinear

    layer = model.get_submodule(module_name)
    if not isinstance(layer, GgufLinear) or tensor_name == "bias":
        return None  # the core places the bias in the model dtype
    if not context.pre_quantized:
        if tensor_name != "weight":
            return None
        rows = _quantize(layer, module_name, tensor, config.weight_type, context)
        on_kernel = config.on_kernel(config.weight_type)
        return layer.filled(rows, config.weight_type, context.device_for(module_name), on_kernel=on_kernel)
    stored = context.gather(module_name, tensor_name, tensor)
    if stored is None:
        return {}
    rows, type_name = _stored_blocks(layer, module_name, stored, context)
    # An untied table keeps its blocks as they are (lookups decode their rows; nothing multiplies by it).
    on_kernel = (not isinstance(layer, GgufEmbedding) or layer.ties_a_head) and config.on_kernel(type_name)
    filled = layer.filled(rows, type_name, context.device_for(module_name), on_kernel=on_kernel)
    if isinstance(layer, GgufEmbedding) and filled["packed"] is not None:
        # The table (the largest weight) is repacked for its kernel as it arrives, while little else is held: in
        # phase 6 its codes and their repacked copy would be in memory beside every other layer (+60 MiB of peak
        # on a 135M model). Its blocks are in the codes now; with mmap_weights=True they are the file's pages,
        # which go before the repack (-29 MiB more; a copy of its own already gave them back).
        context.checkpoint.release(f"{module_name}.{tensor_name}")
        _select_kernel(filled["packed"], layer, context.dtype)
    return filled


def _select_kernel(packed, layer, dtype) -> None:
    from qcore_gguf.layers import GgufEmbedding

    # A table's lookups read rows of codes, which every CPU kernel keeps row by row; elsewhere (CUDA's tinygemm
    # interleaves rows) it keeps its plain codes and its head dequantizes in each forward.
    cpu = packed.device.type == "cpu"
    packed.select(
        packed.device, dtype, batch_hint=1, kernel=None if cpu or not isinstance(layer, GgufEmbedding) else "dequantize"
    )


def _stored_blocks(layer, module_name: str, stored: dict[str, Any], context: qcore.LoadContext):
    """The checked uint8 blocks of a module and their type: from a GGUF file (the type is the tensor's stored type)
    or from a saved checkpoint (``weight`` plus a ``weight_type`` scalar)."""
    import torch

    from qcore_gguf import blocks

    def refuse(tensor_name: str, message: str) -> qcore.CheckpointError:
        return qcore.CheckpointError(message, file=str(context.source), tensor=f"{module_name}.{tensor_name}")

    unknown = sorted(set(stored) - {"weight", "weight_type"})
    if unknown or "weight" not in stored:
        raise refuse(unknown[0] if unknown else "weight", f"expected weight and weight_type, got {sorted(stored)}")
    weight = stored["weight"]
    if "weight_type" in stored:
        code = stored["weight_type"]
        if code.dtype != torch.uint8 or code.shape != () or int(code) not in blocks.TYPES:
            raise refuse("weight_type", f"{code.dtype} {list(code.shape)} is not a uint8 scalar ggml type id")
        type_name = blocks.TYPES[int(code)][0]
    else:  # a GGUF file: the stored type of the tensor itself
        info = context.checkpoint.tensors.get(f"{module_name}.weight")
        type_name = info.dtype if info is not None else "missing"
    if type_name not in SUPPORTED_TYPES:
        raise refuse("weight_type", f"type {type_name} is not one qcore-gguf loads ({', '.join(SUPPORTED_TYPES)})")
    if weight.is_floating_point():  # F32/F16/BF16 values from a GGUF file, in the model's layout
        weight = (weight.T if layer.transposed else weight).contiguous()
        if tuple(weight.shape) != (layer.out_features, layer.in_features):
            raise refuse("weight", f"shape {list(weight.shape)} does not fit the module's {layer.out_features}x"
                                   f"{layer.in_features}")  # fmt: skip
        weight = weight.to(blocks.FLOATS[type_name]).view(torch.uint8)
    _, block, _ = blocks.TYPES[blocks.ID[type_name]]
    expected = (layer.out_features, blocks.row_bytes(type_name, layer.in_features))
    if weight.dtype != torch.uint8 or tuple(weight.shape) != expected or layer.in_features % block:
        raise refuse("weight", f"is {weight.dtype} {list(weight.shape)}, expected uint8 {list(expected)}: {type_name} "
                               f"blocks of a {layer.out_features}x{layer.in_features} weight")  # fmt: skip
    return weight, type_name


def _quantize(layer, module_name: str, tensor: torch.Tensor, type_name: str, context: qcore.LoadContext):
    """A full-precision weight as ``type_name`` blocks, written by the gguf package's own quantizer."""
    import gguf
    import numpy as np
    import torch

    from qcore_gguf import blocks

    if layer.in_features % blocks.TYPES[blocks.ID[type_name]][1]:
        raise qcore.CheckpointError(
            f"in_features {layer.in_features} is not a multiple of {type_name}'s block; keep this module in full "
            f"precision with modules_to_not_convert",
            file=str(context.source),
            tensor=f"{module_name}.weight",
        )
    weight = (tensor.T if layer.transposed else tensor).float().contiguous().numpy()
    rows = gguf.quants.quantize(weight, gguf.GGMLQuantizationType[type_name])
    return torch.from_numpy(np.ascontiguousarray(rows).view(np.uint8).reshape(layer.out_features, -1))


@qcore.hookimpl
def postprocess(config: GgufConfig, context: qcore.LoadContext, model: PreTrainedModel) -> None:
    from qcore_gguf.layers import GgufEmbedding, GgufLinear

    taken = [model.get_submodule(name) for name in context.taken]
    embedding = next((m for m in taken if isinstance(m, GgufEmbedding)), None)
    for head in taken:
        if embedding is not None and type(head) is GgufLinear:
            head.tie_to(embedding)


@qcore.hookimpl
def optimize_runtime(config: GgufConfig, context: qcore.LoadContext, model: PreTrainedModel) -> None:
    from qcore_gguf.environment import summarize
    from qcore_gguf.layers import GgufLinear

    # Largest first: a repack holds a weight's codes twice for a moment, and the kernel's scales-and-zeros each
    # repack adds (a quarter of the codes) are then not yet held beside the largest one (-40 MiB of peak on a 336M
    # model). select() returns the repacks' temporaries to the system itself.
    layers = [model.get_submodule(name) for name in context.modules]
    for layer in sorted(layers, key=lambda m: -m.in_features * m.out_features if type(m) is GgufLinear else 0):
        # A table and its tied head were given their kernel in load_weight.
        if type(layer) is GgufLinear and layer.packed is not None and layer.tied_to is None:
            _select_kernel(layer.packed, layer, context.dtype)
    context.report_kernel(summarize(layer for layer in layers if isinstance(layer, GgufLinear)))


@qcore.hookimpl
def dequantize_module(
    config: GgufConfig, module_name: str, module: nn.Module, dtype: torch.dtype
) -> dict[str, torch.Tensor] | None:
    from qcore_gguf.layers import GgufLinear

    if not isinstance(module, GgufLinear):
        return None
    weight = module.dequantize(dtype)  # a GgufEmbedding's table, or a tied head's (qcore.dequantize re-ties it)
    tensors = {"weight": weight.T.contiguous() if module.transposed else weight}
    if module.bias is not None:
        tensors["bias"] = module.bias.detach().to(dtype)
    return tensors
