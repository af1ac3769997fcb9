"""What a newcomer meets first on the command line: the flag they typed named in errors, the shell's exit codes,
warnings kept out of the generated text, one spelling per option, and tables that say each thing once.

Each test runs the command through click's runner with only the toy backend registered (autoloading off), except
where the test is about the real backends' presets.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest
import qcore
import torch
import toy_backend
from click.testing import CliRunner
from qcore.cli import cli
from qcore.testing.models import add_byte_tokenizer, build


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A float32 tiny Llama with a byte-level tokenizer."""
    return add_byte_tokenizer(build("llama", tmp_path_factory.mktemp("conventions") / "llama", dtype=torch.float32))


def run(*args, **kwargs):
    return CliRunner().invoke(cli, [str(a) for a in args], **kwargs)


def error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["quantize", "generate", "demo"])
def test_a_device_this_machine_lacks_is_refused_naming_the_flag(tiny, tmp_path, toy_only, command):
    args = {
        "quantize": ["quantize", tiny, tmp_path / "out", "--preset", "toy-int8"],
        "generate": ["generate", tiny, "--prompt", "hi"],
        "demo": ["demo"],
    }[command]
    result = run(*args, "--device", "cuda")
    assert result.exit_code == 2
    message = error_line(result)
    assert "'--device'" in message and "use --device cpu" in message and "device_map" not in message


def test_ctrl_c_exits_130(tiny, tmp_path, toy_only, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("qcore.loading.from_pretrained", interrupted)
    result = run("quantize", tiny, tmp_path / "out", "--preset", "toy-int8")
    assert result.exit_code == 130
    assert result.stderr.strip().endswith("interrupted")


def test_warnings_during_generate_come_after_the_streamed_text(tiny, toy_only, monkeypatch):
    import click

    events: list[str] = []
    linear_class = toy_backend._linear_class

    def warning_linear():
        class WarningLinear(linear_class()):
            def forward(self, x):
                warnings.warn("first-call kernel warning", UserWarning, stacklevel=1)
                logging.getLogger("bitsandbytes").warning("a logged kernel warning")
                return super().forward(x)

        return WarningLinear

    class Recorder(logging.Handler):
        def emit(self, record):
            events.append(f"log: {record.getMessage()}")

    echo = click.echo
    monkeypatch.setattr(click, "echo", lambda *args, **kwargs: (events.append("text"), echo(*args, **kwargs))[1])
    monkeypatch.setattr(warnings, "showwarning", lambda message, *args, **kwargs: events.append(f"warning: {message}"))
    monkeypatch.setattr(toy_backend, "_linear_class", warning_linear)
    recorder = Recorder(level=logging.WARNING)
    logging.getLogger().addHandler(recorder)
    try:
        result = run("generate", tiny, "--preset", "toy-int8", "--prompt", "Hello", "--max-new-tokens", 3)
    finally:
        logging.getLogger().removeHandler(recorder)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Hello") and "warning" not in result.stdout.lower()
    last_text = max(i for i, event in enumerate(events) if event == "text")
    held = [i for i, event in enumerate(events) if event != "text"]
    assert {"warning: first-call kernel warning", "log: a logged kernel warning"} <= set(events)
    assert min(held) > last_text, events


def test_backends_json_keeps_notes_apart_from_the_reason(monkeypatch):
    class Noted(toy_backend.ToyPlugin):
        @qcore.hookimpl
        def register_backend(self):
            backend = super().register_backend()
            return qcore.Backend(name=backend.name, configs=backend.configs, notes=lambda: "kernel: toy matmul")

    monkeypatch.setenv("QCORE_DISABLE_PLUGIN_AUTOLOAD", "1")
    qcore.reset_plugins()
    qcore.register_plugin(Noted("noted"), "noted")
    try:
        result = run("backends", "--json")
        table = run("backends")
    finally:
        qcore.reset_plugins()
    (row,) = json.loads(result.stdout)
    assert row["available"] is True and row["reason"] is None and row["notes"] == "kernel: toy matmul"
    assert "kernel: toy matmul" in table.stdout


@pytest.mark.parametrize("command", ["estimate", "sensitivity"])
@pytest.mark.parametrize("spelling", ["--preset", "--presets"])
def test_preset_and_presets_are_one_option(tiny, toy_only, command, spelling):
    result = run(command, tiny, spelling, "toy-int8", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    names = [row["preset"] for row in data["presets"]] if command == "estimate" else next(iter(data["errors"].values()))
    assert "toy-int8" in names


@pytest.mark.parametrize(
    "args",
    [
        ["quantize", "{missing}", "{out}", "--preset", "toy-int8"],
        ["inspect", "{missing}"],
        ["generate", "{missing}", "--prompt", "hi"],
        ["estimate", "{missing}"],
        ["recommend", "{missing}", "--memory", "1GB"],
        ["sensitivity", "{missing}", "--preset", "toy-int8"],
    ],
    ids=lambda args: args[0],
)
def test_a_missing_path_is_one_message_and_exit_code_2_everywhere(tmp_path, toy_only, args):
    missing = tmp_path / "no" / "such-model"
    filled = [a.format(missing=missing, out=tmp_path / "out") for a in args]
    result = run(*filled)
    assert result.exit_code == 2
    assert error_line(result).endswith(f"{missing}: no such file or directory; see 'qcore {args[0]} --help'")


def test_recommend_says_each_trade_off_once():
    from types import SimpleNamespace

    from qcore.cli.memory import _trade_off
    from qcore.plugins import presets

    summary = "4-bit, no calibration, LoRA-trainable"
    assert _trade_off(SimpleNamespace(preset=qcore.Preset("p", {}, summary, trainable=True)), "cpu") == (
        f"{summary}; no fast kernel on cpu"
    )
    for name, (_, preset) in presets().items():
        words = [part.strip() for chunk in _trade_off(SimpleNamespace(preset=preset), "cpu").split(";")
                 for part in chunk.split(",")]  # fmt: skip
        for fact in ("no calibration", "LoRA-trainable", "not trainable", "needs calibration data"):
            assert words.count(fact) <= 1, (name, words)


def test_demo_shows_each_backends_recommended_preset_and_the_random_weight_caveat(capsys):
    from qcore.cli.demo import _print_results, _Result, recommended_presets
    from qcore.plugins import backends, presets

    installed = {info.name: info for info in backends()}
    if "hqq" not in installed:
        pytest.skip("qcore-hqq is not installed")
    assert recommended_presets(installed["hqq"], presets())[0] == "hqq-4bit"
    _print_results([_Result("full precision")], [])
    assert "these errors overstate what a real model loses" in " ".join(capsys.readouterr().out.split())


def test_the_nf4_preset_says_it_computes_in_bfloat16():
    from qcore.plugins import presets

    found = presets()
    if "bnb-nf4" not in found:
        pytest.skip("qcore-bnb is not installed")
    _, preset = found["bnb-nf4"]
    assert preset.config["bnb_4bit_compute_dtype"] == "bfloat16"
    assert "bfloat16" in preset.summary and "float32" in preset.summary
