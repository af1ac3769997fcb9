"""Shared fixtures: tiny GGUF files of real architectures (:mod:`gguf_files` writes them, as llama.cpp does), the
model transformers itself loads from one, and a fixed batch of token ids.

The repository runs pytest with ``--import-mode=importlib``, so this directory is put on ``sys.path`` for the test
modules to import :mod:`gguf_files`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from gguf_files import VOCAB, write  # noqa: E402


@pytest.fixture(scope="session")
def gguf_file(tmp_path_factory):
    """``gguf_file(arch, type_name)`` -> the path of that tiny GGUF file (alone in its directory), built once."""
    built: dict[tuple[str, str], Path] = {}

    def gguf_file(arch: str, type_name: str) -> Path:
        if (arch, type_name) not in built:
            directory = tmp_path_factory.mktemp(f"{arch}-{type_name}")
            built[arch, type_name] = write(arch, type_name, directory / f"{arch}-{type_name}.gguf")
        return built[arch, type_name]

    return gguf_file


@pytest.fixture(scope="session")
def transformers_load():
    """The model transformers itself loads from a GGUF file (``from_pretrained(dir, gguf_file=name)``, dequantized)."""

    def transformers_load(path: Path, dtype: torch.dtype = torch.float32):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).eval()

    return transformers_load


@pytest.fixture(scope="session")
def input_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def logits_of(input_ids):
    def logits_of(model) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids).logits.float()

    return logits_of
