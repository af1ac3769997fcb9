"""The inverse of load_weight: ``qcore.dequantize``, ``DequantizedSource``, ``qcore convert``; and stored metadata."""

from __future__ import annotations

import json

import pytest
import qcore
import tiny_models
import torch
import toy_backend
import toy_calibrating
from click.testing import CliRunner
from qcore import hookimpl
from qcore.checkpoint import read_header
from qcore.cli import cli
from qcore.convert import DequantizedSource, convert
from torch import nn

TOY = {"quant_method": "toy_int8"}
IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def saved_toy(checkpoints, tmp_path_factory):
    """A toy_int8 checkpoint of the tiny llama."""
    plugin = toy_backend.ToyPlugin()
    qcore.register_plugin(plugin, "toy-saver")
    try:
        out = tmp_path_factory.mktemp("toy") / "llama-toy"
        qcore.save_pretrained(qcore.from_pretrained(checkpoints["llama"], TOY), out)
    finally:
        qcore.unregister_plugin("toy-saver")
    return out


def dequantized_weight(module):
    return module.weight.to(torch.float32) * module.weight_scale[:, None]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dequantize_gives_back_the_plain_modules_with_the_weights_the_model_computed_with(checkpoints, toy, arch):
    from transformers.pytorch_utils import Conv1D

    model = qcore.from_pretrained(checkpoints[arch], TOY)
    quantized = {name: dequantized_weight(model.get_submodule(name)) for name in model.qcore_applied}
    before = tiny_models.logits(model)
    assert qcore.dequantize(model) is model
    for name, weight in quantized.items():
        module = model.get_submodule(name)
        assert isinstance(module, (nn.Linear, Conv1D))
        plain = module.weight.T if isinstance(module, Conv1D) else module.weight
        assert torch.equal(plain, weight.to(plain.dtype))
    torch.testing.assert_close(tiny_models.logits(model), before, atol=2e-2, rtol=0)
    assert not model.is_quantized and not hasattr(model, "hf_quantizer") and model.qcore_applied == {}
    assert "quantization_config" not in model.config.to_dict()


def test_a_dequantized_model_saves_a_plain_checkpoint_transformers_loads(llama, toy, tmp_path):
    import transformers

    model = qcore.dequantize(qcore.from_pretrained(llama, TOY))
    qcore.save_pretrained(model, tmp_path / "plain")
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    assert torch.equal(tiny_models.logits(reference), tiny_models.logits(model))


def test_a_backend_without_dequantize_module_is_named(llama):
    class NoInverse(toy_backend.ToyPlugin):
        dequantize_module = None

    qcore.register_plugin(NoInverse(), "toy-no-inverse")
    try:
        model = qcore.from_pretrained(llama, TOY)
        with pytest.raises(qcore.ConfigError, match="implements no dequantize_module hook"):
            qcore.dequantize(model)
    finally:
        qcore.unregister_plugin("toy-no-inverse")


def test_a_dequantize_module_of_the_wrong_shape_is_a_plugin_error(llama):
    class Wrong(toy_backend.ToyPlugin):
        @hookimpl
        def dequantize_module(self, config, module_name, module, dtype):
            return {"weight": torch.zeros(3, 3, dtype=dtype)}

    qcore.register_plugin(Wrong(), "toy-wrong")
    try:
        with pytest.raises(qcore.PluginError, match="dequantize_module.*plain module holds"):
            qcore.dequantize(qcore.from_pretrained(llama, TOY))
    finally:
        qcore.unregister_plugin("toy-wrong")


def test_a_dequantized_source_lists_the_plain_tensors_and_empties_the_model_as_it_streams(saved_toy, toy):
    model = qcore.from_pretrained(saved_toy)
    source = DequantizedSource(model, saved_toy)
    assert source.tensors["model.layers.0.mlp.up_proj.weight"].shape == (128, 64)
    assert source.tensors["model.layers.0.mlp.up_proj.weight"].dtype == "BF16"
    assert "model.layers.0.mlp.up_proj.weight_scale" not in source.tensors
    expected = dequantized_weight(model.model.layers[0].mlp.up_proj).to(torch.bfloat16)
    held = []
    for name, tensor in source.stream():
        if name == "model.layers.0.mlp.up_proj.weight":
            assert torch.equal(tensor, expected)
        held.append(sum(p.numel() for p in model.parameters()))
    assert type(model.model.layers[0].mlp.up_proj) is nn.Module  # dropped once handed out
    assert held[-1] < held[0] / 2
    with pytest.raises(qcore.CheckpointError, match="already read once"):
        source.read("model.layers.0.mlp.up_proj.weight")


def test_convert_into_the_same_method_reproduces_the_model(saved_toy, toy, tmp_path):
    original = tiny_models.logits(qcore.from_pretrained(saved_toy))
    convert(saved_toy, tmp_path / "again", TOY)
    assert torch.equal(tiny_models.logits(qcore.from_pretrained(tmp_path / "again")), original)
    assert (tmp_path / "again" / "model.safetensors").is_file()


def test_convert_into_a_calibrating_method_streams_block_by_block(saved_toy, toy, tmp_path):
    calibrating = toy_calibrating.CalibratingPlugin()
    qcore.register_plugin(calibrating, "toy-calibrating")
    try:
        model = convert(saved_toy, tmp_path / "calibrated", {"quant_method": "toy_calibrated"}, calibration=IDS)
    finally:
        qcore.unregister_plugin("toy-calibrating")
    assert calibrating.blocks == ["model.layers.0", "model.layers.1"]
    original = tiny_models.logits(qcore.from_pretrained(saved_toy))
    assert torch.equal(tiny_models.logits(model), original)


def test_qcore_convert_writes_another_method_or_full_precision(saved_toy, toy, tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["convert", str(saved_toy), str(tmp_path / "toy"), "--preset", "toy-int8"])
    assert result.exit_code == 0, result.output
    assert "converted" in result.output
    result = runner.invoke(cli, ["convert", str(saved_toy), str(tmp_path / "plain"), "--full-precision"])
    assert result.exit_code == 0, result.output
    plain = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert "quantization_config" not in plain
    expected = qcore.dequantize(qcore.from_pretrained(saved_toy))
    assert torch.equal(tiny_models.logits(qcore.from_pretrained(tmp_path / "plain")), tiny_models.logits(expected))
    result = runner.invoke(cli, ["convert", str(saved_toy), str(tmp_path / "x")])
    assert result.exit_code == 2 and "choose how to quantize" in result.output


def test_calibration_file_option_reads_text_and_json(tmp_path):
    from qcore.cli.convert import read_calibration

    (tmp_path / "c.txt").write_text("Friends, Romans, countrymen")
    (tmp_path / "ids.json").write_text("[[1, 2, 3], [4, 5]]")
    (tmp_path / "bad.json").write_text('{"a": 1}')
    assert read_calibration(tmp_path / "c.txt") == "Friends, Romans, countrymen"
    assert read_calibration(tmp_path / "ids.json") == [[1, 2, 3], [4, 5]]
    import click

    with pytest.raises(click.BadParameter, match="list of texts or of token-id lists"):
        read_calibration(tmp_path / "bad.json")


# -- stored metadata -----------------------------------------------------------------------------------------


class Tagged:
    """Adds ``save_metadata``: the modules it owns, and a tag every backend of a load claims."""

    tag = "a"

    @hookimpl
    def save_metadata(self, config, model, modules):
        return {f"{self.name}.modules": json.dumps(list(modules)), "tag": self.tag}


class TaggedToy(Tagged, toy_backend.ToyPlugin):
    seen: dict = {}

    @hookimpl
    def load_weight(self, config, context, model, module_name, tensor_name, tensor):
        TaggedToy.seen = dict(context.checkpoint.metadata)
        return super().load_weight(config, context, model, module_name, tensor_name, tensor)


@pytest.fixture
def tagged():
    plugin = TaggedToy("tagged")
    qcore.register_plugin(plugin, "tagged")
    yield plugin
    qcore.unregister_plugin("tagged")


def test_save_metadata_entries_reach_every_shard_and_the_reload(llama, tagged, tmp_path):
    model = qcore.from_pretrained(llama, TOY)
    qcore.save_pretrained(model, tmp_path / "out", max_shard_size="100KB")
    shards = sorted((tmp_path / "out").glob("*.safetensors"))
    assert len(shards) > 1
    for shard in shards:
        _, metadata = read_header(shard)
        assert metadata["format"] == "pt" and metadata["tag"] == "a"
        assert json.loads(metadata["tagged.modules"]) == list(model.qcore_applied)
    qcore.from_pretrained(tmp_path / "out")
    assert TaggedToy.seen["tag"] == "a" and "tagged.modules" in TaggedToy.seen


@pytest.mark.parametrize(
    "entries, message",
    [({"x": 1}, "not a dict of str -> str"), ({"format": "np"}, "reserved for the format"), ([], "not a dict")],
)
def test_save_metadata_must_return_string_entries(llama, tmp_path, entries, message):
    class Bad(toy_backend.ToyPlugin):
        @hookimpl
        def save_metadata(self, config, model, modules):
            return entries

    qcore.register_plugin(Bad(), "toy-bad-metadata")
    try:
        model = qcore.from_pretrained(llama, TOY)
        with pytest.raises(qcore.PluginError, match=message):
            qcore.save_pretrained(model, tmp_path / "out")
        assert not (tmp_path / "out").exists()
    finally:
        qcore.unregister_plugin("toy-bad-metadata")


def test_two_backends_giving_one_metadata_key_different_values_is_an_error(llama, tagged, tmp_path):
    class TaggedCalibrating(Tagged, toy_calibrating.CalibratingPlugin):
        tag = "b"

    qcore.register_plugin(TaggedCalibrating(), "tagged-calibrating")
    try:
        recipe = {"rules": [{"pattern": "*.mlp.*", "config": TOY}], "default": {"quant_method": "toy_calibrated"}}
        model = qcore.from_pretrained(llama, recipe, calibration=IDS)
        with pytest.raises(qcore.PluginError, match="metadata key 'tag' is also given by"):
            qcore.save_pretrained(model, tmp_path / "out")
    finally:
        qcore.unregister_plugin("tagged-calibrating")
