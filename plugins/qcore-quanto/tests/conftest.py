"""Shared fixtures: a tiny bfloat16 Llama saved once per session (128 and 256 input features: quanto's rule gives
the 256-wide ``down_proj`` groups of 128 and the 128-wide layers one group per row), and a guard that fails any test
in which optimum-quanto tries to build or load its C++ extension."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def llama(tmp_path_factory) -> Path:
    from qcore.testing import build

    return build("llama", tmp_path_factory.mktemp("quanto-llama") / "bf16", hidden_size=128, intermediate_size=256)


@pytest.fixture(autouse=True)
def no_extension_build(monkeypatch):
    """quanto compiles its extension with torch.utils.cpp_extension.load on first use (into site-packages, ~2 min)."""
    import torch.utils.cpp_extension

    def refuse(*args, **kwargs):
        raise AssertionError(f"optimum-quanto tried to build its C++ extension {kwargs.get('name')!r}")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", refuse)
    try:
        import optimum.quanto.library.extensions.extension as extension
    except ImportError:
        return
    monkeypatch.setattr(extension, "load", refuse)
