"""Hostile and damaged copies of a saved checkpoint, for the conformance suite's integrity tests.

Everything here works on the saved files themselves (the safetensors header and bytes, config.json), not on any
backend's format, so the same tests apply to every backend: each stored tensor of one quantized module is rewritten
in the ways a damaged or tampered file differs from a good one (:func:`corruptions`), and each string a checkpoint
carries, in config.json, in the safetensors metadata or encoded in a tensor, is replaced by a Python expression with
a side effect (:func:`string_fields`). Running ``python -m qcore.testing.hostile DIR...`` loads each checkpoint
directory in turn and prints one JSON line per outcome, so a test can run loads that might crash the process in a
child process.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import struct
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from qcore.checkpoint import DTYPE_SIZES, read_header

__all__ = ["Stored", "stored_tensors", "write_copy", "corruptions", "string_fields", "payload", "digest"]

#: A dtype of the other kind (integer <-> floating) and the same width, for the "wrong dtype" corruption.
_OTHER_KIND = {
    "F64": "I64", "F32": "I32", "F16": "I16", "BF16": "I16", "F8_E4M3": "I8", "F8_E5M2": "I8", "F8_E8M0": "U8",
    "I64": "F64", "U64": "F64", "I32": "F32", "U32": "F32", "I16": "F16", "U16": "F16", "I8": "U8", "U8": "I8",
    "BOOL": "U8",
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Stored:
    """One tensor as a safetensors file stores it: name, dtype code, shape and raw bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: bytes

    @classmethod
    def of(cls, name: str, tensor: Any) -> Stored:
        """A torch tensor as it would be stored under ``name``."""
        import torch

        from qcore.checkpoint import _SAFETENSORS_DTYPE

        flat = tensor.detach().cpu().contiguous().reshape(-1)
        data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
        return cls(name, _SAFETENSORS_DTYPE[str(tensor.dtype)], tuple(tensor.shape), data)

    @property
    def text(self) -> str | None:
        """The string a 1-D uint8 tensor of printable ASCII encodes (how backends store strings), else ``None``."""
        if self.dtype != "U8" or len(self.shape) != 1 or not self.data:
            return None
        if not all(0x20 <= byte < 0x7F for byte in self.data):
            return None
        return self.data.decode("ascii")

    @property
    def json(self) -> Any:
        """The JSON object or array the tensor's string holds, else ``None``."""
        text = self.text
        if text is None or text[:1] not in "{[":
            return None
        try:
            return json.loads(text)
        except ValueError:
            return None


def stored_tensors(file: Path) -> tuple[list[Stored], dict[str, str]]:
    """Every tensor of a safetensors file, in file order, and its ``__metadata__``."""
    infos, metadata = read_header(file)
    raw = file.read_bytes()
    ordered = sorted(infos.values(), key=lambda info: info.offset)
    return [Stored(i.name, i.dtype, i.shape, raw[i.offset : i.offset + i.nbytes]) for i in ordered], metadata


def write_copy(
    source: Path,
    destination: Path,
    replace: Mapping[str, Stored | None] | None = None,
    *,
    metadata: Mapping[str, str] | None = None,
    config: Mapping[str, Any] | None = None,
) -> Path:
    """Copy checkpoint directory ``source`` to ``destination`` with some tensors, the metadata or config.json changed.

    ``replace`` maps a tensor name to its new form, or to ``None`` to delete it; a name no file holds is added to the
    last file. Each replaced tensor moves to the end of its file, where a read past its end leaves the file's mapping
    (the case in which a backend's kernel trusting a wrong size crashes instead of reading a neighbour's bytes).
    """
    shutil.copytree(source, destination)
    replace = dict(replace or {})
    files = sorted(destination.glob("*.safetensors"))
    contents = {file: stored_tensors(file) for file in files}
    present = {tensor.name for tensors, _ in contents.values() for tensor in tensors}
    for file, (tensors, stored_metadata) in contents.items():
        # A name no file holds is added to the last file.
        wanted = {t.name for t in tensors} | (replace.keys() - present if file == files[-1] else set())
        if not wanted & replace.keys() and metadata is None:
            continue
        kept = [tensor for tensor in tensors if tensor.name not in replace]
        moved = [new for name, new in replace.items() if name in wanted and new is not None]
        _write(file, kept + moved, metadata or stored_metadata)
    if config is not None:
        (destination / "config.json").write_text(json.dumps(config, indent=2))
    return destination


def _write(file: Path, tensors: list[Stored], metadata: Mapping[str, str]) -> None:
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for tensor in tensors:
        header[tensor.name] = {
            "dtype": tensor.dtype,
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(tensor.data)],
        }
        offset += len(tensor.data)
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # safetensors pads its header to 8 bytes
    file.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(tensor.data for tensor in tensors))


def corruptions(tensor: Stored) -> Iterator[tuple[str, Stored]]:
    """``(what was done, damaged tensor)`` for each way a damaged or tampered file can differ in this tensor.

    Truncated, cut to one element, given an extra dimension, stored with a dtype of the other kind (same bytes), and,
    for a tensor holding a string or JSON, garbage text and each JSON field given a value of another type. A case that
    would leave the tensor unchanged is left out.
    """
    size = DTYPE_SIZES[tensor.dtype]
    count = math.prod(tensor.shape)
    seen = {(tensor.dtype, tensor.shape, tensor.data)}

    def case(label: str, dtype: str, shape: tuple[int, ...], data: bytes) -> Iterator[tuple[str, Stored]]:
        if (dtype, shape, data) not in seen:
            seen.add((dtype, shape, data))
            yield label, Stored(tensor.name, dtype, shape, data)

    if count > 1:
        dim = next(i for i, d in enumerate(tensor.shape) if d > 1)
        shape = tensor.shape[:dim] + (tensor.shape[dim] // 2,) + tensor.shape[dim + 1 :]
        yield from case("truncated to half", tensor.dtype, shape, tensor.data[: math.prod(shape) * size])
    else:
        yield from case("truncated to nothing", tensor.dtype, (0,), b"")
    if count:
        yield from case("cut to one element", tensor.dtype, (1,), tensor.data[:size])
    yield from case("given an extra dimension", tensor.dtype, (1, *tensor.shape), tensor.data)
    yield from case(f"stored as {_OTHER_KIND[tensor.dtype]}", _OTHER_KIND[tensor.dtype], tensor.shape, tensor.data)
    if tensor.text is not None:
        garbage = (b"#garbage!" * (len(tensor.data) // 9 + 1))[: len(tensor.data)]
        yield from case("garbage text", tensor.dtype, tensor.shape, garbage)
    document = tensor.json
    if isinstance(document, dict):
        for key, value in document.items():
            other: Any = "garbage" if not isinstance(value, str) else 12345
            data = json.dumps({**document, key: other}).encode()
            yield from case(f"JSON field {key!r} of the wrong type", "U8", (len(data),), data)


def payload(marker: Path) -> str:
    """A Python expression whose evaluation creates ``marker``: what a hostile checkpoint would put in a string."""
    return f"__import__('pathlib').Path({str(marker)!r}).touch()"


def string_fields(
    config: Mapping[str, Any], metadata: Mapping[str, str], tensors: list[Stored], expression: str
) -> Iterator[tuple[str, dict[str, Any] | None, dict[str, str] | None, Stored | None]]:
    """Every string of a checkpoint replaced by ``expression``, one at a time: ``(where, config, metadata, tensor)``.

    Each item changes exactly one string and gives the changed config.json, metadata or tensor (the others
    ``None``): each string value in config.json (nested ones and list items included), each metadata value, each
    tensor that encodes a string (wholly) and each string inside a tensor's JSON.
    """
    for path, changed in _replaced_strings(config, expression):
        yield f"config.json {path}", changed, None, None
    for key in metadata:
        yield f"metadata {key!r}", None, {**metadata, key: expression}, None
    for tensor in tensors:
        if tensor.text is None:
            continue
        data = expression.encode()
        yield f"tensor {tensor.name}", None, None, Stored(tensor.name, "U8", (len(data),), data)
        for path, changed in _replaced_strings(tensor.json, expression):
            data = json.dumps(changed).encode()
            yield f"tensor {tensor.name} JSON {path}", None, None, Stored(tensor.name, "U8", (len(data),), data)


def _replaced_strings(value: Any, expression: str, path: str = "") -> Iterator[tuple[str, Any]]:
    """``(path, a copy of value with the string at path replaced)`` for every string in a JSON value."""
    if isinstance(value, str):
        yield path or "(the value)", expression
    elif isinstance(value, Mapping):
        for key, item in value.items():
            for where, changed in _replaced_strings(item, expression, f"{path}.{key}" if path else key):
                yield where, {**value, key: changed}
    elif isinstance(value, list):
        for index, item in enumerate(value):
            for where, changed in _replaced_strings(item, expression, f"{path}[{index}]"):
                yield where, [*value[:index], changed, *value[index + 1 :]]


def digest(tensor: Any) -> str:
    """A short fingerprint of a tensor's exact values, to compare logits across processes."""
    import hashlib

    return hashlib.sha256(tensor.float().cpu().numpy().tobytes()).hexdigest()[:16]


def _load_each(directories: list[str]) -> None:
    """Load each checkpoint directory and run it once; print ``{"case", "outcome", "message", "digest"}`` for each.

    ``outcome`` is ``"loaded"`` (with the :func:`digest` of the logits), or the name of the exception the load
    raised. A line ``{"case", "started": true}``
    comes first, so a reader can name the case that killed the process.
    """
    import qcore
    from qcore.testing.models import logits

    for directory in directories:
        case = Path(directory).name
        print(json.dumps({"case": case, "started": True}), flush=True)
        try:
            outcome, message, result = "loaded", "", digest(logits(qcore.from_pretrained(directory)))
        except Exception as error:  # the caller judges every outcome; this process only reports it
            outcome, message, result = type(error).__name__, str(error), None
        print(json.dumps({"case": case, "outcome": outcome, "message": message, "digest": result}), flush=True)


if __name__ == "__main__":
    _load_each(sys.argv[1:])
