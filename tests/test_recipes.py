"""Mixed-backend recipes end to end, and the automatic recipe under a memory budget."""

from __future__ import annotations

import json

import pytest
import qcore
import torch
from qcore.sensitivity import auto_recipe, measure_sensitivity
from tiny_models import logits

pytest.importorskip("qcore_bnb", reason="the three-way recipe needs qcore-bnb")
pytest.importorskip("qcore_hqq", reason="the three-way recipe needs qcore-hqq")

BNB_INT8 = {"quant_method": "bitsandbytes", "load_in_8bit": True}
HQQ_4BIT = {"quant_method": "hqq", "nbits": 4, "group_size": 64}
THREE_WAY = qcore.Recipe([("*self_attn*", BNB_INT8), ("*mlp*", HQQ_4BIT), ("lm_head", None)])


@pytest.fixture(scope="module")
def mixed(checkpoints):
    return qcore.from_pretrained(checkpoints["llama"], THREE_WAY, dtype=torch.bfloat16)


def test_each_backend_gets_only_its_modules(mixed):
    layer = mixed.model.layers[0]
    assert type(layer.self_attn.q_proj).__name__ == "Linear8bitLt"
    assert "HQQ" in type(layer.mlp.up_proj).__name__
    assert type(mixed.lm_head) is torch.nn.Linear
    assert torch.isfinite(logits(mixed).float()).all()


def test_three_way_recipe_saves_its_assignment_and_reloads_identically(mixed, tmp_path):
    qcore.save_pretrained(mixed, tmp_path / "mixed")
    stored = json.loads((tmp_path / "mixed" / "config.json").read_text())["quantization_config"]
    assert stored["quant_method"] == "qcore_recipe"
    methods = {stored["configs"][index]["quant_method"] for index in stored["modules"].values()}
    assert methods == {"bitsandbytes", "hqq"}
    assert stored["modules"]["model.layers.0.self_attn.q_proj"] != stored["modules"]["model.layers.0.mlp.up_proj"]
    assert "lm_head" not in stored["modules"]
    reloaded = qcore.from_pretrained(tmp_path / "mixed")
    assert torch.equal(logits(reloaded), logits(mixed))


def test_unmatched_rule_is_reported(llama, caplog):
    qcore.from_pretrained(llama, qcore.Recipe([("*no_such_layer*", HQQ_4BIT)], default=HQQ_4BIT), dtype=torch.bfloat16)
    assert "recipe rule '*no_such_layer*' matched no module" in caplog.text


def test_every_backend_validates_before_any_weight_is_read(llama, monkeypatch):
    import sys

    read, validated = [], []
    monkeypatch.setattr(qcore.checkpoint.CheckpointReader, "stream", lambda self, *a: read.append(1) or iter(()))
    monkeypatch.setattr(qcore.checkpoint.CheckpointReader, "__init__", lambda self, *a, **k: read.append(1))

    class Spy:
        @qcore.hookimpl(wrapper=True)
        def validate(self, config, context):
            validated.append(config.quant_method)
            return (yield)

    qcore.register_plugin(Spy(), "spy")
    monkeypatch.setitem(sys.modules, "hqq", None)  # the second backend's library is missing
    try:
        with pytest.raises(qcore.BackendUnavailable, match="pip install"):
            qcore.from_pretrained(llama, qcore.Recipe([("*self_attn*", BNB_INT8), ("*mlp*", HQQ_4BIT)]))
    finally:
        qcore.unregister_plugin("spy")
    assert validated == ["bitsandbytes", "hqq"] and read == []


def test_single_method_recipe_saves_the_plain_format_transformers_reads(llama, tmp_path):
    import transformers

    recipe = qcore.Recipe([("*mlp*", BNB_INT8)])
    model = qcore.from_pretrained(llama, recipe, dtype=torch.float32)
    qcore.save_pretrained(model, tmp_path / "plain")
    stored = json.loads((tmp_path / "plain" / "config.json").read_text())["quantization_config"]
    assert (
        stored["quant_method"] == "bitsandbytes"
        and "model.layers.0.self_attn.q_proj" in stored["llm_int8_skip_modules"]
    )
    by_transformers = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    assert type(by_transformers.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert torch.equal(logits(by_transformers), logits(model))


def test_auto_recipe_fits_the_budget_and_beats_the_best_single_preset(llama):
    candidates = {"hqq-2bit": {**HQQ_4BIT, "nbits": 2}, "hqq-4bit": HQQ_4BIT, "hqq-8bit": {**HQQ_4BIT, "nbits": 8}}
    measured = measure_sensitivity(llama, candidates, dtype=torch.bfloat16)
    uniform = {name: {layer: name for layer in measured.errors} for name in candidates}
    sizes = {name: measured.total_nbytes(choice) for name, choice in uniform.items()}
    errors = {name: measured.total_error(choice) for name, choice in uniform.items()}
    budget = (sizes["hqq-4bit"] + sizes["hqq-8bit"]) // 2  # 4-bit fits, 8-bit does not
    chosen = auto_recipe(measured, budget)
    assert chosen.predicted_nbytes <= budget
    assert chosen.predicted_error < errors["hqq-4bit"]  # the best single preset that fits the budget
    model = qcore.from_pretrained(llama, chosen.recipe, dtype=torch.bfloat16)
    assert qcore.loading.plan(llama, dtype=torch.bfloat16).nbytes(chosen.recipe) <= budget
    assert torch.isfinite(logits(model).float()).all()


def test_auto_recipe_refuses_an_impossible_budget(llama):
    measured = measure_sensitivity(llama, {"hqq-4bit": HQQ_4BIT}, dtype=torch.bfloat16)
    with pytest.raises(qcore.ConfigError, match="the smallest possible is"):
        auto_recipe(measured, 1000)


def test_validated_recipe_offers_the_best_scored_recipe_and_a_mix_only_when_it_beats_the_single_preset(llama):
    from qcore.evaluate import perplexity
    from qcore.sensitivity import validated_recipe

    candidates = {"hqq-2bit": {**HQQ_4BIT, "nbits": 2}, "hqq-4bit": HQQ_4BIT, "hqq-8bit": {**HQQ_4BIT, "nbits": 8}}
    measured = measure_sensitivity(llama, candidates, dtype=torch.bfloat16)
    uniform = {name: {layer: name for layer in measured.errors} for name in candidates}
    sizes = {name: measured.total_nbytes(choice) for name, choice in uniform.items()}
    budget = (sizes["hqq-4bit"] + sizes["hqq-8bit"]) // 2
    validation = torch.randint(0, 256, (1, 96), generator=torch.Generator().manual_seed(1))
    lines = []
    checked = validated_recipe(llama, measured, budget, validation, dtype=torch.bfloat16, progress=lines.append)

    assert list(checked.tried)[-1] == "hqq-4bit everywhere"  # the best single preset that fits
    assert len(lines) == len(checked.tried) == len(checked.perplexity)
    for label, tried in checked.tried.items():
        assert tried.predicted_nbytes <= budget
        model = qcore.from_pretrained(llama, tried.recipe, dtype=torch.bfloat16)
        assert perplexity(model, input_ids=validation).perplexity == checked.perplexity[label]
    single = checked.perplexity["hqq-4bit everywhere"]
    assert checked.perplexity[checked.label] == min(checked.perplexity.values())
    assert checked.label == "hqq-4bit everywhere" or checked.perplexity[checked.label] < single
    assert checked.chosen is checked.tried[checked.label]


def test_validated_recipe_needs_a_single_candidate_that_fits(llama):
    from qcore.sensitivity import validated_recipe

    measured = measure_sensitivity(llama, {"hqq-4bit": HQQ_4BIT}, dtype=torch.bfloat16)
    with pytest.raises(qcore.ConfigError, match="no single candidate fits"):
        validated_recipe(llama, measured, measured.fixed_nbytes + 1, torch.zeros(1, 8, dtype=torch.long))


def test_a_budget_equal_to_a_single_candidates_size_can_choose_it_everywhere(llama):
    """The knapsack's grid rounds only the bytes beyond each layer's smallest option, so an exact fit stays a fit."""
    candidates = {"hqq-4bit": HQQ_4BIT, "hqq-8bit": {**HQQ_4BIT, "nbits": 8}}
    measured = measure_sensitivity(llama, candidates, dtype=torch.bfloat16)
    four_bit = {layer: "hqq-4bit" for layer in measured.errors}
    chosen = auto_recipe(measured, measured.total_nbytes(four_bit), candidates=["hqq-4bit", "hqq-8bit"])
    assert chosen.choice == four_bit and chosen.predicted_nbytes == measured.total_nbytes(four_bit)
