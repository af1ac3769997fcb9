"""Perplexity (``qcore.evaluate``) and ``qcore eval``: the numbers agree with a plain transformers loop, and the
command compares full precision with each requested quantization on real text."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import qcore
import torch
from click.testing import CliRunner
from qcore.cli import cli
from qcore.errors import ConfigError
from qcore.evaluate import encode_texts, perplexity
from qcore.testing.models import add_byte_tokenizer, build

TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, it "
    "was the season of Darkness, it was the spring of hope, it was the winter of despair."
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A float32 tiny Llama (context 128) with a byte-level tokenizer, so real text encodes."""
    path = build("llama", tmp_path_factory.mktemp("eval") / "llama", dtype=torch.float32)
    return add_byte_tokenizer(path)


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny):
    from transformers import AutoTokenizer

    return qcore.from_pretrained(tiny), AutoTokenizer.from_pretrained(tiny)


def transformers_loop(model, input_ids, window: int, stride: int) -> float:
    """The sliding-window loop of the transformers perplexity guide, counting each window's scored tokens exactly.

    The guide counts ``valid labels - batch size`` per window; after the first window the first label is already
    masked, so that undercounts by one. The count here is of the labels the shifted loss really averages over.
    """
    nll_sum, count, previous_end = 0.0, 0, 0
    length = input_ids.size(1)
    for begin in range(0, length, stride):
        end = min(begin + window, length)
        target_length = end - previous_end
        ids = input_ids[:, begin:end]
        targets = ids.clone()
        targets[:, :-target_length] = -100
        with torch.no_grad():
            loss = model(ids, labels=targets).loss
        scored = (targets[:, 1:] != -100).sum().item()
        nll_sum += loss.double() * scored
        count += scored
        previous_end = end
        if end == length:
            break
    return float(torch.exp(nll_sum / count))


@pytest.mark.parametrize(("window", "stride"), [(128, 128), (128, 64), (64, 16), (100, 37)])
def test_perplexity_matches_the_transformers_loop_to_the_last_float32_digit(model_and_tokenizer, window, stride):
    model, tokenizer = model_and_tokenizer
    ids = encode_texts(tokenizer, [TEXT])
    assert ids.shape[1] > window  # several windows
    ours = perplexity(model, input_ids=ids, window=window, stride=stride)
    assert torch.tensor(ours.perplexity, dtype=torch.float32) == torch.tensor(
        transformers_loop(model, ids, window, stride), dtype=torch.float32
    )
    windows = math.ceil((ids.shape[1] - window) / stride) + 1
    # Overlapping windows score every token but the text's first once; windows that do not overlap cannot score
    # their own first token, which has no context.
    assert ours.tokens == ids.shape[1] - (1 if stride < window else windows)


def test_one_window_is_the_mean_cross_entropy_of_the_logits(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ids = encode_texts(tokenizer, [TEXT[:100]])
    with torch.no_grad():
        logits = model(ids).logits[0, :-1].double()
    expected = math.exp(torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item())
    assert perplexity(model, input_ids=ids, window=128).perplexity == pytest.approx(expected, rel=1e-6)


def test_texts_are_joined_by_blank_lines_and_cut_at_max_tokens(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    joined = perplexity(model, tokenizer, ["a b", "c d"])
    assert joined.tokens == len(tokenizer("a b\n\nc d").input_ids) - 1
    assert perplexity(model, tokenizer, [TEXT], max_tokens=50).tokens == 49


def test_bad_arguments_name_what_to_change(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(ConfigError, match="at least 2"):
        perplexity(model, input_ids=torch.tensor([[5]]))
    with pytest.raises(ConfigError, match="context of 128"):
        perplexity(model, tokenizer, [TEXT], window=256)
    with pytest.raises(ConfigError, match="stride"):
        perplexity(model, tokenizer, [TEXT], window=64, stride=65)
    with pytest.raises(ConfigError, match="non-empty"):
        perplexity(model, tokenizer, ["  "])
    with pytest.raises(ConfigError, match="tokenizer"):
        perplexity(model, texts=[TEXT])


# -- the command ---------------------------------------------------------------------------------------------


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_eval_compares_full_precision_with_each_preset(tiny, tmp_path, toy_only):
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    result = run("eval", tiny, "--preset", "toy-int8", "--text", text, "--window", 64, "--stride", 32, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    full, quantized = report["results"]
    assert [full["name"], quantized["name"]] == ["full precision", "toy-int8"]
    assert full["ratio"] == 1.0 and quantized["ratio"] == pytest.approx(quantized["perplexity"] / full["perplexity"])
    assert quantized["nbytes"] < full["nbytes"]

    # The same numbers as measuring each model in Python.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    model = qcore.from_pretrained(tiny, {"quant_method": "toy_int8"})
    expected = perplexity(model, tokenizer, [TEXT], window=64, stride=32)
    assert quantized["perplexity"] == expected.perplexity
    assert quantized["tokens"] == expected.tokens == report["tokens"] - 1

    table = run("eval", tiny, "--preset", "toy-int8", "--text", text, "--window", 64)
    assert table.exit_code == 0, table.output
    assert "vs full precision" in table.stdout and "toy-int8" in table.stdout


def test_eval_without_a_tokenizer_is_a_one_line_error_naming_the_missing_file(tiny, tmp_path, toy_only):
    bare = tmp_path / "bare"
    shutil.copytree(tiny, bare)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bare / name).unlink(missing_ok=True)
    result = run("eval", bare, "--preset", "toy-int8")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "tokenizer.json" in lines[0]


def test_eval_of_a_pre_quantized_checkpoint_scores_it_as_stored(tiny, tmp_path, toy_only):
    saved = tmp_path / "saved"
    qcore.save_pretrained(qcore.from_pretrained(tiny, {"quant_method": "toy_int8"}), saved)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / name, saved / name)
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    result = run("eval", saved, "--text", text, "--window", 64, "--json")
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)["results"]
    live = run("eval", tiny, "--preset", "toy-int8", "--no-baseline", "--text", text, "--window", 64, "--json")
    assert row["perplexity"] == json.loads(live.stdout)["results"][0]["perplexity"]
