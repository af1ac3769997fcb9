"""``GgufLinear``, the module that replaces each owned ``nn.Linear``/``Conv1D``: made empty on meta in phase 3, filled
with its GGUF blocks in phase 4, given its kernel in phase 6, saved by its ``state_dict()`` and dequantized by the
``dequantize_module`` hook.

Saved layout (safetensors, no pickle), per module:

* ``weight``: uint8 ``[out_features, bytes_per_row]``, each row the GGUF blocks of one output feature exactly as the
  file stores them (Llama q/k rows un-permuted; for F32/F16/BF16 the values' little-endian bytes). The layout of
  transformers' own ``GgufLinear``.
* ``weight_type``: uint8 scalar, the ggml type id (``GGMLQuantizationType``: 2 = Q4_0, 12 = Q4_K, ...).
* ``bias``: in the model dtype, when the module has one.

A tied input embedding stored in Q4_0, Q4_1 or Q8_0 (llama.cpp's small models keep it in Q8_0) becomes a
``GgufEmbedding``, the same blocks read row by row, and the output layer it is tied to a ``GgufLinear`` sharing its
kernel-layer weight: the table is held once, quantized, and the head runs on the kernel layer. Only the embedding is
saved (``weight`` and ``weight_type`` under its name, as above); the head, like a tied head in transformers, is not.

Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q6_K and Q8_0 are integers in groups (of 32; Q6_K's of 16), so their blocks become a
``qcore.kernels`` weight in phase 4 (4-bit types an int4 weight, the others an int8 weight; the file's bytes are then
dropped, and ``state_dict()`` re-encodes the identical bytes from the kernel's exact codes and statistics, and the
block bytes Q4_K's and Q6_K's float scales do not keep, held as ``side``); Q2_K, Q3_K and Q5_K, and the types a
load's ``kernel_types`` leaves out, are dequantized from their blocks in each forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qcore_gguf import blocks

__all__ = ["GgufLinear", "GgufEmbedding"]


class GgufLinear(nn.Module):
    """``y = x @ W.T + bias`` with ``W`` held as GGUF blocks, or as the ``qcore.kernels`` weight they map onto."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, transposed: bool):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        #: A transformers ``Conv1D`` (GPT-2) keeps its float weight as [in, out]; its blocks are rows of outputs.
        self.transposed = transposed
        self.weight = nn.Parameter(torch.empty(out_features, 0, dtype=torch.uint8), requires_grad=False)
        self.register_buffer("weight_type", torch.empty((), dtype=torch.uint8))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None
        #: The block type's name, and the kernel-layer weight that replaces the blocks of the types with an integer
        #: form (``blocks.KERNEL_KINDS``); for Q4_K and Q6_K also the bytes of each block the weight's float scales
        #: do not keep exactly (``blocks.side_bytes``).
        self.type_name = ""
        self.packed = None
        self.side: torch.Tensor | None = None
        #: The embedding this output layer is tied to (it then holds and saves nothing of its own).
        self.tied_to: GgufEmbedding | None = None

    @classmethod
    def replacing(cls, module: nn.Module, dtype: torch.dtype) -> GgufLinear:
        """An empty ``GgufLinear`` (create it under ``torch.device("meta")``) with the shape of ``module``."""
        transposed = not isinstance(module, nn.Linear)
        in_features, out_features = module.weight.shape if transposed else module.weight.shape[::-1]
        return cls(in_features, out_features, module.bias is not None, dtype, transposed)

    def filled(
        self, rows: torch.Tensor, type_name: str, device: torch.device, on_kernel: bool = True
    ) -> dict[str, object]:
        """The attributes that hold ``rows`` (uint8 blocks, already checked) of type ``type_name`` on ``device``;
        with ``on_kernel`` false the blocks are kept as they are, whatever the type."""
        from qcore.kernels import Int4Weight, Int8Weight

        packed = side = None
        rows = rows.to(device)
        form = blocks.int_form(rows, type_name, two_per_byte=True) if on_kernel else None
        if form is not None:
            codes, scale, zero = form
            int4 = blocks.KERNEL_KINDS[type_name] == "int4"
            make = Int4Weight.from_two_per_byte if int4 else Int8Weight.from_codes
            # A GGUF scale that is a half is kept as one: exact, and half the memory of float32 (Q4_K's and Q6_K's
            # d * sc is not a half; their side bytes keep the exact block bytes).
            side = blocks.side_bytes(rows, type_name)
            exact = scale if side is not None else scale.to(torch.float16)
            candidate = make(codes, exact, zero, group_size=blocks.GROUP[type_name])
            if self._encodes_to(candidate, type_name, side, rows):
                packed = candidate
        return {
            "weight": None if packed is not None else nn.Parameter(rows, requires_grad=False),
            "weight_type": torch.tensor(blocks.ID[type_name], dtype=torch.uint8, device=device),
            "type_name": type_name,
            "packed": packed,
            "side": side if packed is not None else None,
        }

    def tie_to(self, embedding: GgufEmbedding) -> None:
        """Compute with ``embedding``'s table (its ``[num_embeddings, embedding_dim]`` is this layer's weight)."""
        object.__setattr__(self, "tied_to", embedding)  # a reference, not a submodule (saved and listed once)
        self.weight, self.weight_type, self.type_name, self.packed, self.side = (
            embedding.weight, embedding.weight_type, embedding.type_name, embedding.packed, embedding.side
        )  # fmt: skip

    @staticmethod
    def _encode_rows(packed, type_name: str, side: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
        """The GGUF blocks of output rows ``rows`` (an index tensor), from the kernel weight's exact codes."""
        rows = rows.to(packed.device)
        zero = None if packed.zero is None else packed.zero[rows]
        side_rows = None if side is None else side[rows.to(side.device)].to(packed.device)
        return blocks.from_int_form(packed.row_codes(rows), packed.scale[rows], zero, type_name, side_rows)

    @classmethod
    def _encodes_to(cls, packed, type_name: str, side: torch.Tensor | None, rows: torch.Tensor) -> bool:
        """Whether ``packed`` re-encodes to exactly ``rows``, checked a slice of rows at a time (a 49k-row table
        would otherwise be encoded whole beside its codes; a slice's temporaries are about 6 bytes a block byte)."""
        step = max(1, 2**20 // max(1, rows.shape[1]))
        for start in range(0, rows.shape[0], step):
            picked = torch.arange(start, min(start + step, rows.shape[0]))
            encoded = cls._encode_rows(packed, type_name, side, picked)
            if not torch.equal(encoded.cpu(), rows[start : start + step].cpu()):
                return False
        return True

    def blocks(self) -> torch.Tensor:
        """The GGUF blocks of the weight, ``[out_features, bytes_per_row]`` uint8, exactly as stored."""
        if self.packed is None:
            return self.weight
        zero = self.packed.zero
        side = None if self.side is None else self.side.to(self.packed.device)  # select() moves the weight alone
        return blocks.from_int_form(self.packed.codes(), self.packed.scale, zero, self.type_name, side)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """``W`` as ``[out_features, in_features]`` in ``dtype``: the GGUF values, in float32, rounded once."""
        return blocks.dequantize(self.blocks(), self.type_name, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return self.packed.matmul(x, self.bias)
        return F.linear(x, self.dequantize(x.dtype), self.bias)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.tied_to is not None:
            return  # the embedding saves the table
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.packed is not None:
            destination[prefix + "weight"] = self.blocks()

    def extra_repr(self) -> str:
        kernel = self.packed.kernel if self.packed is not None else "dequantize"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"type={self.type_name}, kernel={kernel}"
        )


class GgufEmbedding(GgufLinear):
    """``nn.Embedding`` with its table held as GGUF blocks (or their kernel-layer weight), decoded row by row.

    The table ``[num_embeddings, embedding_dim]`` is laid out as a Linear weight ``[out, in]``, the layout of the
    output layer tied to it, so one weight serves both: a lookup re-encodes the blocks of the rows it reads from the
    exact codes and decodes them as the gguf package does (the values of transformers' dequantized table, bit for
    bit), and the head multiplies by the whole table on the kernel layer.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None, dtype: torch.dtype):
        super().__init__(embedding_dim, num_embeddings, bias=False, dtype=dtype, transposed=False)
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        #: The dtype of the looked-up vectors (the model's), as nn.Embedding's table has.
        self.output_dtype = dtype
        #: Whether an output layer is tied to this table (then it is held on the kernel layer, for the head).
        self.ties_a_head = False

    @classmethod
    def replacing(cls, module: nn.Module, dtype: torch.dtype) -> GgufEmbedding:
        return cls(module.num_embeddings, module.embedding_dim, module.padding_idx, dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        table = self.packed.device if self.packed is not None else self.weight.device
        rows = input_ids.reshape(-1).to(table)
        if self.packed is not None:
            row_blocks = self._encode_rows(self.packed, self.type_name, self.side, rows)
        else:
            row_blocks = self.weight[rows]
        values = blocks.dequantize(row_blocks, self.type_name, self.output_dtype)
        return values.reshape(*input_ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        held = f"kernel={self.packed.kernel}" if self.packed is not None else "blocks"
        tied = ", tied head" if self.ties_a_head else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, type={self.type_name}, {held}{tied}"
