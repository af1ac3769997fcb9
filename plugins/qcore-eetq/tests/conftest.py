"""Shared fixtures: tiny checkpoints (saved once), the dequantized reference model, and a stand-in for the eetq
package's CUDA extension so its code paths run on a CPU-only machine.

Llama (nn.Linear, untied lm_head), GPT-2 (transformers' Conv1D, stored transposed) and OPT (Linear with biases).
The repository runs pytest with ``--import-mode=importlib``, so helpers are fixtures rather than an importable module.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, object]:
    """Architecture -> directory of a full-precision bfloat16 checkpoint."""
    from qcore.testing import build

    root = tmp_path_factory.mktemp("eetq-checkpoints")
    return {arch: build(arch, root / arch) for arch in ("llama", "gpt2", "opt")}


@pytest.fixture(scope="session")
def logits_of():
    """The logits of a model on a fixed batch of two 8-token sequences, as float64 on the CPU."""
    input_ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(1))

    def logits_of(model) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids.to(model.device)).logits.double().cpu()

    return logits_of


@pytest.fixture(scope="session")
def dequantized_reference():
    """The plain model of ``path`` in ``dtype`` whose quantized Linears hold the weights ``quantized`` stands for."""
    import qcore
    from qcore_eetq.linear import EetqLinear
    from qcore_eetq.quantize import dequantize

    def dequantized_reference(path, quantized, dtype: torch.dtype, **kwargs):
        reference = qcore.from_pretrained(path, dtype=dtype, **kwargs)
        for name, layer in quantized.named_modules():
            if isinstance(layer, EetqLinear):
                rows = layer.state_dict()["weight"]  # plain rows whatever the kernel's layout
                target = reference.get_submodule(name)
                weight = dequantize(rows, layer.weight_scales, dtype).to(target.weight.device)
                target.weight.data = weight.t().contiguous() if layer.transposed_checkpoint else weight
        return reference

    return dequantized_reference


class FakeEetq(types.ModuleType):
    """Stands in for eetq's compiled extension (``import EETQ``) on the CPU.

    Like eetq's ``preprocess_weights`` it moves the bytes of a ``[K, N]`` int8 matrix to another order (here a fixed
    pseudo-random permutation per shape) and adds ``offset`` to each; ``w8_a16_gemm`` undoes that and multiplies in
    float32, returning float16 as eetq does. ``calls`` counts GEMM calls.
    """

    def __init__(self, offset: int = 128):
        super().__init__("EETQ")
        self.offset = offset
        self.calls = 0

    @staticmethod
    def _permutation(k: int, n: int) -> torch.Tensor:
        return torch.randperm(k * n, generator=torch.Generator().manual_seed(1000 * k + n))

    def preprocess_weights(self, weight: torch.Tensor) -> torch.Tensor:
        assert weight.device.type == "cpu" and weight.dtype == torch.int8 and weight.is_contiguous()
        k, n = weight.shape
        moved = weight.flatten()[self._permutation(k, n)].view(torch.uint8) + self.offset
        return moved.view(torch.int8).view(k, n)

    def w8_a16_gemm(self, x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        assert x.dim() == 2 and x.dtype == torch.float16 and scales.dtype == torch.float16
        self.calls += 1
        k, n = weight.shape
        flat = torch.empty(k * n, dtype=torch.int8)
        flat[self._permutation(k, n)] = (weight.flatten().view(torch.uint8) - self.offset).view(torch.int8)
        dequantized = flat.view(k, n).float() * scales.float()
        return (x.float() @ dequantized).half()


@pytest.fixture
def fake_eetq(monkeypatch) -> FakeEetq:
    """Make ``import EETQ`` return a :class:`FakeEetq` for the test."""
    module = FakeEetq()
    monkeypatch.setitem(sys.modules, "EETQ", module)
    return module


@pytest.fixture
def no_eetq(monkeypatch) -> None:
    """Make ``import EETQ`` fail, whether or not the eetq package is installed."""
    monkeypatch.setitem(sys.modules, "EETQ", None)
