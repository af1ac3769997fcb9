"""``qcore sensitivity`` on real text by default: the batch is text, the chosen recipe is scored end to end on
held-out text, and the chart files hold the table's data."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import qcore
import torch
from click.testing import CliRunner
from qcore.charts import heat_map
from qcore.cli import cli
from qcore.corpus import calibration_texts, evaluation_texts
from qcore.evaluate import encode_texts, perplexity
from qcore.sensitivity import LayerSensitivity, text_batch
from qcore.testing.models import add_byte_tokenizer, build


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return add_byte_tokenizer(build("llama", tmp_path_factory.mktemp("sens") / "llama", dtype=torch.float32))


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_the_default_batch_is_real_text_from_the_calibration_corpus(tiny):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    ids = text_batch(tokenizer, batch=2, length=64)
    assert ids.shape == (2, 64)
    assert tokenizer.decode(ids[0]) == "\n\n".join(calibration_texts())[: len(tokenizer.decode(ids[0]))]
    assert not set(evaluation_texts()[0][:200].split()) <= set(tokenizer.decode(ids.flatten()).split())


def test_sensitivity_measures_on_text_scores_the_recipe_and_draws_it(tiny, tmp_path, toy_only):
    pytest.importorskip("matplotlib")
    measured = json.loads(run("sensitivity", tiny, "--preset", "toy-int8", "--length", 32, "--json").stdout)
    assert "built-in corpus" in measured["measured_on"]
    full = measured["fixed_nbytes"] + sum(row["full"] for row in measured["nbytes"].values())
    budget = full * 3 // 4
    png, page = tmp_path / "chart.png", tmp_path / "chart.html"
    result = run(
        "sensitivity", tiny, "--presets", "toy-int8", "--length", 32, "--budget", budget, "--eval-tokens", 300,
        "--plot", png, "--html", page, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)

    # The chart's data is the table's.
    sensitivity = LayerSensitivity(report["errors"], report["nbytes"], {"toy-int8": {}}, report["fixed_nbytes"])
    recipe = type("Chosen", (), {"choice": report["auto_recipe"]["choice"]})()
    data = heat_map(sensitivity, recipe)
    raw = png.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", raw[16:24]) == data.size_pixels
    text = page.read_text()
    assert all(layer in text for layer in report["errors"])
    assert all(f"{value:.2f}" in text for row in data.values for value in row)

    # End-to-end perplexity of full precision, the best single preset that fits, and the recipe: as measured here.
    scores = report["perplexity"]
    assert list(scores) == ["full precision", "toy-int8", "auto recipe"]  # toy-int8 everywhere fits 3/4
    from transformers import AutoTokenizer

    ids = encode_texts(AutoTokenizer.from_pretrained(tiny), evaluation_texts(), max_tokens=300)
    chosen = {layer: name for layer, name in report["auto_recipe"]["choice"].items()}
    recipe = qcore.Recipe([(layer, {"quant_method": "toy_int8"} if name else None) for layer, name in chosen.items()])
    assert scores["auto recipe"] == perplexity(qcore.from_pretrained(tiny, recipe), input_ids=ids).perplexity
    assert scores["full precision"] == perplexity(qcore.from_pretrained(tiny), input_ids=ids).perplexity


def test_without_a_tokenizer_the_error_suggests_the_synthetic_batch(tiny, tmp_path, toy_only):
    bare = tmp_path / "bare"
    shutil.copytree(tiny, bare)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bare / name).unlink(missing_ok=True)
    result = run("sensitivity", bare, "--preset", "toy-int8")
    assert result.exit_code == 1 and "--synthetic" in result.stderr.strip().splitlines()[-1]
    assert run("sensitivity", bare, "--preset", "toy-int8", "--synthetic", "--json").exit_code == 0


def test_the_loss_objective_is_the_gradient_weighted_output_error_scaled_to_the_measured_loss_increase(tiny, toy_only):
    """Each layer's error is ``N/2 * sum(g**2 * dy**2)`` (``g`` the gradient of the mean next-token loss with respect to
    the layer's output, computed here independently; ``dy`` the quantized layer's output error), times one factor
    per candidate chosen so that the layers' errors sum to the loss increase measured with it on every layer."""
    from qcore.sensitivity import measure_sensitivity
    from transformers import AutoTokenizer

    ids = text_batch(AutoTokenizer.from_pretrained(tiny), batch=2, length=24)
    measured = measure_sensitivity(tiny, {"int8": {"quant_method": "toy_int8"}}, input_ids=ids)
    relative = measure_sensitivity(tiny, {"int8": {"quant_method": "toy_int8"}}, input_ids=ids, objective="relative")
    assert measured.objective == "loss" and relative.objective == "relative"

    everywhere = qcore.Recipe([(layer, {"quant_method": "toy_int8"}) for layer in measured.errors])
    reference, quantized = qcore.from_pretrained(tiny), qcore.from_pretrained(tiny, everywhere)

    def mean_loss(model):
        logits = model(ids).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    with torch.no_grad():
        increase = float(mean_loss(quantized) - mean_loss(reference))
    assert measured.measured_loss_increase["int8"] == pytest.approx(increase, rel=1e-4, abs=1e-7)
    if increase > 0:
        assert sum(row["int8"] for row in measured.errors.values()) == pytest.approx(increase, rel=1e-4)

    layer = "model.layers.1.mlp.down_proj"
    seen = {}

    def keep(module, args, output):
        output.retain_grad()
        seen["input"], seen["output"] = args[0].detach(), output

    reference.get_submodule(layer).register_forward_hook(keep)
    mean_loss(reference).backward()
    with torch.no_grad():
        error = quantized.get_submodule(layer)(seen["input"]) - seen["output"]
    n = ids[:, 1:].numel()
    expected = n / 2 * float((seen["output"].grad.pow(2) * error.pow(2)).sum())
    assert measured.errors[layer]["int8"] == pytest.approx(measured.scale["int8"] * expected, rel=1e-4)
    output = seen["output"].detach()
    assert relative.errors[layer]["int8"] == pytest.approx(float(error.pow(2).sum() / output.pow(2).sum()))


def test_an_unknown_objective_is_a_config_error(tiny, toy_only):
    from qcore.sensitivity import measure_sensitivity

    with pytest.raises(qcore.ConfigError, match="unknown sensitivity objective 'kl'"):
        measure_sensitivity(tiny, {"int8": {"quant_method": "toy_int8"}}, objective="kl")
