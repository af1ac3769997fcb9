"""The example observer plugin, :class:`qcore.timing.PhaseTimer`, timing a load by the test backend."""

from __future__ import annotations

import time

import pytest
import qcore
import torch
from qcore.hookspecs import PHASES
from qcore.timing import PhaseTimer
from safetensors import safe_open

TOY = {"quant_method": "toy_int8"}


@pytest.fixture
def timer(toy):
    timer = PhaseTimer()
    qcore.register_plugin(timer, "phase-timer")
    yield timer
    qcore.unregister_plugin("phase-timer")


def owned_tensor_count(checkpoint, modules) -> int:
    """Checkpoint tensors that belong to ``modules``: the calls ``load_weight`` gets."""
    count = 0
    for path in checkpoint.glob("*.safetensors"):
        with safe_open(path, "pt") as handle:
            count += sum(key.rpartition(".")[0] in modules for key in handle.keys())  # noqa: SIM118, not iterable
    return count


def test_reports_every_phase_in_order_and_load_weight_per_tensor(timer, llama):
    start = time.perf_counter()
    model = qcore.from_pretrained(llama, TOY, dtype=torch.bfloat16)
    elapsed = time.perf_counter() - start

    report = timer.report()
    assert list(report) == list(PHASES)
    assert all(seconds >= 0 for seconds in report.values())
    assert sum(report.values()) <= elapsed
    assert timer.calls["load_weight"] == owned_tensor_count(llama, model.qcore_applied) > 0
    assert all(timer.calls[phase] == 1 for phase in PHASES if phase != "load_weight")


def test_passes_results_through_unchanged(timer, llama):
    # load_weight stops at the first result: a wrapper that lost it would leave the toy layers empty.
    model = qcore.from_pretrained(llama, TOY, dtype=torch.bfloat16)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.weight.dtype == torch.int8 and layer.weight.device.type == "cpu"
    assert model.qcore_kernels == {"toy": "toy-dequant-matmul"}


def test_accumulates_over_loads(timer, llama):
    qcore.from_pretrained(llama, TOY, dtype=torch.bfloat16)
    first = dict(timer.calls)
    qcore.from_pretrained(llama, TOY, dtype=torch.bfloat16)
    assert timer.calls == {phase: 2 * count for phase, count in first.items()}


class Refusing:
    """A plugin whose validate raises, as a backend's does when its library is missing."""

    @qcore.hookimpl
    def validate(self):
        raise qcore.BackendUnavailable("toy library missing: pip install toy")


def test_times_a_phase_that_raises(timer, llama):
    qcore.register_plugin(Refusing(), "refusing")
    try:
        with pytest.raises(qcore.BackendUnavailable):
            qcore.from_pretrained(llama, TOY, dtype=torch.bfloat16)
    finally:
        qcore.unregister_plugin("refusing")
    assert list(timer.report()) == ["validate"]
    assert timer.calls == {"validate": 1}
