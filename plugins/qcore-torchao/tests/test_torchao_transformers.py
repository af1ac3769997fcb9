"""Against transformers' own ``TorchAoConfig`` path, for each config torchao runs on the CPU: the same logits on the
fly (``torch.equal``), the same checkpoint (tensor names, safetensors header, quantization_config), each reads the
other's checkpoint with the same logits, and transformers' reference fixture loads with its recorded logits."""

from __future__ import annotations

import json

import pytest
import qcore
import torch
from qcore.testing import logits
from safetensors import safe_open
from safetensors.torch import load_file

torchao = pytest.importorskip("torchao")
from torchao.core.config import config_to_dict  # noqa: E402
from torchao.quantization import (  # noqa: E402
    Float8WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    IntxWeightOnlyConfig,
    PerGroup,
)
from transformers import AutoModelForCausalLM, TorchAoConfig  # noqa: E402

CPU_CONFIGS = {
    "int8-weight-only": Int8WeightOnlyConfig(),
    "int8-dynamic": Int8DynamicActivationInt8WeightConfig(),
    "float8-weight-only": Float8WeightOnlyConfig(),
    "intx-weight-only": IntxWeightOnlyConfig(),
    "intx-int4-g32": IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)),
}


@pytest.fixture(scope="module", params=list(CPU_CONFIGS))
def both(request, llama, tmp_path_factory):
    """(transformers' model, qcore's model, transformers' checkpoint, qcore's checkpoint) for one config."""
    config = CPU_CONFIGS[request.param]
    reference = AutoModelForCausalLM.from_pretrained(
        llama, quantization_config=TorchAoConfig(config), dtype=torch.bfloat16
    )
    ours = qcore.from_pretrained(
        llama, {"quant_method": "torchao", "quant_type": {"default": config_to_dict(config)}}, dtype=torch.bfloat16
    )
    root = tmp_path_factory.mktemp(request.param)
    reference.save_pretrained(root / "transformers")
    qcore.save_pretrained(ours, root / "qcore")
    return reference, ours, root / "transformers", root / "qcore"


def test_logits_equal_transformers_torchao_path(both):
    reference, ours, _, _ = both
    assert torch.equal(logits(ours), logits(reference))


def test_checkpoint_is_transformers_format_exactly(both):
    _, _, theirs, mine = both
    with safe_open(theirs / "model.safetensors", "pt") as a, safe_open(mine / "model.safetensors", "pt") as b:
        assert a.metadata() == b.metadata()
        assert set(a.keys()) == set(b.keys())
    expected, written = load_file(theirs / "model.safetensors"), load_file(mine / "model.safetensors")
    assert all(torch.equal(expected[name], written[name]) for name in expected)
    config = [json.loads((d / "config.json").read_text())["quantization_config"] for d in (theirs, mine)]
    assert config[0] == config[1]


def test_each_loads_the_others_checkpoint(both):
    reference, ours, theirs, mine = both
    assert torch.equal(logits(qcore.from_pretrained(theirs)), logits(reference))
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(mine)), logits(ours))


def test_transformers_reference_fixture_loads_with_its_logits(fixtures):
    """Bit for bit with transformers' own load of the fixture here; within float32 rounding (1e-5, measured 9.5e-7) of
    the logits recorded with transformers 5.23, which transformers 5.24 itself reproduces only to the same 9.5e-7."""
    directory = fixtures / "ao-int8wo-fp32-688"
    expected = load_file(directory / "expected.safetensors")
    model = qcore.from_pretrained(directory)
    assert type(model.model.layers[0].self_attn.q_proj.weight).__name__ == "Int8Tensor"
    reference = AutoModelForCausalLM.from_pretrained(directory, device_map="cpu")
    with torch.no_grad():
        result = model(expected["input_ids"]).logits
        assert torch.equal(result, reference(expected["input_ids"]).logits)
    torch.testing.assert_close(result, expected["logits"], rtol=0, atol=1e-5)
