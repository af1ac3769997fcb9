"""``GgufReader``: a ``.gguf`` file as a :class:`qcore.checkpoint.CheckpointSource`, before phase 1 and in phase 4.

The header is parsed here, by hand, and every count, length, type, shape and offset is checked against the file's
size before anything else reads it: a truncated or hostile file gives a :class:`qcore.CheckpointError` naming the file
(and tensor, or metadata key), never a crash, a hang or an allocation sized by the file's own claims. Only then do
transformers' GGUF functions see the file: its config mapping makes the model config (so the model class is the
one ``from_pretrained(..., gguf_file=...)`` builds) and its ``get_gguf_hf_weights_map`` names the tensors.

Tensors keep llama.cpp's stored form. A block-typed tensor is read as uint8 rows of blocks ``[rows, bytes_per_row]``
(a copy of its own; a copy-on-write view of the file with ``mmap_weights=True``), with Llama-family q/k rows
un-permuted; plain F32/F16/BF16 tensors are read as values in the model's layout, with transformers' tensor
processors applied (q/k un-permuted, GPT-2's Conv1D weights transposed, Gemma-style norms stored as ``w + 1``
shifted back). :meth:`to_plain` turns blocks into values for the tensors no backend takes (embeddings, norms).
"""

from __future__ import annotations

import collections
import math
import mmap
import struct
import types
from pathlib import Path
from typing import Any

import torch
from qcore.checkpoint import CheckpointSource, TensorInfo
from qcore.errors import CheckpointError

from qcore_gguf import blocks

__all__ = ["GgufReader", "ARCHITECTURES"]

#: GGUF value type -> struct format of the fixed-size ones (8 = string and 9 = array are walked separately).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
#: llama.cpp's GGML_MAX_DIMS; and arrays nest no deeper than this in any file llama.cpp writes or reads.
_MAX_DIMS, _MAX_NESTING = 4, 2
#: Architectures whose tensors qcore-gguf maps, with transformers' tensor processor for each (its
#: ``TENSOR_PROCESSORS`` in modeling_gguf_pytorch_utils.py): which stored tensors it changes, and how.
ARCHITECTURES = {
    "llama": "unpermute_qk", "mistral": None, "qwen2": None, "qwen3": None, "phi3": None,
    "gemma2": "norm_minus_one", "gpt2": "transpose_conv1d",
}  # fmt: skip
_GPT2_TRANSPOSED = ("attn_qkv.weight", "ffn_down.weight", "ffn_up.weight", "attn_output.weight")


class _Strings:
    """An array of strings in the metadata (a vocabulary), checked but not kept: only its length is used."""

    def __init__(self, count: int):
        self.count = count


class _Header:
    """A bounds-checked cursor over the file's bytes."""

    def __init__(self, path: Path, data: Any):
        self.path, self.data, self.pos = path, data, 0

    def fail(self, message: str, tensor: str | None = None) -> CheckpointError:
        return CheckpointError(
            f"{message}; the file is truncated, corrupt or not GGUF: download it again",
            file=str(self.path),
            tensor=tensor,
        )

    def take(self, size: int, what: str) -> bytes:
        if size > len(self.data) - self.pos:
            raise self.fail(
                f"{what} needs {size} bytes at offset {self.pos}, past the end of the {len(self.data)}-byte file"
            )
        chunk = self.data[self.pos : self.pos + size]
        self.pos += size
        return chunk

    def scalar(self, value_type: int, what: str) -> Any:
        fmt = _SCALARS[value_type]
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        length = self.scalar(10, what)
        try:
            return bytes(self.take(length, what)).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None

    def value(self, value_type: int, key: str, depth: int = 0) -> Any:
        if value_type in _SCALARS:
            return self.scalar(value_type, f"metadata {key!r}")
        if value_type == _STRING:
            return self.string(f"metadata {key!r}")
        if value_type != _ARRAY or depth >= _MAX_NESTING:
            raise self.fail(f"metadata {key!r} has unknown value type {value_type}")
        element_type, count = self.scalar(4, f"metadata {key!r}"), self.scalar(10, f"metadata {key!r}")
        # The smallest an element can be: a string is at least its 8-byte length, an array its 12-byte header.
        least = {_STRING: 8, _ARRAY: 12}.get(element_type) or struct.calcsize(_SCALARS.get(element_type, "B"))
        if count * least > len(self.data) - self.pos:
            raise self.fail(
                f"metadata {key!r} claims an array of {count} elements, at least {count * least} bytes, but only "
                f"{len(self.data) - self.pos} bytes remain"
            )
        if element_type in _SCALARS and element_type != 7:
            raw = self.take(count * least, f"metadata {key!r}")
            return list(struct.unpack(f"<{count}{_SCALARS[element_type][1]}", raw))
        if element_type == _STRING:  # a vocabulary or merge table: checked and walked, kept only as its length
            for _ in range(count):
                self.take(self.scalar(10, f"metadata {key!r}"), f"metadata {key!r}")
            return _Strings(count)
        return [self.value(element_type, key, depth + 1) for _ in range(count)]


class GgufReader(CheckpointSource):
    """One ``.gguf`` file: header checked on construction, tensors named as the transformers model names them."""

    def __init__(self, path: str | Path):
        self.file = Path(path)
        self.directory = self.file.parent
        self.files = [self.file]
        with self.file.open("rb") as handle:
            size = self.file.stat().st_size
            if size < 24:
                raise CheckpointError(
                    f"truncated: {size} bytes, shorter than a GGUF header; download it again", file=str(self.file)
                )
            self._mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        self.fields, raw_tensors = self._parse()
        self.architecture = self.fields.get("general.architecture")
        if self.architecture not in ARCHITECTURES:
            raise CheckpointError(
                f"architecture {self.architecture!r} is not one qcore-gguf maps (it maps {', '.join(ARCHITECTURES)}); "
                f"load it with transformers (from_pretrained(..., gguf_file=...) dequantizes it)",
                file=str(self.file),
            )
        self.metadata = {k: str(v) for k, v in self.fields.items() if not isinstance(v, (list, _Strings))}
        self._config = self._read_config(tied="output.weight" not in {entry[0] for entry in raw_tensors})
        matrices = collections.Counter(blocks.TYPES[entry[1]][0] for entry in raw_tensors if len(entry[2]) == 2)
        if matrices:  # for memory estimates: the type most of the model's weights are stored in
            self._config.quantization_config["weight_type"] = matrices.most_common(1)[0][0]
        self.tensors: dict[str, TensorInfo] = {}
        #: transformers name -> (GGUF name, file type id) of every tensor the model takes.
        self.stored: dict[str, tuple[str, int]] = {}
        names = self._name_map()
        for gguf_name, type_id, shape, offset, nbytes in raw_tensors:
            if gguf_name not in names:
                continue  # as transformers: a tensor the model has no place for (rope_freqs) is not loaded
            name = names[gguf_name]
            if self._kind(gguf_name) == "transpose_conv1d":
                shape = shape[::-1]
            self.tensors[name] = TensorInfo(name, self.file, blocks.TYPES[type_id][0], shape, offset, nbytes)
            self.stored[name] = (gguf_name, type_id)

    # -- the header ------------------------------------------------------------------------------------

    def _parse(self) -> tuple[dict[str, Any], list[tuple[str, int, tuple[int, ...], int, int]]]:
        header = _Header(self.file, self._mapping)
        if bytes(header.take(4, "magic")) != b"GGUF":
            raise header.fail(f"wrong magic {bytes(self._mapping[:4])!r}, expected b'GGUF'")
        version = header.scalar(4, "version")
        if version not in (2, 3):
            raise header.fail(f"GGUF version {version}; qcore-gguf reads versions 2 and 3")
        tensor_count, kv_count = header.scalar(10, "tensor count"), header.scalar(10, "metadata count")
        fields: dict[str, Any] = {}
        for _ in range(kv_count):
            key = header.string("metadata key")
            if key in fields:
                raise header.fail(f"metadata key {key!r} appears twice")
            fields[key] = header.value(header.scalar(4, f"metadata {key!r}"), key)
        alignment = fields.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise header.fail(f"general.alignment {alignment!r} is not a power of two")
        entries = []
        for _ in range(tensor_count):
            name = header.string("tensor name")
            n_dims = header.scalar(4, f"tensor {name!r}")
            if not 1 <= n_dims <= _MAX_DIMS:
                raise header.fail(f"{n_dims} dimensions (GGUF allows 1 to {_MAX_DIMS})", name)
            dims = [header.scalar(10, f"tensor {name!r}") for _ in range(n_dims)]
            type_id, offset = header.scalar(4, f"tensor {name!r}"), header.scalar(10, f"tensor {name!r}")
            entries.append((name, dims, type_id, offset))
        data_start = -(-header.pos // alignment) * alignment
        raw, seen, spans = [], set(), []
        for name, dims, type_id, offset in entries:
            if name in seen:
                raise header.fail("tensor appears twice", name)
            seen.add(name)
            if type_id not in blocks.TYPES:
                raise header.fail(f"unknown ggml type id {type_id}", name)
            type_name, block, size = blocks.TYPES[type_id]
            if type_name not in blocks.SUPPORTED:
                raise CheckpointError(
                    f"stored as {type_name}, a type qcore-gguf does not load (it loads {', '.join(blocks.SUPPORTED)}); "
                    f"re-quantize the model to one of those with llama.cpp's llama-quantize",
                    file=str(self.file),
                    tensor=name,
                )
            if min(dims) < 1 or math.prod(dims) >= 2**62 or dims[0] % block:
                raise header.fail(
                    f"shape {dims[::-1]} is empty, too large, or not whole {type_name} blocks of {block}", name
                )
            nbytes = math.prod(dims) // block * size
            start = data_start + offset
            if offset % alignment or start + nbytes > len(self._mapping):
                raise header.fail(
                    f"data at offset {offset} (+{nbytes} bytes) is misaligned or runs past the end of the "
                    f"{len(self._mapping)}-byte file",
                    name,
                )
            raw.append((name, type_id, tuple(dims[::-1]), start, nbytes))
            spans.append((start, start + nbytes, name))
        ordered = sorted(spans)
        for (_, end, previous), (begin, _, name) in zip(ordered, ordered[1:], strict=False):
            if begin < end:
                raise header.fail(f"its data overlaps tensor {previous!r}", name)
        return fields, sorted(raw, key=lambda entry: entry[3])

    # -- config and names, through transformers' GGUF mapping ---------------------------------------------

    def _read_config(self, tied: bool) -> Any:
        """The config transformers' ``gguf_file=`` load makes, from the metadata already parsed and checked here.

        transformers' own path (``load_gguf_checkpoint``) parses the file again with gguf's ``GGUFReader``, which
        builds a numpy object per vocabulary entry (seconds and hundreds of MB for a 49k-token vocabulary); this
        applies the same tables (``GGUF_TO_TRANSFORMERS_MAPPING``, ``GGUF_CONFIG_DEFAULTS_MAPPING``) in the same way
        for the architectures of :data:`ARCHITECTURES`, and the tests hold it equal to transformers' config.
        """
        from transformers import CONFIG_MAPPING, AutoModelForCausalLM
        from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING
        from transformers.modeling_gguf_pytorch_utils import GGUF_TO_TRANSFORMERS_MAPPING

        architecture = self.architecture
        # transformers tests `"mistral" in model_name` on the one-element list of general.name: an exact match.
        updated = (
            "mistral" if architecture == "llama" and self.fields.get("general.name") == "mistral" else architecture
        )
        values: dict[str, Any] = {"tie_word_embeddings": tied}
        for key, value in GGUF_CONFIG_DEFAULTS_MAPPING.get(updated, {}).items():
            values.setdefault(key, value)
        renames = GGUF_TO_TRANSFORMERS_MAPPING["config"]
        for key, value in self.fields.items():
            prefix, _, rest = key.replace(architecture, updated).partition(".")
            target = renames.get(prefix, {}).get(rest)
            if target not in (None, -1) and not isinstance(value, _Strings):
                values[target] = value.replace(architecture, updated) if isinstance(value, str) else value
        tokens = self.fields.get("tokenizer.ggml.tokens")
        if "vocab_size" not in values and isinstance(tokens, _Strings):
            values["vocab_size"] = tokens.count
        try:
            config = CONFIG_MAPPING[values["model_type"]].from_dict(values)
        except Exception as error:  # a config class validates with exception types sharing no base
            raise CheckpointError(
                f"transformers cannot make a {updated} config from its metadata ({type(error).__name__}: {error})",
                file=str(self.file),
            ) from None
        config._name_or_path = str(self.directory)  # as transformers names a config loaded from a directory
        # Built from the architectures it names: the model class transformers' own gguf_file= load builds.
        config.architectures = [AutoModelForCausalLM._model_mapping[type(config)].__name__]
        config.quantization_config = {
            "quant_method": "gguf",
            "gguf_file": self.file.name,
            # Every Linear with a tensor in the file keeps its blocks; a tied head has none (it is the embedding).
            "modules_to_not_convert": ["lm_head"] if tied else [],
        }
        return config

    def _name_map(self) -> dict[str, str]:
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

        with init_empty_weights():
            skeleton = AutoModelForCausalLM.from_config(self._config)
        # The map recurses into every submodule, building gguf's name table again for each (about 400 times for a
        # 30-layer model, tens of seconds); for these architectures the model's own state_dict names every tensor.
        model = types.SimpleNamespace(
            config=skeleton.config, state_dict=skeleton.state_dict, named_children=lambda: iter(())
        )
        processor = TENSOR_PROCESSORS.get(self.architecture, TensorProcessor)(config=self._config.to_dict())
        # gguf names Mistral's tensors as Llama's (llama.cpp converts it as "llama"); transformers' map asks gguf for a
        # "mistral" architecture gguf does not define, so its own gguf_file= load of these files fails.
        model_type = "llama" if self._config.model_type == "mistral" else None
        names = get_gguf_hf_weights_map(model, processor, model_type=model_type)
        if self.architecture == "gpt2":  # transformers' GPT-2 processor places the head itself, outside the map
            names["output.weight"] = "lm_head.weight"
        return names

    def model_config(self) -> Any:
        return self._config

    # -- tensors -----------------------------------------------------------------------------------------

    def _kind(self, gguf_name: str) -> str | None:
        kind = ARCHITECTURES[self.architecture]
        if kind == "unpermute_qk" and (".attn_q." in gguf_name or ".attn_k." in gguf_name):
            return kind
        if kind == "transpose_conv1d" and gguf_name.endswith(_GPT2_TRANSPOSED):
            return kind
        if kind == "norm_minus_one" and "norm.weight" in gguf_name:
            return kind
        return None

    def read(self, name: str) -> torch.Tensor:
        info, (gguf_name, _) = self.tensors[name], self.stored[name]
        shape = self._stored_shape(name)
        raw = torch.frombuffer(self._mapping, dtype=torch.uint8, count=info.nbytes, offset=info.offset)
        if not self.mapped:
            # The loaded model's own copy (the loader's default): a view would tie the model to the file for its
            # life, changing with it and dying of SIGBUS if it is truncated. The pages the copy touched go at once.
            raw = raw.clone()
            self.release(name)
        if info.is_plain:
            return self._values(gguf_name, raw.view(blocks.FLOATS[info.dtype]).reshape(shape), unpermute=True)
        return self._unpermuted(gguf_name, raw.view(-1, blocks.row_bytes(info.dtype, shape[-1])))

    def to_plain(self, name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        gguf_name = self.stored[name][0]
        # Decoded a slice of blocks at a time straight into ``dtype``; a Gemma norm's ``w + 1`` is undone in float32
        # first, before any rounding, as transformers does.
        shifted = self._kind(gguf_name) == "norm_minus_one"
        values = blocks.dequantize(tensor, self.tensors[name].dtype, torch.float32 if shifted else dtype)
        values = values.reshape(self._stored_shape(name))
        return self._values(gguf_name, values, unpermute=False).to(dtype)  # read() un-permuted the rows

    def _stored_shape(self, name: str) -> tuple[int, ...]:
        """The shape of the values as the file orders them (GPT-2's Conv1D weights are stored transposed)."""
        shape = self.tensors[name].shape
        return shape[::-1] if self._kind(self.stored[name][0]) == "transpose_conv1d" else shape

    def _unpermuted(self, gguf_name: str, rows: torch.Tensor) -> torch.Tensor:
        if self._kind(gguf_name) != "unpermute_qk":
            return rows
        heads = self._config.num_attention_heads if ".attn_q." in gguf_name else self._config.num_key_value_heads
        return blocks.unpermute_rows(rows, heads)

    def _values(self, gguf_name: str, values: torch.Tensor, unpermute: bool) -> torch.Tensor:
        """Stored values in the model's layout: the changes transformers' tensor processor undoes, undone."""
        values = self._unpermuted(gguf_name, values) if unpermute else values
        kind = self._kind(gguf_name)
        if kind == "transpose_conv1d":
            return values.T
        if kind == "norm_minus_one":
            return values.float() - 1  # in float32, as transformers does, before any rounding to the model dtype
        return values

    def release(self, name: str) -> None:
        info = self.tensors.get(name)
        if info is not None and info.nbytes:
            start = info.offset - info.offset % mmap.PAGESIZE
            self._mapping.madvise(mmap.MADV_DONTNEED, start, info.offset + info.nbytes - start)
