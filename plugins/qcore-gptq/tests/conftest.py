"""Shared fixtures: the reference checkpoints (written by gptqmodel and AutoAWQ), tiny full-precision models, a
calibration batch, and one GPTQ-quantized tiny Llama (quantized once per session).

The repository runs pytest with ``--import-mode=importlib``, so helpers are fixtures rather than an importable module.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

#: ``<repo>/../shared/fixtures``: CI has the reference checkpoints beside the clone.
FIXTURES = Path(__file__).resolve().parents[3] / ".." / "shared" / "fixtures"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run these tests on one thread: the tiny models gain nothing from more, and on a shared CPU two threads per
    process make GPTQ's many small matmuls about ten times slower (measured 0.6 s vs 6.8 s for one tiny Llama)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def fixture_dir():
    """The directory of one reference checkpoint; the test is skipped when the fixtures are absent."""

    def fixture_dir(name: str) -> Path:
        path = FIXTURES / name
        if not (path / "expected.safetensors").is_file():
            pytest.skip(f"reference fixture {name} not found at {path}")
        return path

    return fixture_dir


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Architecture -> directory of a float32 tiny checkpoint (Llama: Linear; GPT-2: Conv1D; OPT: biases)."""
    from qcore.testing import build

    root = tmp_path_factory.mktemp("gptq-checkpoints")
    return {arch: build(arch, root / arch, dtype=torch.float32) for arch in ("llama", "gpt2", "opt")}


@pytest.fixture(scope="session")
def calibration_ids() -> torch.Tensor:
    """Eight 32-token sequences of random ids (the tiny models' vocabulary is 256)."""
    return torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="session")
def gptq_llama(checkpoints, calibration_ids, tmp_path_factory):
    """A tiny Llama quantized with GPTQ 4-bit, groups of 32, and the directory it was saved to."""
    import qcore

    model = qcore.from_pretrained(
        checkpoints["llama"], {"quant_method": "gptq", "bits": 4, "group_size": 32}, calibration=calibration_ids
    )
    saved = qcore.save_pretrained(model, tmp_path_factory.mktemp("gptq-llama") / "out")
    return model, saved
