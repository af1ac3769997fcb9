"""Reading checkpoints safely: the :class:`CheckpointSource` interface and its two built-in providers.

A :class:`CheckpointSource` describes every tensor of a checkpoint (name, stored type, shape, bytes) before any
tensor data is read, then streams the tensors one at a time or reads them at random. The loader uses it before phase
1 (``validate`` and the fit check see names and shapes from headers alone) and during phase 4 (``load_weight``
receives the tensors it streams; a calibrating load reads them block by block). :func:`open_checkpoint` picks the
provider: :class:`CheckpointReader` for safetensors, :class:`PickleReader` for ``.bin``/``.pt`` files only when the
caller opts in, or a reader a plugin declares for its container's suffix (``Backend.readers``, e.g. ``.gguf``).

Every safetensors header is parsed and checked by hand before safetensors touches the file, so a malformed or
hostile file gives a :class:`CheckpointError` naming the file and tensor, never a crash or a read outside the file.
Every weight file name, whichever provider reads it, is checked to stay inside the checkpoint directory. Nothing
here unpickles; pickle checkpoints are refused unless the caller opts in, and then go through
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import math
import mmap
import os
import struct
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qcore.errors import CheckpointError

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig

__all__ = ["CheckpointSource", "CheckpointReader", "PickleReader", "TensorInfo", "open_checkpoint", "read_header"]

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
    """One tensor as its header describes it: ``TensorInfo(name, file, dtype, shape, offset=-1, nbytes=-1)``.

    ``name`` is in the transformers model's naming; ``dtype`` the stored type, a safetensors code (``"F32"``,
    ``"BF16"``, ``"I8"``) or a container's own type name (GGUF's ``"Q4_K"``), for which ``nbytes`` (the bytes stored)
    must be given; ``shape`` the logical shape, that of the model's tensor, whatever layout the file uses;
    ``offset`` where its bytes start in ``file`` (-1 when the format has no such notion).
    """

    #: The tensor's name in the transformers model's naming (``model.layers.0.self_attn.q_proj.weight``).
    name: str
    file: Path
    #: The stored type: a safetensors dtype code (``"F32"``, ``"BF16"``, ``"I8"``) for a plain tensor, or the
    #: container's own type name (GGUF's ``"Q4_K"``) for one only its reader or backend can decode.
    dtype: str
    #: The logical shape: that of the model's tensor, whatever layout the container stores it in.
    shape: tuple[int, ...]
    #: Where the tensor's bytes start in the file (after the header); -1 for tensors of pickle files.
    offset: int = -1
    #: Bytes the tensor takes in the file; worked out from ``dtype`` x ``shape`` for a plain dtype, given by the
    #: reader for a container's own types.
    nbytes: int = -1

    def __post_init__(self) -> None:
        if self.nbytes < 0:
            if self.dtype not in DTYPE_SIZES:
                raise ValueError(f"TensorInfo {self.name!r}: {self.dtype!r} is not a safetensors dtype; give nbytes")
            object.__setattr__(self, "nbytes", math.prod(self.shape) * DTYPE_SIZES[self.dtype])

    @property
    def is_plain(self) -> bool:
        """Whether the stored type is a plain torch dtype (else :meth:`CheckpointSource.to_plain` decodes it)."""
        return self.dtype in DTYPE_SIZES


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


class CheckpointSource(abc.ABC):
    """The tensors of one checkpoint: every tensor described before any is read, then streamed or read at random.

    The loader asks nothing else of a checkpoint, so a container format is added by writing one subclass and
    declaring it in ``Backend.readers`` (suffix -> a factory taking the file's path). Providers:
    :class:`CheckpointReader` (safetensors), :class:`PickleReader` (``.bin``/``.pt``, opt-in), and those plugins
    declare.

    A provider must, in its constructor, read and check every header, offset, size and type against the file's
    length, raising :class:`~qcore.CheckpointError` naming the file and tensor, so that a malformed or hostile file
    is refused before ``validate``, the fit check and the memory guard run, and never fails half-way through a
    load or allocates what a header claims without checking it. Nothing it reads may reach ``eval``, ``exec``,
    ``pickle`` or an import.
    """

    #: The checkpoint's directory: tokenizer files and generation_config.json are looked for there.
    directory: Path
    #: The weight files, in the order :meth:`stream` reads them.
    files: list[Path]
    #: Tensor name, in the transformers model's naming -> what is stored for it; in the order :meth:`stream` yields.
    tensors: dict[str, TensorInfo]
    #: Checkpoint-level ``str -> str`` entries (the safetensors ``__metadata__`` of every shard, merged).
    metadata: dict[str, str]
    #: Hand out copy-on-write views of the files (True) instead of tensors read into memory of their own (False,
    #: the loader's default: ``from_pretrained(mmap_weights=...)``). A view kept by the loaded model reads the file
    #: for as long as the model lives, so a file rewritten in place changes the model's weights and a truncated one
    #: kills the process with SIGBUS at the next touch; a tensor of its own cannot be changed from outside. A
    #: provider that cannot map (pickle) ignores it.
    mapped: bool = False

    @abc.abstractmethod
    def read(self, name: str) -> torch.Tensor:
        """Tensor ``name``, read at random: a plain tensor of its logical shape when :attr:`TensorInfo.is_plain`,
        else the container's stored form (which :meth:`to_plain` or the owning backend decodes).

        :raises CheckpointError: the file changed since its header was checked (a short read).
        """

    def stream(self, names: Collection[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` for every tensor, or for those in ``names``, one at a time, as :meth:`read` gives
        them. A provider overrides this to read ahead or in file order; the default reads them in :attr:`tensors`
        order."""
        for name in self.tensors:
            if names is None or name in names:
                yield name, self.read(name)

    def release(self, name: str) -> None:  # noqa: B027 (optional, with a default that does nothing)
        """Tensor ``name`` was converted and its stored bytes are not needed in memory any more (a hint: a memory-
        mapping provider drops the pages; the default does nothing)."""

    def model_config(self) -> PretrainedConfig | None:
        """The transformers config a container carries (GGUF does), or ``None`` to read ``config.json`` from
        :attr:`directory`. A container whose tensors stay quantized sets ``quantization_config`` on it, naming the
        ``quant_method`` of the backend that reads them, so the load runs as a pre-quantized one."""
        return None

    def to_plain(self, name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A tensor of a container's own type (``not tensors[name].is_plain``), decoded to a ``dtype`` tensor of its
        logical shape; the loader calls it for tensors no backend takes (embeddings, norms).

        ``dtype`` is the dtype the model holds the tensor in (its skeleton slot's: the model dtype for a floating
        one). A provider decodes straight into it, a slice at a time, so that a large embedding never exists as a
        float32 copy on its way to bfloat16. The default refuses."""
        raise CheckpointError(
            f"stored as {self.tensors[name].dtype}, which {type(self).__name__} cannot decode to a plain tensor",
            file=str(self.tensors[name].file),
            tensor=name,
        )

    def total_nbytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())

    def largest_nbytes(self) -> int:
        return max((info.nbytes for info in self.tensors.values()), default=0)


#: A plugin's reader, as ``Backend.readers`` declares it: called with the path of a weight file of its suffix.
ReaderFactory = Callable[[Path], CheckpointSource]


def open_checkpoint(
    path: str | os.PathLike[str],
    *,
    weights_file: str | None = None,
    allow_pickle: bool = False,
    readers: Mapping[str, tuple[str, ReaderFactory]] | None = None,
) -> CheckpointSource:
    """The :class:`CheckpointSource` for a checkpoint directory or a single weight file.

    In a directory, in this order: a safetensors index, ``model.safetensors``, then pickle files (refused unless
    ``allow_pickle``), then the one file whose suffix an installed plugin reads (``.gguf``). ``weights_file`` (or
    ``path`` naming a file) picks one file in the directory instead.

    :param readers: suffix -> (plugin distribution, factory); by default those of the installed plugins.
    :raises CheckpointError: no weights, pickle not allowed, several candidate files, a file name leaving the
        directory, or no installed plugin reading the file's suffix (naming the one to install).
    """
    from qcore.errors import PluginError, QcoreError

    path = Path(path)
    directory = path if path.is_dir() else path.parent
    if not path.is_dir():
        weights_file = path.name
    if readers is None:
        from qcore.plugins import readers as installed_readers

        readers = installed_readers()
    if weights_file is None:
        if (directory / SAFE_INDEX_NAME).is_file() or (directory / SAFE_WEIGHTS_NAME).is_file():
            return CheckpointReader(directory)
        pickled = [name for name in PICKLE_NAMES if (directory / name).is_file()]
        if pickled:
            return _open_pickle(directory, pickled[0], allow_pickle)
        found = sorted(p.name for p in directory.iterdir() if p.is_file() and _suffix(p.name) in readers)
        if len(found) > 1:
            raise CheckpointError(
                f"holds several weight files ({', '.join(found)}); pick one with gguf_file=NAME (--gguf-file on the "
                f"command line) or pass the file's path",
                file=str(directory),
            )
        if not found:
            for name in (SAFE_INDEX_NAME, SAFE_WEIGHTS_NAME, *PICKLE_NAMES):
                _check_regular(directory / name)
            raise CheckpointError(
                f"no weights found (looked for {SAFE_WEIGHTS_NAME}, {SAFE_INDEX_NAME}, {', '.join(PICKLE_NAMES)}"
                + "".join(f", *{suffix}" for suffix in sorted(readers))
                + ")",
                file=str(directory),
            )
        weights_file = found[0]
    file = weight_file(directory, weights_file, directory)
    suffix = _suffix(file.name)
    if suffix == ".safetensors":
        return CheckpointReader(directory, file=file.name)
    if file.name in PICKLE_NAMES or suffix in (".bin", ".pt", ".pth"):
        return _open_pickle(directory, file.name, allow_pickle)
    if suffix not in readers:
        from qcore.plugins import KNOWN_READERS

        hint = f"pip install {KNOWN_READERS[suffix]}" if suffix in KNOWN_READERS else "install a qcore plugin for it"
        kind = f"{suffix} files" if suffix else "files without a suffix"
        raise CheckpointError(f"no installed qcore plugin reads {kind}; {hint}", file=str(file))
    distribution, factory = readers[suffix]
    try:
        source = factory(file)
    except QcoreError:
        raise
    except Exception as error:  # a reader's own bug, not the file's fault: name the plugin
        raise PluginError(distribution, "reader", file.name, error) from error
    if not isinstance(source, CheckpointSource):
        wrong = TypeError(f"returned {type(source).__name__}, not a qcore.checkpoint.CheckpointSource")
        raise PluginError(distribution, "reader", file.name, wrong)
    return source


def _suffix(name: str) -> str:
    return Path(name).suffix.lower()


def _open_pickle(directory: Path, name: str, allow_pickle: bool) -> PickleReader:
    if not allow_pickle:
        raise CheckpointError(
            "only pickle weights found; qcore refuses pickle by default because unpickling a file from a "
            "stranger can run arbitrary code. Convert it to safetensors, or pass allow_pickle=True to load "
            "it with torch.load(weights_only=True)",
            file=str(directory / name),
        )
    return PickleReader(directory, name)


def weight_file(directory: Path, name: str, listed_in: Path) -> Path:
    """The path of weight file ``name`` in ``directory``, refusing any name or symlink that leaves the directory.

    A hostile index (or archive) could otherwise make the loader read any file the user can read, such as a
    private key, as weights. The one place a symlink may lead is the Hugging Face cache's ``blobs`` directory
    beside a ``snapshots/<revision>`` checkpoint, where the hub keeps the files it downloaded. Every provider's
    files go through this check (:func:`open_checkpoint` applies it before a plugin's reader sees a path).
    """
    if os.path.isabs(name) or ".." in Path(name).parts or "\\" in name or "\0" in name:
        raise CheckpointError(
            f"weight file name {name!r} points outside the checkpoint directory (path traversal); refusing to "
            f"read it. Only names inside the directory are allowed: fix the index",
            file=str(listed_in),
        )
    path = directory / name
    try:
        root, target = directory.resolve(), path.resolve()
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
        _check_regular(path)
        listed = f" listed in {listed_in.name}" if listed_in != directory else ""
        raise CheckpointError(f"weight file {name!r}{listed} is missing; download it again", file=str(path))
    return path


def _check_regular(path: Path) -> None:
    """Refuse a weight file's name that exists but is not a regular file (never opened: a FIFO would block)."""
    import stat

    try:
        mode = path.stat().st_mode
    except OSError:  # absent, or a dangling symlink: the caller reports it as missing
        return
    kinds = {stat.S_ISDIR: "a directory", stat.S_ISFIFO: "a FIFO", stat.S_ISCHR: "a character device",
             stat.S_ISBLK: "a block device", stat.S_ISSOCK: "a socket"}  # fmt: skip
    kind = next((word for test, word in kinds.items() if test(mode)), None)
    if kind is not None:
        raise CheckpointError(
            f"exists but is not a regular file (it is {kind}); weights are read only from regular files: replace it "
            f"with the file itself",
            file=str(path),
        )


class CheckpointReader(CheckpointSource):
    """The safetensors files of one checkpoint directory, checked from their headers, streamed shard by shard."""

    def __init__(self, directory: str | os.PathLike[str], *, file: str | None = None):
        """Read and check the headers of ``directory``'s safetensors shards (its index, or ``model.safetensors``),
        or of the one file ``file`` names."""
        self.directory = Path(directory)
        self.tensors: dict[str, TensorInfo] = {}
        #: file -> its private mapping, from the first tensor read of the file for the reader's life.
        self._mappings: dict[Path, Any] = {}
        self.metadata: dict[str, str] = {}
        self.files = [weight_file(self.directory, file, self.directory)] if file else self._weight_files()
        self._read_headers()

    # -- files -----------------------------------------------------------------------------------------

    def _weight_files(self) -> list[Path]:
        index = self.directory / SAFE_INDEX_NAME
        if index.is_file():
            return self._shards_from_index(index)
        single = self.directory / SAFE_WEIGHTS_NAME
        if single.is_file():
            return [self._inside(SAFE_WEIGHTS_NAME, single)]
        raise CheckpointError(
            f"no safetensors weights found (looked for {SAFE_WEIGHTS_NAME} and {SAFE_INDEX_NAME})",
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
        return weight_file(self.directory, name, listed_in)

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
            for key, value in metadata.items():
                if self.metadata.get(key, value) != value:
                    raise CheckpointError(
                        f"__metadata__ entry {key!r} differs from the one in another shard; the shards come from "
                        f"different saves: download the checkpoint again",
                        file=str(file),
                    )
                self.metadata[key] = value
        for name, shard in getattr(self, "weight_map", {}).items():
            info = self.tensors.get(name)
            if info is None or info.file != self.directory / shard:
                raise CheckpointError(
                    f"the index maps this tensor to {shard!r}, which does not hold it; the index is stale or corrupt",
                    file=str(self.directory / SAFE_INDEX_NAME),
                    tensor=name,
                )

    # -- reading ---------------------------------------------------------------------------------------

    def stream(self, names: Collection[str] | None = None) -> Iterator[tuple[str, Any]]:
        """Yield ``(name, tensor)`` for every tensor (or those in ``names``), in file order, shard by shard.

        Tensors are copy-on-write views of the file (as transformers loads them): nothing is copied, a page is read
        when first touched, and a change made in place never reaches the file. A tensor a backend converts should be
        handed to :meth:`release` once converted, or the pages its conversion touched stay resident until the whole
        shard is unmapped. A reader thread asks the kernel to read the next tensor ahead while this one is
        converted. A tensor whose offset does not fit its dtype (after odd-sized ones) is read into memory instead.
        """
        wanted = [
            info
            for file in self.files
            for info in sorted((i for i in self.tensors.values() if i.file == file), key=lambda i: i.offset)
            if names is None or info.name in names
        ]
        # The mappings stay with the reader after the stream ends: a calibrating load releases a block's tensors
        # after streaming them, and release() needs the mapping to drop their pages.
        yield from _read_ahead(wanted, self._mappings if self.mapped else None)

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

    def read(self, name: str) -> Any:
        """Tensor ``name`` at random, as :meth:`stream` gives it: a copy-on-write view of its shard."""
        info = self.tensors[name]
        try:
            mapping = self._mappings.get(info.file)
            if mapping is None and info.file.stat().st_size and self.mapped:
                with info.file.open("rb", buffering=0) as handle:
                    mapping = self._mappings[info.file] = _private_mapping(handle)
            if mapping is not None and info.nbytes and info.offset % DTYPE_SIZES[info.dtype] == 0:
                return _mapped_tensor(mapping, info)
            with info.file.open("rb", buffering=0) as handle:
                return _read_tensor(handle, info)
        except OSError as error:
            raise CheckpointError(
                f"cannot be read ({type(error).__name__}: {error.strerror or error}); check its permissions or "
                f"download it again",
                file=str(info.file),
                tensor=name,
            ) from None


class PickleReader(CheckpointSource):
    """A ``pytorch_model.bin``/``model.pt`` checkpoint, read only when the caller opts in (``allow_pickle=True``).

    The file is unpickled by ``torch.load(weights_only=True, mmap=True)``, which refuses any pickle that would
    import or call code; it is read once here to describe its tensors and once more to stream them.
    """

    def __init__(self, directory: str | os.PathLike[str], name: str):
        self.directory = Path(directory)
        file = weight_file(self.directory, name, self.directory)
        if file.name.endswith(".json"):
            raise CheckpointError(
                "sharded pickle checkpoints are not supported; convert to safetensors", file=str(file)
            )
        self.files = [file]
        self.metadata: dict[str, str] = {}
        self.tensors = {
            key: TensorInfo(key, file, _SAFETENSORS_DTYPE[str(tensor.dtype)], tuple(tensor.shape))
            for key, tensor in _torch_load(file).items()
        }

    def stream(self, names: Collection[str] | None = None) -> Iterator[tuple[str, Any]]:
        for key, tensor in _torch_load(self.files[0]).items():
            if names is None or key in names:
                yield key, tensor

    def read(self, name: str) -> Any:
        return _torch_load(self.files[0])[name]


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
    except pickle.UnpicklingError:
        # torch's wording changes between releases (and its message suggests weights_only=False), so what the file
        # asked for is read from its opcodes instead, without unpickling anything.
        code = sorted(name for name in _imported_globals(file) if not _rebuilds_tensors(name))
        if code:
            raise CheckpointError(
                f"the file tried to run code: its pickle asks to import and call {', '.join(code[:5])}, not just to "
                f"rebuild tensors; refused by torch.load(weights_only=True). qcore never runs it, even with "
                f"allow_pickle=True; ask the publisher for safetensors weights",
                file=str(file),
            ) from None
        raise CheckpointError(
            "cannot be read by torch.load(weights_only=True); the file is corrupt or not a plain PyTorch state dict: "
            "download it again or convert it to safetensors",
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


def _imported_globals(file: Path) -> set[str]:
    """Every ``module.name`` the pickles in ``file`` import (GLOBAL, INST, STACK_GLOBAL), read from the opcodes alone.

    Covers torch's zip format (each ``.pkl`` member) and its legacy format (several pickles one after the other,
    then raw bytes). STACK_GLOBAL takes its names from the stack, so they are followed through the memo; a name
    that cannot be followed is reported as ``"?"``. A stream that stops parsing ends the scan.
    """
    import _compat_pickle
    import io
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(file):
            with zipfile.ZipFile(file) as archive:
                streams = [io.BytesIO(archive.read(n)) for n in archive.namelist() if n.endswith(".pkl")]
        else:
            streams = [io.BytesIO(file.read_bytes())]
    except (OSError, zipfile.BadZipFile, RuntimeError, ValueError):
        return set()
    found: set[str] = set()
    for stream in streams:
        # The legacy format holds a magic number, a protocol version and system info before the state dict.
        for _ in range(5):
            strings: list[str | None] = []
            memo: dict[int, str | None] = {}
            try:
                for opcode, argument, _position in pickletools.genops(stream):
                    if opcode.name in ("GLOBAL", "INST"):
                        module, _, name = str(argument).partition(" ")
                        # torch.save writes protocol 2, which spells Python 2's module names.
                        found.add(f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}")
                    elif opcode.name == "STACK_GLOBAL":
                        module, name = strings[-2:] if len(strings) >= 2 else (None, None)
                        found.add(f"{module}.{name}" if module and name else "?")
                    elif isinstance(argument, str) and ("UNICODE" in opcode.name or "STRING" in opcode.name):
                        strings.append(str(argument))
                    elif opcode.name == "MEMOIZE":
                        memo[len(memo)] = strings[-1] if strings else None
                    elif opcode.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                        memo[int(argument)] = strings[-1] if strings else None
                    elif opcode.name in ("GET", "BINGET", "LONG_BINGET"):
                        strings.append(memo.get(int(argument)))
            except (ValueError, EOFError, IndexError, KeyError, TypeError):
                break
    return found


def _rebuilds_tensors(name: str) -> bool:
    """Whether a global is one of those ``torch.save`` writes to rebuild a state dict of tensors."""
    module, _, attribute = name.rpartition(".")
    if module == "torch._utils":
        return attribute.startswith("_rebuild_")
    if module == "torch":
        return attribute.endswith("Storage") or f"torch.{attribute}" in _SAFETENSORS_DTYPE
    return name in ("collections.OrderedDict", "torch.storage.UntypedStorage")


def _read_ahead(infos: list[TensorInfo], mappings: dict[Path, Any] | None) -> Iterator[tuple[str, Any]]:
    """Hand out ``infos`` from a background thread that prefetches one tensor ahead of the consumer: views of the
    files' private mappings (kept in ``mappings``), or, with ``mappings`` None, tensors read into memory of their own.
    """
    import queue
    import threading

    ready: queue.Queue[tuple[str, Any] | BaseException | None] = queue.Queue(maxsize=1)
    stop = threading.Event()

    def reader() -> None:
        file = handle = None
        current = None
        try:
            for info in infos:
                if stop.is_set():
                    return
                current = info
                if info.file != file:
                    if handle is not None:
                        handle.close()
                    file, handle = info.file, info.file.open("rb", buffering=0)
                    if mappings is not None and file not in mappings:  # one per file for the reader's life
                        mappings[file] = _private_mapping(handle) if info.file.stat().st_size else None
                mapping = mappings[file] if mappings is not None else None
                if mapping is not None and info.nbytes and info.offset % DTYPE_SIZES[info.dtype] == 0:
                    start = info.offset - info.offset % mmap.PAGESIZE
                    mapping.madvise(mmap.MADV_WILLNEED, start, info.offset + info.nbytes - start)
                    ready.put((info.name, _mapped_tensor(mapping, info)))
                else:
                    ready.put((info.name, _read_tensor(handle, info)))
            ready.put(None)
        except OSError as error:  # permissions changed, a disk error, a file removed: the file's fault, named
            where = current.file if current is not None else error.filename
            ready.put(
                CheckpointError(
                    f"cannot be read ({type(error).__name__}: {error.strerror or error}); check its permissions or "
                    f"download it again",
                    file=str(where),
                    tensor=current.name if current is not None else None,
                )
            )
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
