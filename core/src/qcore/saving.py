"""``qcore.save_pretrained``: write a (quantized) model as safetensors shards + index + config.json.

The tensors are the model's ``state_dict()``: each backend's quantized modules emit their stored form there (for a
single-method model, the tensors transformers itself writes for that method), and config.json carries the
``quantization_config`` the load recorded, so ``qcore.from_pretrained(out_dir)`` reloads without re-quantizing.
Everything is written into a staging directory beside the destination, flushed to disk, and renamed into place
(swapped atomically with an existing destination on Linux), so a failed or killed save leaves the destination
exactly as it was. A save killed outright (SIGKILL, power loss) cannot remove its staging directory
``.NAME.HOST-PID.*.partial``; the next save into the same destination from the same host deletes those whose
process is gone, and leaves those of live processes alone. Nothing is pickled.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

import torch

from qcore.checkpoint import SAFE_INDEX_NAME, SAFE_WEIGHTS_NAME
from qcore.errors import CheckpointError, ConfigError

__all__ = ["save_pretrained"]


def save_pretrained(
    model: Any, out_dir: str | os.PathLike[str], *, max_shard_size: int | str = "5GB", overwrite: bool = False
) -> Path:
    """Save ``model`` to ``out_dir``; returns the directory.

    :param max_shard_size: largest shard, in bytes or as ``"5GB"``/``"500MB"``; a single tensor larger than this gets
        a shard of its own.
    :param overwrite: replace an existing non-empty directory (atomically: the old one stays until the new one is
        complete).
    :raises CheckpointError: ``out_dir`` is a non-empty directory and ``overwrite`` is False, or the model still has
        tensors on the meta device.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise CheckpointError(
            "destination exists and is not empty; pass overwrite=True to replace it (the old contents stay until the "
            "new checkpoint is complete), or choose another directory",
            file=str(out),
        )
    limit = _parse_size(max_shard_size)
    tensors = _tensors_to_save(model)
    target = out.absolute()  # "." has no name to stage beside
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(target)
    staging = _make_staging(target)
    try:
        _write_shards(tensors, staging, limit)
        # As transformers does: record the class, so a reload builds the model with its head, not the bare base.
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(staging)
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None and getattr(model, "can_generate", lambda: False)():
            generation_config.save_pretrained(staging)
        _flush(staging)
        _swap_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


# -- staging -----------------------------------------------------------------------------------------------


def _staging_prefix(target: Path) -> str:
    return f".{target.name}.{socket.gethostname()}-{os.getpid()}."


def _make_staging(target: Path) -> Path:
    """A new empty directory beside ``target``, with the permissions ``target`` would get (umask applies).

    Not ``tempfile.mkdtemp``: its directory is private to the user (0700), and would stay so once renamed.
    """
    while True:
        staging = target.parent / f"{_staging_prefix(target)}{secrets.token_hex(4)}.partial"
        try:
            staging.mkdir()
            return staging
        except FileExistsError:
            continue


def _remove_stale_staging(target: Path) -> None:
    """Delete staging directories that saves into ``target`` from this host left behind when they were killed.

    Only directories whose process no longer exists go: a save still running (here or, on a shared file system,
    on another host) keeps its own.
    """
    if os.name != "posix":  # os.kill(pid, 0) probes a process only on POSIX; elsewhere it would terminate it
        return
    pattern = re.compile(re.escape(f".{target.name}.{socket.gethostname()}-") + r"(\d+)\..*\.partial")
    for candidate in target.parent.iterdir():
        match = pattern.fullmatch(candidate.name)
        if match and candidate.is_dir() and not _alive(int(match.group(1))):
            shutil.rmtree(candidate, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    return True


def _flush(directory: Path) -> None:
    """fsync every file written and the directory, so the rename never publishes files still only in cache."""
    for path in directory.iterdir():
        with path.open("rb") as handle:
            os.fsync(handle.fileno())
    _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    if os.name != "posix":
        return
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _tensors_to_save(model: Any) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    # Tied weights are stored once, under the name transformers keeps (the source), as transformers does.
    for target in getattr(model, "all_tied_weights_keys", {}) or {}:
        state.pop(target, None)
    tensors, seen = {}, {}
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"state_dict entry is a {type(value).__name__}, not a tensor; the backend that owns it must store "
                f"its metadata as tensors (qcore never pickles)",
                tensor=name,
            )
        if value.device.type == "meta":
            raise CheckpointError("is still on the meta device; the model was not fully loaded", tensor=name)
        value = value.detach()
        identity = (
            (value.data_ptr(), value.dtype, tuple(value.shape), value.storage_offset()) if value.numel() else None
        )
        if identity is not None and identity in seen:
            continue  # a second name for the same tensor (tying the model did not declare)
        if identity is not None:
            seen[identity] = name
        tensors[name] = value.to("cpu").contiguous()
    return tensors


def _write_shards(tensors: dict[str, torch.Tensor], directory: Path, limit: int) -> None:
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(_unshare(shards[0]), directory / SAFE_WEIGHTS_NAME, metadata=metadata)
        return
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        file_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(_unshare(shard), directory / file_name, metadata=metadata)
        weight_map.update(dict.fromkeys(shard, file_name))
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
        "weight_map": weight_map,
    }
    (directory / SAFE_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _unshare(shard: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory; give views of one storage their own copies."""
    storages: set[int] = set()
    result = {}
    for name, tensor in shard.items():
        pointer = tensor.untyped_storage().data_ptr() if tensor.numel() else None
        if pointer is not None and pointer in storages:
            tensor = tensor.clone()
        elif pointer is not None:
            storages.add(pointer)
        result[name] = tensor
    return result


def _swap_into_place(staging: Path, out: Path) -> None:
    """Move the finished staging directory to ``out``; an existing ``out`` is kept until the new one is in place."""
    if not out.exists():
        staging.rename(out)
    elif _exchange(staging, out):
        _remove(staging)  # now holds the old contents
    else:
        # Without an atomic exchange there is a moment, between the two renames, when ``out`` does not exist; the
        # old contents are then at ``.NAME.PID.old`` beside it.
        backup = out.parent / f".{out.name}.{os.getpid()}.old"
        out.rename(backup)
        try:
            staging.rename(out)
        except BaseException:
            backup.rename(out)
            raise
        _remove(backup)
    _fsync_directory(out.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux's ``renameat2(RENAME_EXCHANGE)``; False where that is not available."""
    if sys.platform != "linux":
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:  # glibc older than 2.28, or another libc
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # kernel or file system without RENAME_EXCHANGE
        return False
    raise OSError(code, os.strerror(code), str(b))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _parse_size(size: int | str) -> int:
    from qcore.sizes import parse_nbytes

    try:
        return parse_nbytes(size)
    except ValueError:
        raise ConfigError(f"max_shard_size {size!r} is not a positive size such as '5GB' or 500000000") from None
