"""Calibration through the streaming load: one decoder block at a time, with the calibration batch's activations."""

from __future__ import annotations

import pytest
import qcore
import tiny_models
import torch
import toy_backend
import toy_calibrating
from qcore import calibration, corpus, hookimpl

IDS = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
CALIBRATED = {"quant_method": "toy_calibrated"}
TOY = {"quant_method": "toy_int8"}


@pytest.fixture
def calibrating():
    plugin = toy_calibrating.CalibratingPlugin()
    qcore.register_plugin(plugin, "toy-calibrating")
    yield plugin
    qcore.unregister_plugin("toy-calibrating")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_calibrated_load_builds_the_same_model_as_the_per_tensor_load(checkpoints, toy, calibrating, arch):
    # The toy calibrating backend quantizes exactly as the toy backend does, so any difference is the mechanism's.
    per_tensor = qcore.from_pretrained(checkpoints[arch], TOY)
    calibrated = qcore.from_pretrained(checkpoints[arch], CALIBRATED, calibration=IDS)
    assert torch.equal(tiny_models.logits(calibrated), tiny_models.logits(per_tensor))
    assert calibrated.qcore_kernels == {"toy-calibrating": "toy-dequant-matmul"}


def test_blocks_arrive_in_model_order_one_at_a_time_in_full_precision(llama, calibrating):
    qcore.from_pretrained(llama, CALIBRATED, calibration=IDS)
    assert calibrating.blocks == ["model.layers.0", "model.layers.1"]
    assert all(calibrating.meta_after.values()), "a later block was already read when a block was calibrated"
    assert not any(calibrating.earlier_in_full_precision.values()), "an earlier block was still in full precision"
    assert not any(calibrating.alive_earlier.values()), f"freed too late: {calibrating.alive_earlier}"
    assert calibrating.dtypes == {torch.bfloat16}


def test_each_block_receives_what_the_quantized_blocks_before_it_produce(llama, calibrating):
    model = qcore.from_pretrained(llama, CALIBRATED, calibration=IDS)
    with torch.no_grad():
        for number, ids in enumerate(IDS):
            hidden = model(ids[None], output_hidden_states=True).hidden_states
            for block in range(2):
                assert torch.equal(calibrating.inputs[f"model.layers.{block}"][number], hidden[block])


def test_every_linear_of_a_block_sees_every_calibration_sequence(llama, calibrating):
    qcore.from_pretrained(llama, CALIBRATED, calibration=IDS)
    assert len(calibrating.activations) == 14  # 7 Linears in each of 2 blocks
    assert set(calibrating.activations.values()) == {len(IDS)}


def test_a_calibrated_model_saves_and_reloads_without_calibrating(llama, calibrating, tmp_path):
    model = qcore.from_pretrained(llama, CALIBRATED, calibration=IDS)
    qcore.save_pretrained(model, tmp_path / "out")
    calibrating.blocks.clear()
    reloaded = qcore.from_pretrained(tmp_path / "out")
    assert calibrating.blocks == []
    assert torch.equal(tiny_models.logits(reloaded), tiny_models.logits(model))


def test_modules_of_other_backends_in_a_block_are_quantized_by_load_weight(llama, toy, calibrating):
    recipe = {"rules": [{"pattern": "*.mlp.*", "config": TOY}], "default": CALIBRATED}
    model = qcore.from_pretrained(llama, recipe, calibration=IDS)
    assert all("mlp" not in name for name in calibrating.activations)
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "ToyLinear"
    per_tensor = qcore.from_pretrained(llama, TOY)
    assert torch.equal(tiny_models.logits(model), tiny_models.logits(per_tensor))


@pytest.mark.parametrize(
    "data, message",
    [
        ([], "calibration data is empty"),
        ([[5]], "fewer than 2 tokens"),
        (["some text"], "cannot be loaded"),
        ([object()], "neither text nor token ids"),
    ],
    ids=["empty", "one-token", "text-without-tokenizer", "not-data"],
)
def test_bad_calibration_data_is_refused_before_any_weight_is_read(llama, calibrating, monkeypatch, data, message):
    monkeypatch.setattr(qcore.checkpoint.CheckpointReader, "stream", lambda *a, **k: pytest.fail("a weight was read"))
    with pytest.raises(qcore.ConfigError, match=message):
        qcore.from_pretrained(llama, CALIBRATED, calibration=data)


def test_texts_are_tokenized_and_the_built_in_corpus_is_the_default(llama, calibrating, tmp_path):
    import shutil

    directory = shutil.copytree(llama, tmp_path / "with-tokenizer")
    qcore.testing.models.add_byte_tokenizer(directory)
    sequences = calibration.calibration_batch(None, directory, 128)
    assert len(sequences) == calibration.SEQUENCES and {s.shape for s in sequences} == {torch.Size([1, 128])}
    assert bytes(sequences[0][0].tolist()) == "\n\n".join(corpus.calibration_texts()).encode()[:128]
    text = "To be, or not to be: that is the question. " * 8  # 352 bytes: two whole sequences of 128 tokens
    qcore.from_pretrained(directory, CALIBRATED, calibration=[text])
    assert [h.shape[1] for h in calibrating.inputs["model.layers.0"]] == [128, 128]


def test_the_built_in_corpus_is_public_domain_text_with_a_held_out_part():
    calibration_texts, evaluation_texts = corpus.calibration_texts(), corpus.evaluation_texts()
    assert [t.split("\n")[0] for t in calibration_texts] == ["Macbeth", "Julius Caesar"]
    assert [t.split("\n")[0] for t in evaluation_texts] == ["The Tempest"]
    assert not set(calibration_texts) & set(evaluation_texts)
    size = sum(len(t.encode()) for t in calibration_texts + evaluation_texts)
    assert 200_000 < size < 400_000
    assert "Shakespeare" in corpus.__doc__ and "public domain" in corpus.__doc__


def test_a_calibration_preprocess_that_replaces_its_modules_is_a_plugin_error(llama, calibrating, monkeypatch):
    monkeypatch.setattr(
        toy_calibrating.CalibratingPlugin,
        "preprocess_model",
        hookimpl(
            lambda self, config, context, model: toy_backend.ToyPlugin.preprocess_model(self, config, context, model)
        ),
    )
    qcore.unregister_plugin("toy-calibrating")
    qcore.register_plugin(calibrating, "toy-calibrating")
    with pytest.raises(qcore.PluginError, match="leave context.modules as they are"):
        qcore.from_pretrained(llama, CALIBRATED, calibration=IDS)


def test_a_calibrate_block_that_keeps_a_module_in_full_precision_is_a_plugin_error(llama, monkeypatch):
    class Lazy(toy_calibrating.CalibratingPlugin):
        @hookimpl
        def calibrate_block(self, config, context, model, block_name, block, inputs):
            pass

    qcore.register_plugin(Lazy(), "toy-lazy")
    try:
        with pytest.raises(qcore.PluginError, match="calibrate_block.*left the module in full precision"):
            qcore.from_pretrained(llama, CALIBRATED, calibration=IDS)
    finally:
        qcore.unregister_plugin("toy-lazy")


def test_calibration_given_to_a_load_that_needs_none_is_only_a_warning(llama, toy, caplog):
    qcore.from_pretrained(llama, TOY, calibration=IDS)
    assert "no config of this load needs calibration" in caplog.text


def test_a_model_with_no_list_of_blocks_cannot_be_calibrated():
    from torch import nn

    with pytest.raises(qcore.ConfigError, match="no list of decoder blocks"):
        calibration.decoder_blocks(nn.Sequential(nn.Linear(2, 2)), ["0"])


def test_block_inputs_advance_keeps_every_argument_but_the_hidden_states():
    hidden, mask = torch.ones(1, 2, 4), torch.zeros(1, 1, 2, 2)
    by_position = calibration.BlockInputs([(hidden, mask)], [{"position_ids": 1}])
    by_keyword = calibration.BlockInputs([()], [{"hidden_states": hidden, "attention_mask": mask}])
    new = torch.full((1, 2, 4), 2.0)
    assert by_position.advanced([new]).args[0][0] is new and by_position.advanced([new]).args[0][1] is mask
    assert by_keyword.advanced([new]).kwargs[0]["hidden_states"] is new
    assert by_keyword.advanced([new]).hidden_states() == [new]
    assert by_position.run(lambda h, m, position_ids: (h * 3, None))[0].eq(3).all()
