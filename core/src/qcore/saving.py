"""``qcore.save_pretrained``: write a (quantized) model as safetensors shards + index + config.json.

The tensors are the model's ``state_dict()``: each backend's quantized modules emit their stored form there (for a
single-method model, the tensors transformers itself writes for that method), and config.json carries the
``quantization_config`` the load recorded, so ``qcore.from_pretrained(out_dir)`` reloads without re-quantizing.
Everything is written into a temporary directory beside the destination and renamed into place, so a failed or
interrupted save leaves the destination exactly as it was. Nothing is pickled.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
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
        raise CheckpointError("destination exists and is not empty; pass overwrite=True to replace it", file=str(out))
    limit = _parse_size(max_shard_size)
    tensors = _tensors_to_save(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        _write_shards(tensors, staging, limit)
        model.config.save_pretrained(staging)
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None and getattr(model, "can_generate", lambda: False)():
            generation_config.save_pretrained(staging)
        _swap_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


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
        identity = (value.data_ptr(), value.dtype, tuple(value.shape), value.storage_offset()) if value.numel() else None
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
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())}, "weight_map": weight_map}
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
    """Rename the finished staging directory to ``out``; an existing ``out`` is kept until the rename succeeded."""
    if not out.exists():
        staging.rename(out)
        return
    backup = out.parent / f".{out.name}.{os.getpid()}.old"
    out.rename(backup)
    try:
        staging.rename(out)
    except BaseException:
        backup.rename(out)
        raise
    if backup.is_dir():
        shutil.rmtree(backup)
    else:
        backup.unlink()


_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _parse_size(size: int | str) -> int:
    if isinstance(size, int) and size > 0:
        return size
    text = str(size).strip().upper()
    for unit, factor in sorted(_UNITS.items(), key=lambda item: -len(item[0])):
        if text.endswith(unit):
            try:
                value = float(text[: -len(unit)])
            except ValueError:
                break
            if value > 0:
                return int(value * factor)
    raise ConfigError(f"max_shard_size {size!r} is not a positive size such as '5GB' or 500000000")
