"""The config dict in its three forms (transformers' full form, the short name, FqnToConfig per module), checked
against qcore's own table before torchao sees a name from it; device needs refused in ``validate`` with what is
needed; stored headers checked before a tensor subclass is built; ``"compile"`` as a loading attribute."""

from __future__ import annotations

import json

import pytest
import qcore
import torch
from qcore.testing import hostile, logits
from qcore_torchao import TorchAoConfig

INT8 = {"_type": "Int8WeightOnlyConfig", "_version": 2, "_data": {}}


def test_short_name_and_bare_config_mean_the_full_form():
    full = TorchAoConfig.from_dict({"quant_method": "torchao", "quant_type": {"default": INT8}})
    assert TorchAoConfig.from_dict({"quant_type": "int8_weight_only"}) == full
    assert TorchAoConfig.from_dict({"quant_type": INT8}) == full
    assert full.to_dict() == {
        "quant_method": "torchao", "quant_type": {"default": INT8}, "modules_to_not_convert": None,
        "include_input_output_embeddings": False, "untie_embedding_weights": False,
    }  # fmt: skip


def test_the_table_matches_torchao_defaults():
    """Every field torchao 0.18 writes for each served config is in qcore's table, with its version."""
    from qcore_torchao.config import CONFIGS, object_problem
    from qcore_torchao.layers import _CLASSES
    from torchao.core.config import config_to_dict

    for name in CONFIGS:
        assert object_problem(config_to_dict(_CLASSES[name]()), name, exact=True) is None, name


@pytest.mark.parametrize(
    ("quant_type", "match"),
    [
        ({"_type": "__import__('os').system", "_data": {}}, "_type is"),
        ({"_type": "Int8WeightOnlyConfig", "_data": {"group_size": "1"}}, "group_size is '1'"),
        ({"_type": "Int8WeightOnlyConfig", "_data": {"evil": 1}}, "has no field"),
        ({"_type": "Int8WeightOnlyConfig", "_version": 1, "_data": {}}, "_version is 1"),
        (
            {"_type": "Float8WeightOnlyConfig", "_data": {"weight_dtype": {"_type": "torch.dtype", "_data": "load"}}},
            "weight_dtype is",
        ),
        (
            {
                "_type": "IntxWeightOnlyConfig",
                "_data": {"mapping_type": {"_type": "MappingType", "_data": "__class__"}},
            },
            "mapping_type is",
        ),
        ({"_type": "PerRow", "_data": {}}, "use one of"),
        ("int3_weight_only", "not one of"),
    ],
)
def test_names_outside_the_table_are_config_errors(quant_type, match):
    with pytest.raises(qcore.ConfigError, match=match):
        TorchAoConfig.from_dict({"quant_method": "torchao", "quant_type": quant_type})


def test_torchao_never_resolves_a_name_qcore_did_not_allow(llama, tmp_path, monkeypatch):
    """torchao's object_from_dict (it looks names from the file up on torch) is never called, and its
    config_from_dict (it imports the class a ``_type`` names) only sees dicts that passed qcore's table: the core hands
    transformers' TorchAoConfig the checked config, so that ``model.hf_quantizer`` is transformers' own."""
    import torchao.core.config
    import torchao.prototype.safetensors.safetensors_utils as utils
    from qcore_torchao.config import ENUMS, SCHEMA

    seen = []
    original = torchao.core.config.config_from_dict

    def names(value):
        if isinstance(value, dict):
            if "_type" in value:
                yield value["_type"]
            for item in value.values():
                yield from names(item)
        elif isinstance(value, list):
            for item in value:
                yield from names(item)

    def recording(data):
        seen.extend(names(data))
        return original(data)

    def refuse(*args, **kwargs):
        raise AssertionError("torchao's object_from_dict was handed data from the checkpoint")

    monkeypatch.setattr(torchao.core.config, "config_from_dict", recording)
    monkeypatch.setattr(utils, "object_from_dict", refuse)
    model = qcore.from_pretrained(llama, {"quant_method": "torchao", "quant_type": "int8_weight_only"})
    qcore.save_pretrained(model, tmp_path / "out")
    assert torch.equal(logits(qcore.from_pretrained(tmp_path / "out")), logits(model))
    assert set(seen) <= {*SCHEMA, *ENUMS, "torch.dtype"}


def test_fqn_to_config_quantizes_per_module_as_transformers_does(llama, tmp_path):
    from torchao.quantization import Float8WeightOnlyConfig, FqnToConfig, Int8WeightOnlyConfig
    from transformers import AutoModelForCausalLM
    from transformers import TorchAoConfig as HfTorchAoConfig

    per_module = FqnToConfig(
        {"model.layers.0.self_attn.q_proj": Int8WeightOnlyConfig(), r"re:.*mlp\.down_proj": Float8WeightOnlyConfig()}
    )
    reference = AutoModelForCausalLM.from_pretrained(
        llama, quantization_config=HfTorchAoConfig(per_module), dtype=torch.bfloat16
    )
    reference.save_pretrained(tmp_path / "transformers")
    written = json.loads((tmp_path / "transformers" / "config.json").read_text())["quantization_config"]
    model = qcore.from_pretrained(llama, written, dtype=torch.bfloat16)
    layers = model.model.layers
    assert type(layers[0].self_attn.q_proj.weight).__name__ == "Int8Tensor"
    assert type(layers[1].mlp.down_proj.weight).__name__ == "Float8Tensor"
    assert type(layers[0].self_attn.k_proj) is torch.nn.Linear and type(layers[1].self_attn.q_proj) is torch.nn.Linear
    assert torch.equal(logits(model), logits(reference))
    qcore.save_pretrained(model, tmp_path / "qcore")
    assert torch.equal(logits(qcore.from_pretrained(tmp_path / "qcore")), logits(model))
    assert torch.equal(logits(qcore.from_pretrained(tmp_path / "transformers")), logits(reference))


@pytest.mark.parametrize(
    ("quant_type", "need"),
    [
        ("int4_weight_only", "Int4WeightOnlyConfig needs CUDA"),
        ("float8_dynamic_activation_float8_weight", "needs a CUDA GPU with FP8"),
    ],
)
def test_a_config_this_device_cannot_run_is_refused_before_any_weight(llama, quant_type, need, monkeypatch):
    from qcore.checkpoint import CheckpointReader

    monkeypatch.setattr(CheckpointReader, "read", lambda *a: pytest.fail("a weight was read"))
    with pytest.raises(qcore.BackendUnavailable, match=need):
        qcore.from_pretrained(llama, {"quant_method": "torchao", "quant_type": quant_type}, device_map="cpu")


def test_a_resolved_map_that_sends_a_layer_to_the_cpu_is_refused_naming_it():
    """On a GPU, "auto" may put layers the GPU cannot hold on the CPU, where a CUDA-only config cannot run: the
    resolved map is checked in update_device_map, before any weight is read (here without a GPU: cuda entries
    would need one to ask their compute capability)."""
    import types

    from qcore_torchao import plugin

    config = qcore.QuantConfig.from_dict({"quant_method": "torchao", "quant_type": "int4_weight_only"})
    context = types.SimpleNamespace(pre_quantized=False)
    resolved = {"model.embed_tokens": "cpu", "model.layers.1": "cpu", "lm_head": "disk"}
    with pytest.raises(qcore.BackendUnavailable, match=r"needs CUDA.*'model.embed_tokens' on cpu.*max_memory"):
        plugin.update_device_map(config=config, context=context, device_map=resolved)
    plugin.update_device_map(config=config, context=types.SimpleNamespace(pre_quantized=True), device_map=resolved)
    cpu_config = qcore.QuantConfig.from_dict({"quant_method": "torchao", "quant_type": "int8_weight_only"})
    plugin.update_device_map(config=cpu_config, context=context, device_map=resolved)  # runs on the CPU: no error


@pytest.fixture(scope="module")
def saved(llama, tmp_path_factory):
    model = qcore.from_pretrained(llama, {"quant_method": "torchao", "quant_type": "int8_weight_only"})
    directory = tmp_path_factory.mktemp("saved") / "int8"
    qcore.save_pretrained(model, directory)
    return directory


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda m, key: m.pop("tensor_names"), "tensor_names"),
        (lambda m, key: m.update({key: m[key].replace('"Int8Tensor"', '"Int4Tensor"')}), "_type is 'Int4Tensor'"),
        (
            lambda m, key: m.update({key: m[key].replace('"block_size": [1, 128]', '"block_size": [1, 48]')}),
            "block_size",
        ),
        (lambda m, key: m.update({key: m[key].replace('"bfloat16"', '"uint8"')}), "dtype is"),
    ],
)
def test_damaged_headers_are_checkpoint_errors_naming_the_tensor(saved, tmp_path, change, match):
    file = saved / "model.safetensors"
    _, metadata = hostile.stored_tensors(file)
    key = "model.layers.0.self_attn.q_proj.weight"
    change(metadata, key)
    case = hostile.write_copy(saved, tmp_path / "case", {}, metadata=metadata)
    with pytest.raises(qcore.CheckpointError, match=match) as error:
        qcore.from_pretrained(case)
    # Without tensor_names every module is refused: the first whose tensors all arrive is named.
    assert error.value.tensor.startswith("model.layers.0." if match == "tensor_names" else key.removesuffix(".weight"))


def test_compile_is_a_loading_attribute_never_saved(saved, tmp_path):
    model = qcore.from_pretrained(saved, {"quant_method": "torchao", "quant_type": "int8_weight_only", "compile": True})
    assert "torch.compile" in model.qcore_kernels["qcore-torchao"]
    assert hasattr(model.forward, "_torchdynamo_orig_callable")  # compiled lazily, on the first call
    qcore.save_pretrained(model, tmp_path / "again")
    stored = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]
    assert "compile" not in stored
    assert not hasattr(qcore.from_pretrained(tmp_path / "again").forward, "_torchdynamo_orig_callable")
