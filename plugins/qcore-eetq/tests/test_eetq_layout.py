"""Converting plain int8 rows to the eetq package's GEMM layout and back, with a stand-in for eetq's transform.

The inverse is derived from eetq's own ``preprocess_weights``, so it must hold for any byte permutation plus
constant eetq might apply (it differs by GPU architecture and release).
"""

from __future__ import annotations

import pytest
import torch
from qcore_eetq.quantize import _eetq_permutation, eetq_layout, rows_from_eetq_layout


@pytest.mark.parametrize("offset", [128, 0])
@pytest.mark.parametrize("shape", [(64, 128), (192, 64), (8, 16)])
def test_rows_survive_a_round_trip_through_eetqs_layout(fake_eetq, shape, offset):
    fake_eetq.offset = offset
    rows = torch.randint(-127, 128, shape, dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    kernel_weight = eetq_layout(rows, fake_eetq)
    assert tuple(kernel_weight.shape) == shape[::-1] and not torch.equal(kernel_weight.t(), rows)
    assert torch.equal(rows_from_eetq_layout(kernel_weight, fake_eetq), rows)


def test_a_transform_that_is_not_a_byte_permutation_is_refused(fake_eetq, monkeypatch):
    monkeypatch.setattr(fake_eetq, "preprocess_weights", lambda weight: torch.zeros_like(weight))
    with pytest.raises(RuntimeError, match="not a byte permutation"):
        _eetq_permutation(64, 64, fake_eetq)
