"""Shared fixtures: tiny full-precision checkpoints (saved once per session) and the reference fixtures' folder.

A Llama with 128 hidden and 256 intermediate features takes every group size the schemes use (32, 64, 128); its
bfloat16 and float32 copies are built from the same seed. The reference checkpoints written by compressed-tensors
itself live in ``<repo>/../shared/fixtures`` (tests that need them skip where it is absent).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).resolve().parents[3] / ".." / "shared" / "fixtures"


@pytest.fixture(scope="session")
def llama(tmp_path_factory) -> Path:
    """A bfloat16 tiny Llama whose Linears have 128 or 256 input features."""
    from qcore.testing import build

    return build("llama", tmp_path_factory.mktemp("ct-llama") / "bf16", hidden_size=128, intermediate_size=256)


@pytest.fixture(scope="session")
def llama_fp32(tmp_path_factory) -> Path:
    """The same tiny Llama in float32."""
    from qcore.testing import build

    directory = tmp_path_factory.mktemp("ct-llama") / "fp32"
    return build("llama", directory, dtype=torch.float32, hidden_size=128, intermediate_size=256)


@pytest.fixture(scope="session")
def fixtures() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"reference fixtures not found at {FIXTURES}")
    return FIXTURES


@pytest.fixture(scope="session")
def input_ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def one_group():
    """``one_group(weights, inputs=None, fmt=None)``: a one-group config targeting every Linear but ``lm_head``."""

    def one_group(weights: dict, inputs: dict | None = None, fmt: str | None = None) -> dict:
        group = {"targets": ["Linear"], "weights": weights}
        if inputs is not None:
            group["input_activations"] = inputs
        if fmt is not None:
            group["format"] = fmt
        return {"quant_method": "compressed-tensors", "config_groups": {"group_0": group}, "ignore": ["lm_head"]}

    return one_group
