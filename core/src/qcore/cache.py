"""Quantize once: a verified cache of on-the-fly loads.

With ``qcore.from_pretrained(src, config, cache=True)`` (or ``QCORE_CACHE_DIR`` set, or the CLI's ``--cache``), the
first on-the-fly load runs the six phases as usual and then writes the quantized model into the cache with
:func:`qcore.save_pretrained` (atomically); the next load of the same source with the same config loads that
pre-quantized copy instead, skipping the quantization.

The entry's key covers everything that could make the copy wrong:

* every weight file of the source and its config.json: name, size and a SHA-256 of the content;
* the quantization config or recipe as given, the dtype, and the model keyword arguments;
* the versions of qcore, torch, transformers and of each distribution serving a method the config uses.

A changed source therefore never gets a stale copy. Hashing a 1.7 GB source takes a few seconds, so each file's
digest is remembered beside the cache together with the file's size, modification and status-change times and
inode; any write, truncation or replacement changes the status-change time, which no user call can set back, and
the file is hashed again. Each entry records a digest of every file it holds; an entry whose files no longer match
(truncated, corrupted, half-deleted) is removed and rebuilt, never loaded. Entries beyond the size limit
(``QCORE_CACHE_SIZE``, default 50 GB) are evicted least recently used first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qcore.errors import CheckpointError

__all__ = ["CacheEntry", "cache_directory", "entries", "clear", "load_or_build", "DEFAULT_LIMIT"]

logger = logging.getLogger("qcore")

DEFAULT_LIMIT = 50 * 10**9
#: The file inside an entry that records its key and the digests of its files; written last, so an entry without
#: it is incomplete.
MANIFEST = "qcore-cache.json"
#: Remembered digests of source files: path -> [size, mtime_ns, ctime_ns, inode, sha256].
_DIGESTS = "source-digests.json"
_CHUNK = 8 * 2**20


@dataclasses.dataclass(frozen=True)
class CacheEntry:
    """One cached quantized model."""

    path: Path
    key: str
    source: str
    method: str
    nbytes: int
    created: float
    last_used: float


def cache_directory(cache: bool | str | os.PathLike[str] | None = None) -> Path:
    """Where the cache lives: ``cache`` if it is a path, else ``QCORE_CACHE_DIR``, else ``~/.cache/qcore/quantized``."""
    if isinstance(cache, (str, os.PathLike)) and not isinstance(cache, bool):
        return Path(cache)
    if os.environ.get("QCORE_CACHE_DIR"):
        return Path(os.environ["QCORE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qcore" / "quantized"


def wanted(cache: bool | str | os.PathLike[str] | None) -> bool:
    """Whether a load should use the cache: asked for, or ``QCORE_CACHE_DIR`` set and not turned off."""
    if cache is None:
        return bool(os.environ.get("QCORE_CACHE_DIR"))
    return cache is not False


def size_limit() -> int:
    from qcore.sizes import parse_nbytes

    text = os.environ.get("QCORE_CACHE_SIZE")
    return parse_nbytes(text) if text else DEFAULT_LIMIT


# -- the key ------------------------------------------------------------------------------------------------


def source_files(source: Path, weight_files: list[Path]) -> list[Path]:
    """The files a quantized copy depends on: config.json, the shard index (if any) and every weight file."""
    extra = [source / name for name in ("config.json", "model.safetensors.index.json") if (source / name).is_file()]
    return sorted({*extra, *weight_files})


def file_digest(path: Path, memo: dict[str, list[Any]] | None = None) -> str:
    """SHA-256 of ``path``'s content, reused from ``memo`` only while size, times and inode are unchanged."""
    status = path.stat()
    stamp = [status.st_size, status.st_mtime_ns, status.st_ctime_ns, status.st_ino]
    key = str(path.resolve())
    if memo is not None and memo.get(key, [None])[:4] == stamp:
        return memo[key][4]
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    if memo is not None:
        memo[key] = [*stamp, digest.hexdigest()]
    return digest.hexdigest()


def cache_key(
    source: Path, files: list[Path], quantization: Mapping[str, Any], dtype: Any, model_kwargs: Mapping[str, Any],
    methods: list[str], root: Path,
) -> tuple[str, dict[str, Any]]:  # fmt: skip
    """The entry key for this load, and what it was computed from (kept in the entry's manifest)."""
    from qcore import plugins

    memo = _read_json(root / _DIGESTS) or {}
    described = {
        "files": {str(f.relative_to(source)): [f.stat().st_size, file_digest(f, memo)] for f in files},
        "quantization": quantization,
        "dtype": str(dtype),
        "model_kwargs": {k: repr(v) for k, v in sorted(model_kwargs.items())},
        "versions": {
            name: _version(name) for name in ("qcore", "torch", "transformers", "safetensors")
        } | {
            plugins.backend_for(method).distribution: plugins.backend_for(method).version for method in sorted(methods)
        },
    }  # fmt: skip
    _write_json(root / _DIGESTS, memo)
    text = json.dumps(described, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32], described


def describe_calibration(calibration: Any) -> str | None:
    """A digest of the calibration data a load was given (it changes what a calibrating backend stores)."""
    if calibration is None:
        return None
    digest = hashlib.sha256()
    items = [calibration] if isinstance(calibration, str) or hasattr(calibration, "numpy") else list(calibration)
    for item in items:
        digest.update(item.encode() if isinstance(item, str) else item.cpu().numpy().tobytes())
        digest.update(b"\0")
    return digest.hexdigest()


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


# -- entries ------------------------------------------------------------------------------------------------


def entries(root: Path | None = None) -> list[CacheEntry]:
    """Every complete entry in the cache, most recently used first."""
    root = root or cache_directory()
    found = []
    for path in sorted(root.glob("*/")) if root.is_dir() else []:
        manifest = _read_json(path / MANIFEST)
        if not isinstance(manifest, dict) or manifest.get("key") != path.name:
            continue
        found.append(
            CacheEntry(
                path, path.name, str(manifest.get("source")), str(manifest.get("method")),
                int(manifest.get("nbytes", 0)), float(manifest.get("created", 0)), _last_used(path),
            )
        )  # fmt: skip
    return sorted(found, key=lambda e: e.last_used, reverse=True)


def clear(root: Path | None = None) -> int:
    """Remove every entry; returns how many bytes were freed."""
    root = root or cache_directory()
    freed = 0
    for entry in entries(root):
        freed += entry.nbytes
        shutil.rmtree(entry.path, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        (root / _DIGESTS).unlink()
    return freed


def _last_used(path: Path) -> float:
    try:
        return (path / MANIFEST).stat().st_mtime
    except OSError:
        return 0.0


def _verified(path: Path) -> bool:
    """Whether the entry at ``path`` is complete and every file is exactly as written."""
    manifest = _read_json(path / MANIFEST)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return False
    present = {p.name for p in path.iterdir() if p.name != MANIFEST}
    if present != set(manifest["files"]):
        return False
    return all(file_digest(path / name) == digest for name, digest in manifest["files"].items())


def _evict(root: Path, limit: int, keep: Path) -> None:
    total = 0
    for entry in entries(root):
        total += entry.nbytes
        if total > limit and entry.path != keep:
            logger.info("qcore cache: evicting %s (%s), least recently used", entry.path.name, entry.source)
            shutil.rmtree(entry.path, ignore_errors=True)


# -- loading through the cache --------------------------------------------------------------------------------


def load_or_build(
    load: Any, source: Path, files: list[Path], quantization: Mapping[str, Any], methods: list[str], *,
    cache: bool | str | os.PathLike[str] | None, dtype: Any, model_kwargs: Mapping[str, Any],
    load_kwargs: Mapping[str, Any],
) -> Any:  # fmt: skip
    """Load from the cache entry for this load if a verified one exists, else ``load()`` and store the result.

    :param load: runs the on-the-fly load (all six phases) and returns the model.
    :param load_kwargs: what the pre-quantized reload of an entry takes (device map, memory limits).
    """
    from qcore.loading import from_pretrained

    root = cache_directory(cache)
    root.mkdir(parents=True, exist_ok=True)
    key, described = cache_key(source, files, quantization, dtype, model_kwargs, methods, root)
    entry = root / key
    if entry.is_dir():
        if _verified(entry):
            os.utime(entry / MANIFEST)  # most recently used
            model = from_pretrained(entry, dtype=dtype, cache=False, **load_kwargs, **model_kwargs)
            model.qcore_cache = str(entry)
            return model
        logger.warning("qcore cache: entry %s is incomplete or corrupt; rebuilding it", entry)
        shutil.rmtree(entry, ignore_errors=True)
    model = load()
    try:
        _store(model, entry, source, described, methods)
    except CheckpointError as error:  # another process stored the same entry first: theirs is as good as ours
        if not (entry.is_dir() and _verified(entry)):
            raise
        logger.info("qcore cache: %s was stored by another process meanwhile (%s)", entry.name, error)
    _evict(root, size_limit(), keep=entry)
    model.qcore_cache = str(entry)
    return model


def _store(model: Any, entry: Path, source: Path, described: dict[str, Any], methods: list[str]) -> None:
    """Save ``model`` as the entry, its manifest written inside the staged copy so it commits in one rename."""
    from qcore.saving import save_pretrained

    staged = entry.parent / f".{entry.name}.{os.getpid()}.build"
    shutil.rmtree(staged, ignore_errors=True)
    try:
        save_pretrained(model, staged)
        files = {p.name: file_digest(p) for p in staged.iterdir()}
        manifest = {
            "key": entry.name, "source": str(source), "method": ",".join(methods), "created": time.time(),
            "nbytes": sum(p.stat().st_size for p in staged.iterdir()), "files": files, "described": described,
        }  # fmt: skip
        _write_json(staged / MANIFEST, manifest)
        try:
            os.rename(staged, entry)  # refuses when another process's entry (a non-empty directory) is there
        except OSError as error:
            raise CheckpointError(f"cache entry exists already ({error.strerror})", file=str(entry)) from None
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: Any) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(temporary, path)
