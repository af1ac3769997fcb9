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

__all__ = ["release_heap"]


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
