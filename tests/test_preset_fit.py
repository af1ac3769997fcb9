"""A preset offered for a model loads it: where hqq's group size does not fit a layer (an MLP width of 1376 against
groups of 64), the layer takes the largest group size that fits, or full precision when none does; the load reports
it, ``qcore estimate`` lists it, and ``strict_group_size`` makes it an error instead.

The tiny Llama here has an MLP width of 96 (like 1376, not a multiple of 64): ``down_proj`` takes groups of 48.
"""

from __future__ import annotations

import json

import pytest
import qcore
import torch
from click.testing import CliRunner
from qcore.cli import cli
from qcore.testing.models import build
from tiny_models import logits

pytest.importorskip("qcore_hqq")

HQQ_4BIT = {"quant_method": "hqq", "nbits": 4, "group_size": 64, "axis": 1}
DOWN = "model.layers.0.mlp.down_proj"


@pytest.fixture(scope="module")
def mlp_96(tmp_path_factory):
    return build("llama", tmp_path_factory.mktemp("fit") / "llama", intermediate_size=96)


def test_a_layer_the_group_size_does_not_divide_takes_the_largest_that_does(mlp_96, tmp_path):
    model = qcore.from_pretrained(mlp_96, HQQ_4BIT)
    assert model.model.layers[0].mlp.down_proj.meta["group_size"] == 48
    assert model.model.layers[0].mlp.up_proj.meta["group_size"] == 64
    assert model.qcore_fallbacks[DOWN] == "group_size 48 instead of 64 ('group_size'=64 does not divide in_features=96)"
    assert set(model.qcore_fallbacks) == {f"model.layers.{i}.mlp.down_proj" for i in range(2)}
    qcore.save_pretrained(model, tmp_path / "out")
    reloaded = qcore.from_pretrained(tmp_path / "out")
    assert reloaded.model.layers[0].mlp.down_proj.meta["group_size"] == 48
    assert torch.equal(logits(reloaded), logits(model))


def test_a_layer_no_group_size_fits_stays_in_full_precision(tmp_path):
    odd = build("llama", tmp_path / "odd", intermediate_size=100)  # no multiple of 8 divides 100
    model = qcore.from_pretrained(odd, HQQ_4BIT)
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert model.qcore_fallbacks[DOWN].startswith("kept in full precision")


def test_strict_group_size_makes_it_an_error_naming_the_module(mlp_96):
    with pytest.raises(qcore.ConfigError, match=rf"'group_size'=64 does not divide in_features=96 of module '{DOWN}'"):
        qcore.from_pretrained(mlp_96, {**HQQ_4BIT, "strict_group_size": True})


def test_the_estimate_counts_and_lists_the_fallback(mlp_96):
    plan = qcore.loading.plan(mlp_96)
    model = qcore.from_pretrained(mlp_96, HQQ_4BIT)
    assert plan.fallbacks(HQQ_4BIT) == model.qcore_fallbacks
    from qcore_hqq import HqqConfig

    # Sizes are counted for what each module gets: the smaller group size, or full precision.
    assert HqqConfig(group_size=64).quantized_nbytes(64, 96, 2) == HqqConfig(group_size=48).quantized_nbytes(64, 96, 2)
    assert HqqConfig(group_size=64).quantized_nbytes(64, 100, 2) == 64 * 100 * 2
    result = CliRunner().invoke(cli, ["estimate", str(mlp_96), "--preset", "hqq-4bit", "--json"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)["presets"]
    assert row["fallbacks"] == model.qcore_fallbacks
    table = " ".join(CliRunner().invoke(cli, ["estimate", str(mlp_96), "--preset", "hqq-4bit"]).stdout.split())
    assert "hqq-4bit: group_size 48 instead of 64" in table and f"for 2 module(s), e.g. {DOWN}" in table


def test_the_quantize_summary_reports_the_fallback(mlp_96, tmp_path):
    result = CliRunner().invoke(cli, ["quantize", str(mlp_96), str(tmp_path / "out"), "--preset", "hqq-4bit"])
    assert result.exit_code == 0, result.output
    assert "fallbacks" in result.stdout and "2 module(s) did not fit the settings" in result.stdout


def test_the_readme_mixed_recipe_loads_a_model_whose_mlp_width_is_not_a_multiple_of_64(mlp_96):
    recipe = qcore.Recipe(
        [("*self_attn*", {"quant_method": "bitsandbytes", "load_in_8bit": True}),
         ("*mlp*", {"quant_method": "hqq", "nbits": 4, "group_size": 64}),
         ("lm_head", None)],
        default=None,
    )  # fmt: skip
    model = qcore.from_pretrained(mlp_96, recipe, dtype=torch.bfloat16)
    assert DOWN in model.qcore_fallbacks
