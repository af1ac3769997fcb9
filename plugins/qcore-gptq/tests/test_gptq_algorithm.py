"""GPTQ on single layers: it beats round-to-nearest on correlated inputs, its grids are GPTQ's, and its act-order
result runs through the kernel layer with the input permutation applied once."""

from __future__ import annotations

import pytest
import torch
from qcore_gptq.formats import Layout, decode, encode
from qcore_gptq.gptq import HessianCollector, quantize_layer
from qcore_gptq.layers import from_result

SETTINGS = [
    dict(bits=4, group_size=128, sym=True, desc_act=False),
    dict(bits=4, group_size=32, sym=False, desc_act=True),
    dict(bits=3, group_size=64, sym=True, desc_act=True),
    dict(bits=2, group_size=-1, sym=False, desc_act=False),
    dict(bits=8, group_size=128, sym=True, desc_act=False),
]


@pytest.fixture(scope="module")
def layer_problem():
    """A 64x256 weight and 1024 strongly correlated inputs (rank 16 plus a little noise), as activations are."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(1024, 16, generator=generator) @ torch.randn(16, 256, generator=generator)
    inputs += 0.1 * torch.randn(1024, 256, generator=generator)
    weight = torch.randn(64, 256, generator=generator)
    return weight, inputs


def _weight(decoded) -> torch.Tensor:
    groups = decoded.g_idx.long()
    return (decoded.codes.float() - decoded.zero.float()[:, groups]) * decoded.scale.float()[:, groups]


def _output_error(weight, inputs, decoded) -> float:
    return float(((inputs @ weight.T - inputs @ _weight(decoded).T) ** 2).mean())


@pytest.mark.parametrize(
    "setting", SETTINGS, ids=lambda s: f"{s['bits']}b-g{s['group_size']}-sym{s['sym']}-act{s['desc_act']}"
)
def test_gptq_error_is_far_below_round_to_nearest(layer_problem, setting):
    weight, inputs = layer_problem
    hessian = 2 * inputs.T @ inputs / len(inputs)
    gptq = quantize_layer(weight, hessian, damp_percent=0.01, **setting)
    # The identity Hessian propagates no error: round-to-nearest on the same grids.
    rtn = quantize_layer(weight, torch.eye(256), damp_percent=0.01, **setting)
    assert _output_error(weight, inputs, gptq) < 0.2 * _output_error(weight, inputs, rtn)


def test_identity_hessian_is_plain_round_to_nearest(layer_problem):
    weight, _ = layer_problem
    decoded = quantize_layer(weight, torch.eye(256), bits=4, group_size=128, sym=True, desc_act=False, damp_percent=0.1)
    grouped = weight.reshape(64, 2, 128)
    scale = (2 * grouped.abs().amax(-1) / 15).to(torch.float16).float()
    codes = torch.clamp(torch.round(grouped / scale.unsqueeze(-1)) + 8, 0, 15).reshape(64, 256)
    assert torch.equal(decoded.codes, codes.to(torch.uint8))
    assert torch.equal(decoded.scale, scale.to(torch.float16))
    assert (decoded.zero == 8).all()


def test_act_order_groups_follow_the_hessian_diagonal(layer_problem):
    weight, inputs = layer_problem
    inputs = inputs * torch.linspace(0.1, 2.0, 256)  # later features are larger: they go first
    hessian = 2 * inputs.T @ inputs / len(inputs)
    decoded = quantize_layer(weight, hessian, bits=4, group_size=64, sym=True, desc_act=True, damp_percent=0.01)
    order = torch.argsort(torch.diag(hessian), descending=True)
    assert torch.equal(decoded.g_idx[order], (torch.arange(256) // 64).to(torch.int32))
    assert torch.bincount(decoded.g_idx.long()).tolist() == [64] * 4


def test_v1_safe_zero_points_are_at_least_one(layer_problem):
    weight, _ = layer_problem
    positive = weight.abs()  # every group's minimum is >= 0: the zero point would be 0
    decoded = quantize_layer(
        positive, torch.eye(256), bits=4, group_size=64, sym=False, desc_act=False, damp_percent=0.1, zero_at_least=1
    )
    assert int(decoded.zero.min()) == 1


def test_act_order_layer_runs_through_the_kernel_layer(layer_problem):
    """The module sorts features by group once; its forward equals the plain dequantized weight's."""
    weight, inputs = layer_problem
    hessian = 2 * inputs.T @ inputs / len(inputs)
    decoded = quantize_layer(weight, hessian, bits=4, group_size=64, sym=False, desc_act=True, damp_percent=0.01)
    layout = Layout("gptq", 4, 64, 256, 64)
    decoded.zero.clamp_(min=1)  # v1 storage
    layer = from_result(layout, decode(layout, encode(layout, decoded)), None, torch.device("cpu"))
    assert layer.order is not None
    x = inputs[:8]
    layer.select("cpu", torch.float32)
    torch.testing.assert_close(layer(x), x @ _weight(decoded).T, rtol=1e-5, atol=1e-4)
    layer.select("cpu", torch.bfloat16)
    assert layer.weight.kernel == "int4pack-cpu"
    x = x.to(torch.bfloat16)
    permuted = x.index_select(-1, layer.order)
    exact = (permuted.double() @ layer.weight.dequantize(torch.float64).T).float()
    assert ((layer(x).float() - exact).abs() <= layer.weight.error_bound(permuted).float()).all()
    assert torch.equal(layer.dequantized(torch.float32), _weight(decoded))
    for name, tensor in encode(layout, decoded).items():
        assert torch.equal(layer.state_dict()[name], tensor), name


def test_hessian_collector_averages_two_x_xt():
    linear = torch.nn.Linear(8, 4)
    collector = HessianCollector(linear, 8)
    batches = [torch.randn(3, 5, 8), torch.randn(2, 8)]
    for batch in batches:
        linear(batch)
    collector.remove()
    rows = torch.cat([batch.reshape(-1, 8) for batch in batches])
    assert collector.samples == 17
    torch.testing.assert_close(collector.hessian, 2 * rows.T @ rows / 17)


@pytest.mark.parametrize("settings", SETTINGS[:2], ids=["sym-g128", "asym-g32-act-order"])
def test_working_in_the_callers_hessian_gives_the_same_result_and_is_opt_in(layer_problem, settings):
    """``overwrite_hessian=True`` (what the per-block loop passes, so the widest Linear's [in, in] matrix is not
    copied) changes memory only; without it the caller's Hessian is left as it was."""
    weight, inputs = layer_problem
    hessian = 2 * inputs.T @ inputs / inputs.shape[0]
    kept = hessian.clone()
    copied = quantize_layer(weight, hessian, damp_percent=0.01, **settings)
    assert torch.equal(hessian, kept)
    in_place = quantize_layer(weight, hessian, damp_percent=0.01, overwrite_hessian=True, **settings)
    for name in ("codes", "scale", "zero", "g_idx"):
        assert torch.equal(getattr(copied, name), getattr(in_place, name)), name


def test_stage_hessians_hands_each_linear_a_hessian_of_its_own():
    """q/k/v share one input: each gets the Hessian of it, the first two a copy, the last the collected matrix."""
    from qcore.calibration import BlockInputs
    from qcore_gptq.gptq import stage_hessians

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.o = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.o(self.q(x) + self.k(x))

    block = Block()
    inputs = BlockInputs([(torch.randn(2, 5, 8),)], [{}])
    seen = []
    for name, hessian in stage_hessians(block, ["q", "k", "o"], inputs):
        seen.append((name, hessian))
        hessian.mul_(0)  # a caller may overwrite what it was handed; the next Linear's Hessian must not change
    assert [name for name, _ in seen] == ["q", "k", "o"]
    assert seen[0][1].data_ptr() != seen[1][1].data_ptr()
    x = inputs.args[0][0].reshape(-1, 8)
    expected = 2 * x.T @ x / x.shape[0]
    fresh = list(stage_hessians(Block(), ["q", "k"], inputs))
    for _, hessian in fresh:
        assert torch.allclose(hessian, expected, atol=1e-5)
