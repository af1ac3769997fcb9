"""Handing freed heap memory back to the operating system, for phases 4 and 6.

A load converts tensor after tensor: each conversion allocates temporaries several times the tensor's size (float32
copies, int32 codes for a kernel's repack) and frees them. glibc's malloc keeps what was freed in its heap, scattered
between the tensors that stay, so over a load that heap grows to hundreds of MB of free but resident memory, more than
the quantized model itself. :func:`release_heap` returns it. The loader calls it during phase 4 and the kernel layer
after repacking a large weight (:meth:`qcore.kernels.PackedWeight.select`, phase 6); a backend calls it after a
conversion of its own that the two do not cover.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

__all__ = ["release_heap", "map_large_allocations"]

#: glibc's ``M_MMAP_THRESHOLD`` (malloc.h), and the size from which :func:`map_large_allocations` gives every
#: allocation pages of its own.
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 4 * 2**20


def release_heap() -> bool:
    """Return the free memory of the C heap to the system (glibc's ``malloc_trim(0)``, about a millisecond).

    :returns: False where the C library has no such call (not Linux, or musl): nothing is done there.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


@functools.cache
def _malloc_trim() -> Any:
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None


@functools.cache
def map_large_allocations() -> bool:
    """Give every allocation of 4 MiB or more pages of its own, returned to the system as soon as it is freed.

    glibc raises its mmap threshold each time a large mapped block is freed (up to 32 MiB), and from then on serves
    blocks below it from the heap, where they fragment around the tensors allocated in between and stay resident.
    Conversions that make and free several float32 temporaries per weight (hqq's optimizer; GPTQ's Hessian, its
    Cholesky factors and the float32 weight) then hold far more than they use: measured on the 336M benchmark model,
    hqq's load peaked 905 MiB above its baseline for a ~280 MiB model; GPTQ on SmolLM2-135M 193 -> 166 MiB with its
    own frees alone. Fixing the threshold keeps them off the heap. The setting is process-wide (glibc cannot restore
    the dynamic threshold) and changes only where memory comes from, never a result; once per process.

    :returns: False where the C library has no ``mallopt`` (not Linux, or musl): nothing is done there.
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    if not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD))
