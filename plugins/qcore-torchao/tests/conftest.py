"""Shared fixtures: a tiny bfloat16 Llama saved once per session, and the reference fixtures' folder.

The Llama's 128 and 256 input features take every group size the tests use (32); the reference checkpoints written
by transformers' own torchao path live in ``<repo>/../shared/fixtures`` (tests that need them skip where it is
absent).
"""

from __future__ import annotations

from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[3] / ".." / "shared" / "fixtures"


@pytest.fixture(scope="session")
def llama(tmp_path_factory) -> Path:
    from qcore.testing import build

    return build("llama", tmp_path_factory.mktemp("torchao-llama") / "bf16", hidden_size=128, intermediate_size=256)


@pytest.fixture(scope="session")
def fixtures() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"reference fixtures not found at {FIXTURES}")
    return FIXTURES
