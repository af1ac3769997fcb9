"""The ``qcore`` command line, run as a user runs it: every command on a tiny Llama, through click's runner.

Most tests use the toy backend only (autoloading off), so they do not depend on which real plugins are installed;
``qcore backends`` runs in a subprocess, where only installed plugins exist, to prove it imports no torch; and the
memory estimate is checked against the real footprint for the toy preset and for every installed preset.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest
import qcore
import torch
import toy_backend
from click.testing import CliRunner
from qcore.checkpoint import CheckpointReader
from qcore.cli import cli
from qcore.testing.models import ARCHITECTURES, build

INPUT_IDS = torch.tensor([[3, 5, 9, 17, 33, 65, 129, 200]])
LLAMA = ARCHITECTURES["llama"][2]


# -- fixtures ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A full-precision (float32) tiny Llama with no tokenizer."""
    return build("llama", tmp_path_factory.mktemp("tiny") / "llama", dtype=torch.float32)


@pytest.fixture(scope="module")
def tiny_with_tokenizer(tiny, tmp_path_factory) -> Path:
    """The same model with a word-level tokenizer ("w3", "w4", ... one word per id) built offline."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("with_tokenizer") / "llama"
    shutil.copytree(tiny, path)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, LLAMA["vocab_size"])}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def only(monkeypatch):
    """Replace every plugin with the given ones for one test (no entry points), restoring discovery afterwards."""
    monkeypatch.setenv("QCORE_DISABLE_PLUGIN_AUTOLOAD", "1")

    def register(*plugins):
        qcore.reset_plugins()
        for plugin in plugins:
            qcore.register_plugin(plugin, plugin.name)

    yield register
    qcore.reset_plugins()


@pytest.fixture
def toy_only(only):
    only(toy_backend.ToyPlugin())


def run(*args: str, **kwargs):
    return CliRunner().invoke(cli, [str(a) for a in args], **kwargs)


def one_line_error(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(INPUT_IDS).logits


# -- conventions ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [None, *sorted(cli.commands)])
def test_every_command_has_help(command):
    result = run(*([command] if command else []), "--help")
    assert result.exit_code == 0, result.output
    assert "Usage: qcore" in result.output


def test_usage_errors_are_one_line_with_exit_code_2(tiny, tmp_path, toy_only):
    result = run("quantize", tiny, tmp_path / "out")
    assert result.exit_code == 2
    assert "--preset" in one_line_error(result)

    result = run("quantize", tiny, tmp_path / "out", "--preset", "no-such-preset")
    assert result.exit_code == 2
    assert "toy-int8" in one_line_error(result)  # names the presets that exist

    result = run("quantize", tiny, tmp_path / "out", "--preset", "toy-int8", "--config", "{}")
    assert result.exit_code == 2
    assert "only one of" in one_line_error(result)


def test_failures_are_one_line_with_exit_code_1_and_a_traceback_only_under_debug(tmp_path, toy_only):
    (tmp_path / "empty").mkdir()
    result = run("inspect", tmp_path / "empty")
    assert result.exit_code == 1
    assert "config.json" in one_line_error(result)
    assert "Traceback" not in result.output

    result = run("--debug", "inspect", tmp_path / "empty")
    assert result.exit_code == 1
    assert isinstance(result.exception, qcore.CheckpointError)


# -- backends ------------------------------------------------------------------------------------------------


def test_backends_lists_every_installed_plugin_without_importing_torch():
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "qcore.cli", "backends", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    imported = {
        line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")
    }
    heavy = {"torch", "transformers", "bitsandbytes", "hqq", "eetq", "safetensors"}
    assert not {name for name in imported if name.split(".")[0] in heavy}
    listed = {row["distribution"] for row in json.loads(result.stdout)}
    entry_points = importlib.metadata.entry_points(group="qcore")
    assert {ep.dist.name for ep in entry_points if ep.dist is not None} <= listed


def test_backends_shows_availability_and_the_fix(only):
    class Missing(toy_backend.ToyPlugin):
        @qcore.hookimpl
        def register_backend(self):
            return qcore.Backend(
                name=self.name, configs={"toy_missing": toy_backend.ToyConfig}, requires=("no-such-library>=1.0",)
            )

    only(toy_backend.ToyPlugin(), Missing("missing"))
    rows = {row["name"]: row for row in json.loads(run("backends", "--json").stdout)}
    assert rows["toy"]["available"] and rows["toy"]["presets"] == ["toy-int8"]
    assert not rows["missing"]["available"]
    assert "pip install 'no-such-library>=1.0'" in rows["missing"]["reason"]

    table = run("backends").stdout
    assert "toy-int8" in table and "available" in table and "no-such-library" in table


# -- quantize ------------------------------------------------------------------------------------------------


def test_quantize_saves_what_loading_quantized_and_copies_the_tokenizer(tiny_with_tokenizer, tmp_path, toy_only):
    out = tmp_path / "out"
    result = run("quantize", tiny_with_tokenizer, out, "--preset", "toy-int8")
    assert result.exit_code == 0, result.output

    expected = qcore.from_pretrained(tiny_with_tokenizer, {"quant_method": "toy_int8"})
    assert torch.equal(logits(qcore.from_pretrained(out)), logits(expected))
    assert (out / "tokenizer.json").is_file()
    count = len(CheckpointReader(tiny_with_tokenizer).tensors)
    assert f"{count}/{count}" in result.stderr  # the per-tensor progress bar ran to the end
    assert "toy_int8" in result.stdout and "smaller" in result.stdout


def test_quantize_refuses_a_non_empty_destination_before_loading(tiny, tmp_path, toy_only):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    result = run("quantize", tiny, tmp_path / "out", "--preset", "toy-int8")
    assert result.exit_code == 1
    assert "--overwrite" in one_line_error(result)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_quantize_takes_a_config_inline_or_from_a_file(tiny, tmp_path, toy_only):
    config = {"quant_method": "toy_int8", "compute_dtype": "bfloat16"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    for name, value in (("inline", json.dumps(config)), ("file", tmp_path / "config.json")):
        result = run("quantize", tiny, tmp_path / name, "--config", value)
        assert result.exit_code == 0, result.output
        stored = json.loads((tmp_path / name / "config.json").read_text())["quantization_config"]
        assert stored["quant_method"] == "toy_int8" and stored["compute_dtype"] == "bfloat16"


def test_quantize_applies_a_recipe(tiny, tmp_path, toy_only):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"rules": [{"pattern": "*.mlp.*", "config": {"quant_method": "toy_int8"}}]}))
    result = run("quantize", tiny, tmp_path / "out", "--recipe", recipe)
    assert result.exit_code == 0, result.output
    applied = qcore.from_pretrained(tmp_path / "out").qcore_applied
    assert applied and all(".mlp." in name for name in applied)


# -- inspect -------------------------------------------------------------------------------------------------


def test_inspect_reads_headers_only(tiny, toy_only, monkeypatch):
    from transformers import LlamaForCausalLM

    def no_weights(*args, **kwargs):
        raise AssertionError("inspect read weights")

    monkeypatch.setattr(CheckpointReader, "stream", no_weights)
    report = json.loads(run("inspect", tiny, "--json").stdout)
    assert report["architecture"] == "LlamaForCausalLM" and report["quantization"] is None
    assert report["parameters"] == LlamaForCausalLM.from_pretrained(tiny).num_parameters()
    assert report["total_nbytes"] == CheckpointReader(tiny).total_nbytes()
    kinds = {row["kind"]: row for row in report["modules"]}
    assert {"self_attn.q_proj", "mlp.down_proj", "embed_tokens", "norm", "input_layernorm", "lm_head"} <= set(kinds)
    assert kinds["self_attn.q_proj"]["modules"] == LLAMA["num_hidden_layers"]
    assert sum(row["nbytes"] for row in report["modules"]) == report["total_nbytes"]


def test_inspect_names_the_plugin_a_quantized_checkpoint_needs(tiny, tmp_path, toy_only):
    run("quantize", tiny, tmp_path / "out", "--preset", "toy-int8")
    report = json.loads(run("inspect", tmp_path / "out", "--json").stdout)
    assert report["quantization"]["method"] == "toy_int8"
    assert report["parameters"] == json.loads(run("inspect", tiny, "--json").stdout)["parameters"]
    (backend,) = report["quantization"]["backends"]
    assert backend["installed"] and backend["available"] and backend["plugin"].startswith("toy")
    assert "toy_int8" in run("inspect", tmp_path / "out").stdout

    qcore.unregister_plugin("toy")
    (backend,) = json.loads(run("inspect", tmp_path / "out", "--json").stdout)["quantization"]["backends"]
    assert not backend["installed"] and "toy_int8" in backend["reason"]


# -- generate ------------------------------------------------------------------------------------------------


def test_generate_streams_the_same_text_as_generating_directly(tiny_with_tokenizer, toy_only):
    from transformers import AutoTokenizer

    result = run(
        "generate", tiny_with_tokenizer, "--preset", "toy-int8", "--prompt", "w5 w9 w17", "--max-new-tokens", 6
    )
    assert result.exit_code == 0, result.output

    tokenizer = AutoTokenizer.from_pretrained(tiny_with_tokenizer)
    model = qcore.from_pretrained(tiny_with_tokenizer, {"quant_method": "toy_int8"})
    inputs = tokenizer("w5 w9 w17", return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    expected = tokenizer.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert expected and result.stdout == "w5 w9 w17" + expected + "\n"


def test_generate_without_a_tokenizer_says_so_in_one_line(tiny, toy_only):
    result = run("generate", tiny, "--prompt", "hello")
    assert result.exit_code == 1
    assert "no tokenizer" in one_line_error(result)


# -- estimate ------------------------------------------------------------------------------------------------


def _installed_presets() -> list[str]:
    qcore.reset_plugins()
    names = sorted(qcore.plugins.presets())
    qcore.reset_plugins()
    return names


@pytest.fixture(scope="module")
def estimates(tiny) -> dict:
    qcore.reset_plugins()
    qcore.register_plugin(toy_backend.ToyPlugin(), "toy")
    try:
        result = run("estimate", tiny, "--json")
    finally:
        qcore.reset_plugins()
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("preset", ["toy-int8", *_installed_presets()])
def test_estimate_is_within_5_percent_of_the_loaded_footprint(tiny, estimates, preset, toy):
    predicted = {row["preset"]: row["nbytes"] for row in estimates["presets"]}[preset]
    config = qcore.QuantConfig.from_dict(qcore.plugins.preset_config(preset))
    # The tiny model has no tokenizer for the built-in corpus: a calibrating preset gets token ids.
    calibration = torch.randint(0, 256, (2, 16)) if config.needs_calibration else None
    try:
        model = qcore.from_pretrained(tiny, config, calibration=calibration)
    except qcore.BackendUnavailable as error:
        pytest.skip(f"{preset} cannot run here: {error}")
    measured = held_nbytes(model)
    assert abs(predicted - measured) <= 0.05 * measured, (predicted, measured)


def held_nbytes(model) -> int:
    """Every tensor the loaded model holds (parameters, buffers and the state dict, inner tensors of torchao's
    subclasses): model.get_memory_footprint() misses bitsandbytes' quant_state and HQQ's meta."""
    from qcore.cli.output import held_nbytes as counted

    return counted(model)


def test_estimate_gives_full_precision_and_the_presets_asked_for(tiny, toy_only):
    result = run("estimate", tiny, "--preset", "toy-int8", "--json")
    report = json.loads(result.stdout)
    assert report["full_precision_nbytes"] == qcore.from_pretrained(tiny).get_memory_footprint()
    assert [row["preset"] for row in report["presets"]] == ["toy-int8"]
    assert "full precision" in run("estimate", tiny).stdout

    result = run("estimate", tiny, "--preset", "no-such-preset")
    assert result.exit_code == 2 and "toy-int8" in one_line_error(result)


# -- recommend -----------------------------------------------------------------------------------------------


class RankedToy(toy_backend.ToyPlugin):
    """Three toy presets of different sizes and trade-offs, to rank."""

    @qcore.hookimpl
    def register_backend(self):
        mlp = ["gate_proj", "up_proj", "down_proj", "lm_head"]
        return qcore.Backend(
            name=self.name,
            configs={"toy_int8": toy_backend.ToyConfig},
            presets=(
                qcore.Preset("toy-all", {"quant_method": "toy_int8"}, fast_on=("cpu",)),
                qcore.Preset(
                    "toy-keep-down", {"quant_method": "toy_int8", "modules_to_not_convert": ["down_proj", "lm_head"]}
                ),
                qcore.Preset(
                    "toy-attention", {"quant_method": "toy_int8", "modules_to_not_convert": mlp}, trainable=True
                ),
            ),
        )


def test_recommend_ranks_the_presets_that_fit_by_goal(tiny, only):
    only(RankedToy("toy"))
    rows = json.loads(run("estimate", tiny, "--json").stdout)["presets"]
    sizes = {row["preset"]: row["device_nbytes"] for row in rows}  # the weights and the placement's reserve
    assert sizes["toy-all"] < sizes["toy-keep-down"] < sizes["toy-attention"]
    assert all(row["device_nbytes"] > row["nbytes"] for row in rows)

    def ranking(memory: int, goal: str) -> list[str]:
        result = run("recommend", tiny, "--memory", memory, "--device", "cpu", "--goal", goal, "--json")
        assert result.exit_code == 0, result.output
        rows = json.loads(result.stdout)["presets"]
        return [row["preset"] for row in sorted((r for r in rows if r["fits"]), key=lambda r: r["rank"])]

    everything = sizes["toy-attention"]
    assert ranking(everything, "quality") == ["toy-attention", "toy-keep-down", "toy-all"]
    assert ranking(everything, "speed") == ["toy-all", "toy-attention", "toy-keep-down"]
    assert ranking(everything, "finetune") == ["toy-attention", "toy-keep-down", "toy-all"]
    assert ranking(sizes["toy-keep-down"], "quality") == ["toy-keep-down", "toy-all"]

    table = run("recommend", tiny, "--memory", everything, "--device", "cpu").stdout
    assert "LoRA-trainable" in table and "fast kernel on cpu" in table and "no calibration" in table

    result = run("recommend", tiny, "--memory", "1KB")
    assert result.exit_code == 1 and "toy-all" in one_line_error(result)
    assert run("recommend", tiny, "--memory", "lots").exit_code == 2


# -- sensitivity ---------------------------------------------------------------------------------------------


def test_sensitivity_prints_per_layer_errors_and_saves_an_auto_recipe_quantize_can_use(tiny, tmp_path, only):
    only(RankedToy("toy"))
    measured = json.loads(run("sensitivity", tiny, "--presets", "toy-all", "--synthetic", "--json").stdout)
    layers = measured["errors"]
    assert "model.layers.0.self_attn.q_proj" in layers and all(0 < row["toy-all"] < 1 for row in layers.values())
    full = measured["fixed_nbytes"] + sum(row["full"] for row in measured["nbytes"].values())
    budget = full * 3 // 4
    result = run(
        "sensitivity",
        tiny,
        "--presets",
        "toy-all",
        "--synthetic",
        "--budget",
        budget,
        "--save-recipe",
        tmp_path / "r.json",
    )
    assert result.exit_code == 0, result.output
    assert "auto recipe:" in result.stdout and "model.layers.1.mlp.down_proj" in result.stdout
    recipe = json.loads((tmp_path / "r.json").read_text())
    assert recipe["quant_method"] == "qcore_recipe" and recipe["rules"]
    result = run("quantize", tiny, tmp_path / "out", "--recipe", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    model = qcore.from_pretrained(tmp_path / "out")
    assert sum(t.numel() * t.element_size() for t in model.state_dict().values()) <= budget


def test_sensitivity_budget_too_small_is_one_line(tiny, only):
    only(RankedToy("toy"))
    result = run("sensitivity", tiny, "--presets", "toy-all", "--synthetic", "--budget", "1KB")
    last = result.stderr.strip().splitlines()[-1]  # after the "measuring ..." note
    assert result.exit_code == 1 and last.startswith("error: no recipe fits 1000 B") and "smallest possible is" in last


# -- demo ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> dict[str, str]:
    return {"XDG_CACHE_HOME": str(tmp_path_factory.mktemp("cache"))}


@pytest.mark.slow
def test_demo_runs_every_backend_from_a_cached_random_checkpoint(cache, toy_only, monkeypatch, capsys):
    from qcore.cli.demo import demo_checkpoint

    result = run("demo", env=cache)
    assert result.exit_code == 0, result.output
    assert "random" in result.stdout and str(Path(cache["XDG_CACHE_HOME"]) / "qcore" / "demo") in result.stdout
    assert "toy-int8" in result.stdout and "identical" in result.stdout

    monkeypatch.setenv("XDG_CACHE_HOME", cache["XDG_CACHE_HOME"])
    weights = demo_checkpoint() / "model.safetensors"
    modified = weights.stat().st_mtime_ns
    assert demo_checkpoint() / "model.safetensors" == weights and weights.stat().st_mtime_ns == modified
    assert "cached" in capsys.readouterr().out


def test_demo_exits_1_when_a_backend_fails(cache, only):
    class Broken(toy_backend.ToyPlugin):
        @qcore.hookimpl
        def postprocess(self, config, context, model):
            raise RuntimeError("kaput")

    only(Broken("toy"))
    result = run("demo", env=cache)
    assert result.exit_code == 1
    assert "kaput" in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "toy-int8" in last
