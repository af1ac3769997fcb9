"""``qcore.save_pretrained``: write a (quantized) model as safetensors shards + index + config.json.

The tensors are the model's ``state_dict()``: each backend's quantized modules emit their stored form there (for a
single-method model, the tensors transformers itself writes for that method), and config.json carries the
``quantization_config`` the load recorded, so ``qcore.from_pretrained(out_dir)`` reloads without re-quantizing.
Everything is written into a staging directory beside the destination, flushed to disk, and renamed into place
in one step, so a failed or killed save leaves the destination exactly as it was. Without ``overwrite`` the rename
is exclusive (``renameat2(RENAME_NOREPLACE)`` on Linux): whatever appeared at the destination while the save ran (a
concurrent save, a directory someone else created) makes the save fail and is left untouched. With ``overwrite`` it
is an atomic exchange with the old directory. A save killed outright (SIGKILL, power loss) cannot remove its staging
directory ``.NAME.HOST-PID.*.partial``; the next save into the same destination from the same host deletes those whose
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
from qcore.errors import CheckpointError, ConfigError, QcoreError

__all__ = ["save_pretrained"]


def save_pretrained(
    model: Any, out_dir: str | os.PathLike[str], *, max_shard_size: int | str = "5GB", overwrite: bool = False
) -> Path:
    """Save ``model`` to ``out_dir``; returns the directory.

    :param max_shard_size: largest shard, in bytes or as ``"5GB"``/``"500MB"``; a single tensor larger than this gets
        a shard of its own.
    :param overwrite: replace an existing directory (atomically: the old one stays until the new one is
        complete). Without it the save commits only if nothing but the empty directory found at the start (if any)
        is at ``out_dir`` at that moment.
    :raises CheckpointError: ``out_dir`` is not empty (at the start, or when the save commits: another save or
        process put something there meanwhile, which is left as it is) and ``overwrite`` is False; the disk is full
        or another write fails (naming the path; ``out_dir`` is then unchanged and no staging is left); or the model
        still has tensors on the meta device.
    :raises ConfigError: ``max_shard_size`` is not a positive, finite size.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise _exists(out)
    limit = _parse_size(max_shard_size)
    tensors = _tensors_to_save(model)
    metadata = stored_metadata(model)
    target = out.absolute()  # "." has no name to stage beside
    # An empty directory the caller made for the save may be replaced; one created by someone else during it may not.
    empty_at_start = _identity(target) if target.is_dir() and not overwrite else None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_staging(target)
        staging = _make_staging(target)
    except OSError as error:
        raise _write_failed(error, target.parent) from None
    try:
        _write_shards(tensors, staging, limit, metadata)
        # As transformers does: record the class, so a reload builds the model with its head, not the bare base.
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(staging)
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None and getattr(model, "can_generate", lambda: False)():
            generation_config.save_pretrained(staging)
        _flush(staging)
        if overwrite:
            _swap_into_place(staging, target)
        else:
            _commit_exclusive(staging, target, empty_at_start)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, OSError) or type(error).__name__ == "SafetensorError":  # safetensors' I/O errors
            raise _write_failed(error, target) from None
        raise
    return out


def _exists(out: Path) -> CheckpointError:
    return CheckpointError(
        "destination exists and is not empty; pass overwrite=True to replace it (the old contents stay until the "
        "new checkpoint is complete), or choose another directory",
        file=str(out),
    )


def _write_failed(error: BaseException, path: Path) -> CheckpointError:
    """A failed write (a full disk, a quota, a read-only file system) as an error naming where it happened."""
    code = getattr(error, "errno", None)
    full = code in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(error) or "quota" in str(error).lower()
    advice = (
        "the disk is full: free space (the save needs about the model's quantized size) or save elsewhere"
        if full
        else "check that the directory is writable"
    )
    return CheckpointError(
        f"cannot write the checkpoint ({type(error).__name__}: {error}); {advice}. The destination is unchanged and "
        f"no staging directory is left",
        file=str(path),
    )


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


def _write_shards(tensors: dict[str, torch.Tensor], directory: Path, limit: int, extra: dict[str, str]) -> None:
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
    metadata = {**extra, "format": "pt"}  # every shard carries the backends' entries, as transformers writes them
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


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        status = path.stat()
    except OSError:
        return None
    return status.st_dev, status.st_ino


def _commit_exclusive(staging: Path, out: Path, empty_at_start: tuple[int, int] | None) -> None:
    """Rename ``staging`` to ``out`` only if nothing is there: a check and a rename would lose whatever appeared
    between the two, so the rename itself refuses (``RENAME_NOREPLACE``).

    The empty directory found at ``out`` when the save began, if still the same and still empty, is removed first
    (``rmdir`` refuses a non-empty one, so nothing written into it meanwhile is lost).
    """
    if empty_at_start is not None and _identity(out) == empty_at_start:
        try:
            out.rmdir()
        except OSError as error:
            if error.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise _exists(out) from None
            if error.errno != errno.ENOENT:
                raise
    try:
        committed = _rename_noreplace(staging, out)
    except FileExistsError:
        raise _exists(out) from None
    if not committed:
        # rename(2) never replaces a non-empty directory or (for a directory source) a file, so the one thing it can
        # still replace is an empty directory made in the instant before this call.
        if out.exists() or out.is_symlink():
            raise _exists(out)
        try:
            staging.rename(out)
        except OSError as error:
            if error.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise _exists(out) from None
            raise
    _fsync_directory(out.parent)


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


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux's ``renameat2(RENAME_EXCHANGE)``; False where that is not available."""
    return _renameat2(a, b, _RENAME_EXCHANGE)


def _rename_noreplace(source: Path, target: Path) -> bool:
    """Rename unless ``target`` exists (``renameat2(RENAME_NOREPLACE)``); False where that is not available.

    :raises FileExistsError: ``target`` exists (even an empty directory).
    """
    return _renameat2(source, target, _RENAME_NOREPLACE)


def _renameat2(a: Path, b: Path, flags: int) -> bool:
    if sys.platform != "linux":
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:  # glibc older than 2.28, or another libc
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # kernel or file system without this flag
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
        raise ConfigError(
            f"max_shard_size {size!r} is not a positive, finite size such as '5GB' or 500000000"
        ) from None


def stored_metadata(model: Any) -> dict[str, str]:
    """The ``__metadata__`` entries the model's backends store (the ``save_metadata`` hook), merged.

    :raises PluginError: a backend returned something other than a ``str -> str`` dict, or two backends gave one key
        different values.
    """
    from qcore import plugins
    from qcore.errors import PluginError

    applied = getattr(model, "qcore_applied", None) or {}
    groups: dict[int, tuple[Any, list[str]]] = {}
    for name, config in applied.items():
        groups.setdefault(id(config), (config, []))[1].append(name)
    merged: dict[str, str] = {}
    owner: dict[str, str] = {}
    for config, modules in groups.values():
        try:
            registered = plugins.backend_for(config.quant_method)
        except ConfigError:  # the plugin that loaded the model is gone (unregistered since): it can add nothing
            continue
        try:
            results = plugins.phase_caller("save_metadata", registered.plugin_name)(
                config=config, model=model, modules=tuple(modules)
            )
        except QcoreError:
            raise
        except Exception as error:
            raise PluginError(registered.distribution, "save_metadata", None, error) from error
        for result in results:
            if result is None:
                continue
            if not isinstance(result, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in result.items()
            ):
                wrong = TypeError(f"returned {type(result).__name__}, not a dict of str -> str (or None)")
                raise PluginError(registered.distribution, "save_metadata", None, wrong)
            for key, value in result.items():
                if key == "format" or (key in merged and merged[key] != value):
                    clash = TypeError(
                        f"metadata key {key!r} is "
                        + ("reserved for the format" if key == "format" else f"also given by {owner[key]}")
                    )
                    raise PluginError(registered.distribution, "save_metadata", None, clash)
                merged[key], owner[key] = value, registered.distribution
    return merged
