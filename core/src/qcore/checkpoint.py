"""Reading checkpoints safely: safetensors headers, shard indexes and streaming tensors.

Used before phase 1 (``validate`` sees the checkpoint's keys and shapes from headers alone) and during phase 4
(``load_weight`` receives the tensors this reader streams, shard by shard). Every header is parsed and checked by
hand before safetensors touches the file, so a malformed or hostile file gives a :class:`CheckpointError` naming the
file and tensor, never a crash or a read outside the file. Nothing here unpickles; pickle checkpoints are refused
unless the caller opts in, and then go through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qcore.errors import CheckpointError

__all__ = ["CheckpointReader", "TensorInfo", "read_header"]

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt")

#: safetensors dtype -> bytes per element (the format's own table).
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
#: safetensors refuses a header over 100 MB; a larger claim is a corrupt or hostile file.
MAX_HEADER_BYTES = 100_000_000
#: safetensors computes sizes in 64-bit integers and refuses a shape whose element or bit count overflows them.
_SIZE_LIMIT = 2**64


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor as its header describes it."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    #: Where the tensor's bytes start in the file (after the header); -1 for tensors of pickle files.
    offset: int = -1

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and check a safetensors header: tensor infos and the ``__metadata__`` dict.

    The checks are those safetensors itself makes when it opens the file, so a file this accepts also opens there
    and the load cannot fail half-way on a malformed file.

    :raises CheckpointError: truncated file, header length past the end, header not JSON, unknown dtype, offsets
        out of range, overlapping, leaving gaps or not matching dtype x shape.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError(
                    f"truncated: {len(prefix)} bytes, shorter than the 8-byte header length; download it again",
                    file=str(path),
                )
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise CheckpointError(
                    f"header length {header_len} runs past the end of the {size}-byte file; the file is truncated "
                    f"or not safetensors: download it again",
                    file=str(path),
                )
            raw = handle.read(header_len)
    except OSError as error:
        raise CheckpointError(f"cannot read: {error}", file=str(path)) from error
    header = _parse_json(path, raw)
    if not isinstance(header, dict):
        raise CheckpointError("header is not a JSON object; the file is corrupt: download it again", file=str(path))
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(
            "__metadata__ must map strings to strings; the file is corrupt: download it again", file=str(path)
        )
    data_len = size - 8 - header_len
    infos = {name: _tensor_info(path, name, entry, data_len, 8 + header_len) for name, entry in header.items()}
    _check_layout(path, header, data_len)
    return infos, metadata


class _NotStrictJSON(ValueError):
    """JSON that Python accepts but safetensors' strict parser refuses."""


def _parse_json(path: Path, raw: bytes) -> Any:
    def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [key for key, _ in pairs]
        if len(set(keys)) != len(keys):
            raise _NotStrictJSON(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
        return dict(pairs)

    def finite(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise _NotStrictJSON(f"number {text} out of range")
        return value

    def constant(text: str) -> Any:
        raise _NotStrictJSON(f"{text} is not JSON")

    try:
        # Decoded as UTF-8 by hand: json.loads(bytes) would also take UTF-16/32 and a BOM, which safetensors refuses.
        text = raw.decode("utf-8")
        text.encode("utf-8")  # no lone surrogates from \u escapes either; safetensors refuses them
        return json.loads(text, object_pairs_hook=unique_keys, parse_float=finite, parse_constant=constant)
    except UnicodeError:
        reason = "it is not UTF-8"
    except RecursionError:
        reason = "it is nested too deeply"
    except ValueError as error:  # JSONDecodeError and _NotStrictJSON
        reason = str(error)
    raise CheckpointError(
        f"header is not valid JSON ({reason}); the file is corrupt: download it again", file=str(path)
    )


def _tensor_info(path: Path, name: str, entry: Any, data_len: int, data_start: int) -> TensorInfo:
    def fail(message: str) -> CheckpointError:
        return CheckpointError(
            f"{message}; the file is corrupt or was written by a broken tool: download it again (or export it again)",
            file=str(path),
            tensor=name,
        )

    if not isinstance(entry, dict):
        raise fail("header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise fail(f"unknown dtype {dtype!r} (known: {', '.join(DTYPE_SIZES)})")
    if not isinstance(shape, list) or not all(_is_size(d) for d in shape):
        raise fail(f"shape {shape!r} is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_size(o) for o in offsets):
        raise fail(f"data_offsets {offsets!r} is not a pair of non-negative integers")
    elements = 1
    for dim in shape:
        elements *= dim
        if elements >= _SIZE_LIMIT:
            raise fail(f"shape {shape} has more elements than a 64-bit size can count")
    if elements * DTYPE_SIZES[dtype] * 8 >= _SIZE_LIMIT:
        raise fail(f"shape {shape} of {dtype} has more bits than a 64-bit size can count")
    begin, end = offsets
    if not begin <= end <= data_len:
        raise fail(f"data_offsets {offsets} out of range of the {data_len}-byte data section (a truncated file?)")
    info = TensorInfo(name, path, dtype, tuple(shape), data_start + begin)
    if end - begin != info.nbytes:
        raise fail(f"data_offsets span {end - begin} bytes but {dtype} x {shape} needs {info.nbytes}")
    return info


def _is_size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _SIZE_LIMIT


def _check_layout(path: Path, header: dict[str, Any], data_len: int) -> None:
    """Tensors must tile the data section: in offset order, each begins where the previous ended, the last at the end.

    An overlap would let two tensors alias one another's bytes, and a gap or trailing bytes is data no tensor
    accounts for; safetensors refuses both, so refusing them here keeps its refusal from surfacing mid-load.
    """
    spans = sorted((tuple(entry["data_offsets"]), name) for name, entry in header.items())
    covered, previous = 0, None
    for (begin, end), name in spans:
        if begin < covered:
            raise CheckpointError(
                f"overlaps tensor {previous!r}; the file is corrupt: download it again", file=str(path), tensor=name
            )
        if begin > covered:
            raise CheckpointError(
                f"leaves bytes {covered}..{begin} of the data section unused before it; the file is corrupt: "
                f"download it again",
                file=str(path),
                tensor=name,
            )
        covered, previous = end, name
    if covered != data_len:
        raise CheckpointError(
            f"the data section has {data_len - covered} bytes past the last tensor; the file is corrupt: "
            f"download it again",
            file=str(path),
        )


class CheckpointReader:
    """The weight files of one checkpoint directory, checked from their headers, streamed shard by shard."""

    def __init__(self, directory: str | os.PathLike[str], *, allow_pickle: bool = False):
        self.directory = Path(directory)
        self.allow_pickle = allow_pickle
        self.tensors: dict[str, TensorInfo] = {}
        #: file -> its private mapping, while :meth:`stream` runs.
        self._mappings: dict[Path, Any] = {}
        self.metadata: dict[str, str] = {}
        self.files = self._weight_files()
        if self.files and self.files[0].suffix == ".safetensors":
            self._read_headers()

    # -- files -----------------------------------------------------------------------------------------

    def _weight_files(self) -> list[Path]:
        index = self.directory / SAFE_INDEX_NAME
        if index.is_file():
            return self._shards_from_index(index)
        single = self.directory / SAFE_WEIGHTS_NAME
        if single.is_file():
            return [self._inside(SAFE_WEIGHTS_NAME, single)]
        pickled = [
            self._inside(name, self.directory / name) for name in PICKLE_NAMES if (self.directory / name).is_file()
        ]
        if pickled:
            if not self.allow_pickle:
                raise CheckpointError(
                    "only pickle weights found; qcore refuses pickle by default because unpickling a file from a "
                    "stranger can run arbitrary code. Convert it to safetensors, or pass allow_pickle=True to load "
                    "it with torch.load(weights_only=True)",
                    file=str(pickled[0]),
                )
            return pickled
        raise CheckpointError(
            f"no weights found (looked for {SAFE_WEIGHTS_NAME}, {SAFE_INDEX_NAME} and {', '.join(PICKLE_NAMES)})",
            file=str(self.directory),
        )

    def _shards_from_index(self, index: Path) -> list[Path]:
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as error:
            raise CheckpointError(
                f"not a valid shard index ({type(error).__name__}: {error}); download it again", file=str(index)
            ) from None
        if not (isinstance(weight_map, dict) and weight_map and all(isinstance(v, str) for v in weight_map.values())):
            raise CheckpointError(
                "weight_map must map tensor names to shard file names (and list at least one); download it again",
                file=str(index),
            )
        self.weight_map = weight_map
        return [self._inside(name, index) for name in dict.fromkeys(weight_map.values())]

    def _inside(self, name: str, listed_in: Path) -> Path:
        """The path of weight file ``name``, refusing any name or symlink that leaves the checkpoint directory.

        A hostile index (or archive) could otherwise make the loader read any file the user can read, such as a
        private key, as weights. The one place a symlink may lead is the Hugging Face cache's ``blobs`` directory
        beside a ``snapshots/<revision>`` checkpoint, where the hub keeps the files it downloaded.
        """
        if os.path.isabs(name) or ".." in Path(name).parts or "\\" in name or "\0" in name:
            raise CheckpointError(
                f"weight file name {name!r} points outside the checkpoint directory (path traversal); refusing to "
                f"read it. Only names inside the directory are allowed: fix the index",
                file=str(listed_in),
            )
        path = self.directory / name
        try:
            root, target = self.directory.resolve(), path.resolve()
        except (OSError, RuntimeError) as error:  # RuntimeError: a symlink loop
            raise CheckpointError(f"weight file {name!r} cannot be resolved ({error})", file=str(path)) from None
        allowed = [root]
        if root.parent.name == "snapshots":
            allowed.append(root.parent.parent / "blobs")
        if not any(target.is_relative_to(place) for place in allowed):
            raise CheckpointError(
                f"weight file {name!r} is a symlink leaving the checkpoint directory (to {target}); refusing to "
                f"follow it (path traversal). Copy the file into the directory if you trust it",
                file=str(listed_in),
            )
        if not path.is_file():
            raise CheckpointError(
                f"weight file {name!r} listed in {listed_in.name} is missing; download it again", file=str(path)
            )
        return path

    def _read_headers(self) -> None:
        for file in self.files:
            infos, metadata = read_header(file)
            for name, info in infos.items():
                if name in self.tensors:
                    raise CheckpointError(
                        f"tensor appears in two shards ({self.tensors[name].file.name} and {file.name})",
                        file=str(file),
                        tensor=name,
                    )
                self.tensors[name] = info
            self.metadata.update(metadata)
        for name, shard in getattr(self, "weight_map", {}).items():
            info = self.tensors.get(name)
            if info is None or info.file != self.directory / shard:
                raise CheckpointError(
                    f"the index maps this tensor to {shard!r}, which does not hold it; the index is stale or corrupt",
                    file=str(self.directory / SAFE_INDEX_NAME),
                    tensor=name,
                )

    # -- reading ---------------------------------------------------------------------------------------

    @property
    def is_pickle(self) -> bool:
        return self.files[0].suffix != ".safetensors"

    def total_nbytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())

    def largest_nbytes(self) -> int:
        return max((info.nbytes for info in self.tensors.values()), default=0)

    def stream(self, names: set[str] | None = None) -> Iterator[tuple[str, Any]]:
        """Yield ``(name, tensor)`` for every tensor (or those in ``names``), in file order, shard by shard.

        Tensors are copy-on-write views of the file (as transformers loads them): nothing is copied, a page is read
        when first touched, and a change made in place never reaches the file. A tensor a backend converts should be
        handed to :meth:`release` once converted, or the pages its conversion touched stay resident until the whole
        shard is unmapped. A reader thread asks the kernel to read the next tensor ahead while this one is
        converted. A tensor whose offset does not fit its dtype (after odd-sized ones) is read into memory instead.
        """
        if self.is_pickle:
            yield from self._stream_pickle(names)
            return
        wanted = [
            info
            for file in self.files
            for info in sorted((i for i in self.tensors.values() if i.file == file), key=lambda i: i.offset)
            if names is None or info.name in names
        ]
        try:
            yield from _read_ahead(wanted, self._mappings)
        finally:
            self._mappings.clear()  # the tensors still viewing a mapping keep it alive

    def release(self, name: str) -> None:
        """Drop the pages of tensor ``name`` from this process: it was converted and its stored form is not needed.

        Safe even if something still views it: the mapping is private and unwritten, so a later touch reads the
        pages from the file again.
        """
        info = self.tensors.get(name)
        mapping = self._mappings.get(info.file) if info is not None else None
        if mapping is not None and info.nbytes:
            start = info.offset - info.offset % mmap.PAGESIZE
            mapping.madvise(mmap.MADV_DONTNEED, start, info.offset + info.nbytes - start)

    def _stream_pickle(self, names: set[str] | None) -> Iterator[tuple[str, Any]]:

        for file in self.files:
            if file.name.endswith(".json"):
                raise CheckpointError(
                    "sharded pickle checkpoints are not supported; convert to safetensors", file=str(file)
                )
            state = _torch_load(file)
            for name, tensor in state.items():
                self.tensors.setdefault(
                    name, TensorInfo(name, file, _SAFETENSORS_DTYPE[str(tensor.dtype)], tuple(tensor.shape))
                )
                if names is None or name in names:
                    yield name, tensor

    def load_pickle_infos(self) -> None:
        """Fill :attr:`tensors` for a pickle checkpoint (needs one pass over the file)."""
        if self.is_pickle and not self.tensors:
            for _ in self._stream_pickle(set()):
                pass


def _torch_load(file: Path) -> dict[str, Any]:
    """A pickle checkpoint's state dict, unpickled by ``torch.load(weights_only=True)``: tensors and plain data only.

    weights_only refuses any pickle that would import or call something (a hostile ``__reduce__``), and every other
    way an untrusted file can fail is reported as a :class:`CheckpointError` naming it, never torch's own exception.
    """
    import pickle
    import zipfile

    import torch

    try:
        # mmap keeps only the tensor in hand resident; files in torch's legacy (pre-1.6) format cannot be mapped.
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except pickle.UnpicklingError as error:
        # Only torch's one-line diagnosis is kept: the rest of its message suggests weights_only=False.
        detail = str(error).partition("WeightsUnpickler error:")[2].strip().split("\n")[0] or type(error).__name__
        if "global" in detail.lower():
            raise CheckpointError(
                f"refused by torch.load(weights_only=True): the pickle asks to import and call code, not just to "
                f"rebuild tensors ({detail}). qcore never runs it, even with allow_pickle=True; ask the publisher for "
                f"safetensors weights",
                file=str(file),
            ) from None
        raise CheckpointError(
            f"cannot be read by torch.load(weights_only=True) ({detail}); the file is corrupt or not a PyTorch "
            f"checkpoint: download it again or convert it to safetensors",
            file=str(file),
        ) from None
    except Exception as error:  # an untrusted file can break torch.load in many ways; report each as corrupt
        raise CheckpointError(
            f"cannot be read by torch.load ({type(error).__name__}: {error}); the file is corrupt or not a PyTorch "
            f"checkpoint: download it again or convert it to safetensors",
            file=str(file),
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(
            "is not a plain state dict (tensor name -> tensor); save model.state_dict() alone, or convert to "
            "safetensors",
            file=str(file),
        )
    unknown = [name for name, tensor in state.items() if str(tensor.dtype) not in _SAFETENSORS_DTYPE]
    if unknown:
        raise CheckpointError(
            f"dtype {state[unknown[0]].dtype} is not one qcore loads (known: {', '.join(_SAFETENSORS_DTYPE)})",
            file=str(file),
            tensor=unknown[0],
        )
    return state


def _read_ahead(infos: list[TensorInfo], mappings: dict[Path, Any]) -> Iterator[tuple[str, Any]]:
    """Hand out ``infos`` from a background thread that prefetches one tensor ahead of the consumer."""
    import queue
    import threading

    ready: queue.Queue[tuple[str, Any] | BaseException | None] = queue.Queue(maxsize=1)
    stop = threading.Event()

    def reader() -> None:
        file = handle = None
        try:
            for info in infos:
                if stop.is_set():
                    return
                if info.file != file:
                    if handle is not None:
                        handle.close()
                    file, handle = info.file, info.file.open("rb", buffering=0)
                    mappings[file] = _private_mapping(handle) if info.file.stat().st_size else None
                mapping = mappings[file]
                if mapping is not None and info.nbytes and info.offset % DTYPE_SIZES[info.dtype] == 0:
                    start = info.offset - info.offset % mmap.PAGESIZE
                    mapping.madvise(mmap.MADV_WILLNEED, start, info.offset + info.nbytes - start)
                    ready.put((info.name, _mapped_tensor(mapping, info)))
                else:
                    ready.put((info.name, _read_tensor(handle, info)))
            ready.put(None)
        except BaseException as error:  # handed to the consumer, which re-raises it in its own thread
            ready.put(error)
        finally:
            if handle is not None:
                handle.close()

    thread = threading.Thread(target=reader, name="qcore-checkpoint-reader", daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a reader waiting to hand over its next tensor
            try:
                ready.get(timeout=0.05)
            except queue.Empty:
                pass
        thread.join()


def _private_mapping(handle: Any) -> Any:
    """A copy-on-write mapping of the whole file: an in-place change to a parameter never reaches the file.

    The tensors viewing it hold it; it is unmapped when the last of them is freed. A view is only as aligned as its
    offset in the file (as with transformers' own loading); a kernel that needs more alignment copies the tensor
    (qcore-eetq does).
    """
    import mmap

    return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)


def _mapped_tensor(mapping: Any, info: TensorInfo) -> Any:
    import torch

    dtype = getattr(torch, _TORCH_DTYPE_NAMES[info.dtype])
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=dtype)
    flat = torch.frombuffer(mapping, dtype=torch.uint8, count=info.nbytes, offset=info.offset)
    return flat.view(dtype).reshape(info.shape)


def _read_tensor(handle: Any, info: TensorInfo) -> Any:
    import torch

    dtype = getattr(torch, _TORCH_DTYPE_NAMES[info.dtype])
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=dtype)
    # An anonymous mapping of its own, not the allocator's heap: it goes back to the system the moment the tensor is
    # dropped, where a heap buffer allocated in this reader thread would stay cached in the thread's malloc arena.
    buffer = mmap.mmap(-1, info.nbytes)
    view, done = memoryview(buffer), 0
    try:
        while done < info.nbytes:
            count = os.preadv(handle.fileno(), [view[done:]], info.offset + done)
            if count <= 0:
                raise CheckpointError(
                    f"file ended after {done} of {info.nbytes} bytes; it changed since its header was checked: "
                    f"download it again",
                    file=str(info.file),
                    tensor=info.name,
                )
            done += count
    finally:
        view.release()
    return torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).reshape(info.shape)


_SAFETENSORS_DTYPE = {
    "torch.float64": "F64", "torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16",
    "torch.int64": "I64", "torch.int32": "I32", "torch.int16": "I16", "torch.int8": "I8", "torch.uint8": "U8",
    "torch.uint64": "U64", "torch.uint32": "U32", "torch.uint16": "U16", "torch.bool": "BOOL",
    "torch.float8_e4m3fn": "F8_E4M3", "torch.float8_e5m2": "F8_E5M2", "torch.float8_e8m0fnu": "F8_E8M0",
}  # fmt: skip

#: safetensors dtype -> name of the torch dtype its bytes are viewed as.
_TORCH_DTYPE_NAMES = {code: name.removeprefix("torch.") for name, code in _SAFETENSORS_DTYPE.items()}


def torch_dtype_name(code: str) -> str:
    """The torch dtype name (``"bfloat16"``) of a safetensors dtype code (``"BF16"``)."""
    return _TORCH_DTYPE_NAMES[code]
