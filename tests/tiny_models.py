"""Tiny models for qcore's own tests: the conformance suite's builders, re-exported."""

from __future__ import annotations

import torch
from qcore.testing.models import ARCHITECTURES, build, logits

INPUT_IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 129, 3]])

__all__ = ["ARCHITECTURES", "INPUT_IDS", "build", "logits"]
