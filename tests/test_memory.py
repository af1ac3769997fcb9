"""``qcore.memory.release_heap``, and the kernel layer's use of it after repacking a large CPU weight."""

from __future__ import annotations

import sys

import pytest
import torch
from qcore import kernels, memory


def test_release_heap_trims_on_glibc_and_says_so():
    released = memory.release_heap()
    assert released is (sys.platform.startswith("linux") and memory._malloc_trim() is not None)


@pytest.mark.parametrize(("shape", "calls"), [((512, 512), 1), ((64, 128), 0)])
def test_selecting_a_large_cpu_weight_releases_the_heap_its_repack_freed(monkeypatch, shape, calls):
    released = []
    monkeypatch.setattr(memory, "release_heap", lambda: released.append(True) or True)
    codes = torch.randint(0, 16, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    weight = kernels.Int4Weight.from_codes(codes, torch.rand(shape[0], shape[1] // 32) + 0.1, None, group_size=32)
    weight.select("cpu", torch.bfloat16)
    assert len(released) == calls
    assert torch.equal(weight.codes(), codes)  # the repacked weight is intact
