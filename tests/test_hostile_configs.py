"""config.json and recipes from a stranger: bounded work, refused before any weight is read or anything large built.

A config.json alone must not make the loader allocate beyond what the checkpoint's headers justify (layers it does
not hold, position tables of 2**29 rows), a stored recipe is reloaded from its recorded assignment without matching
its patterns, and user patterns are matched in time linear in the module name.
"""

from __future__ import annotations

import json
import re
import shutil
import time

import pytest
import qcore
import torch
from qcore import Recipe
from qcore._patterns import compile_pattern
from tiny_models import logits
from toy_backend import ToyConfig


def _with_config(source, tmp_path, **changes):
    target = tmp_path / "hostile"
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config.update(changes)
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.fixture
def no_streaming(monkeypatch):
    """Fails the test if any tensor is streamed; the refusal must come from headers and config.json alone."""
    streamed = []
    monkeypatch.setattr(qcore.checkpoint.CheckpointReader, "stream", lambda self, *a: streamed.append(1) or iter(()))
    yield streamed
    assert streamed == []


@pytest.mark.parametrize("layers", [3, 20000])
def test_more_layers_declared_than_stored_is_refused_from_the_headers(llama, tmp_path, no_streaming, layers):
    hostile = _with_config(llama, tmp_path, num_hidden_layers=layers)
    started = time.perf_counter()
    with pytest.raises(qcore.ConfigError, match=rf"num_hidden_layers = {layers}, but .* hold 2 layer\(s\) under"):
        qcore.from_pretrained(hostile)
    assert time.perf_counter() - started < 5  # the 20000 layers are never built


@pytest.mark.parametrize(
    ("arch", "field", "value"),
    [("gpt2", "n_positions", 2**29), ("opt", "max_position_embeddings", 2**29),
     ("bert", "max_position_embeddings", 2**27)],
)  # fmt: skip
def test_a_position_table_config_json_inflates_is_refused_before_it_is_allocated(
    checkpoints, tmp_path, no_streaming, arch, field, value
):
    hostile = _with_config(checkpoints[arch], tmp_path, **{field: value})
    with pytest.raises(qcore.ConfigError, match=rf"more than 32x the .* its checkpoint holds.*{field} = {value}"):
        qcore.from_pretrained(hostile)


def test_the_bound_leaves_real_checkpoints_alone(checkpoints):
    for arch in checkpoints:
        qcore.from_pretrained(checkpoints[arch])


def test_a_source_that_is_neither_a_directory_nor_a_hub_id_is_a_checkpoint_error():
    for source in ("../x/y", "../x", ".hidden/model", "org/na me"):
        with pytest.raises(qcore.CheckpointError, match="no such directory"):
            qcore.from_pretrained(source)


# -- recipes -------------------------------------------------------------------------------------------------


@pytest.fixture
def mixed_checkpoint(llama, toy, tmp_path):
    """A model saved with a recipe of two configs, so config.json records the recipe and its assignment."""
    recipe = Recipe(
        [("re:self_attn\\.(q|k)_proj$", ToyConfig(compute_dtype="float32"))],
        default=ToyConfig(compute_dtype="bfloat16"),
    )
    model = qcore.from_pretrained(llama, recipe)
    out = qcore.save_pretrained(model, tmp_path / "mixed")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "qcore_recipe"
    return out, logits(model)


def test_a_stored_recipe_reloads_from_its_assignment_without_matching_its_patterns(mixed_checkpoint):
    out, expected = mixed_checkpoint
    config = json.loads((out / "config.json").read_text())
    stored = config["quantization_config"]
    stored["rules"].insert(0, {"pattern": "re:(.+)+Z", "config": None})  # catastrophic for a backtracking engine
    stored["rules"].insert(0, {"pattern": "re:(a)\\1(?=x)", "config": None})  # not even supported syntax
    (out / "config.json").write_text(json.dumps(config))
    started = time.perf_counter()
    model = qcore.from_pretrained(out)
    assert time.perf_counter() - started < 10
    assert torch.equal(logits(model), expected)


def test_a_stored_recipe_without_its_assignment_is_refused(mixed_checkpoint, no_streaming):
    out, _ = mixed_checkpoint
    config = json.loads((out / "config.json").read_text())
    del config["quantization_config"]["modules"]
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(qcore.ConfigError, match="a stored recipe must record the exact assignment"):
        qcore.from_pretrained(out)


def test_a_nested_quantifier_is_matched_in_linear_time():
    names = ["model.layers.0.self_attn.q_proj" * 20, "a" * 5000]
    started = time.perf_counter()
    recipe = Recipe([("re:(.+)+Z", ToyConfig()), ("re:(a|aa)*b", ToyConfig()), ("re:(x+x+)+y", None)])
    assigned, _ = recipe.assign(names, [])
    assert assigned == {}  # no name has a Z, a b or a y
    assert time.perf_counter() - started < 2  # Python's re takes hours on these


@pytest.mark.parametrize(
    "pattern",
    [r"q_proj$", r"layers\.(0|1)\.", r"^model\.", r"mlp\.(gate|up)_proj", r"layers\.\d+\.mlp", r"\bmlp\b",
     r"[^a-z._0-9]", r"(ab)*c", r"layers\.1[0-9]\.", r"(?:self|cross)_attn\.[qkv]_proj", r"o{2,3}", r"^$",
     r"proj.*?$", r"\S+_proj\Z", r"l.y{1}ers"],
)  # fmt: skip
def test_patterns_match_what_python_re_matches(pattern):
    names = ["model.layers.0.self_attn.q_proj", "model.layers.12.mlp.down_proj", "lm_head",
             "model.layers.3.mlp.up_proj", "", "foo", "model.embed_tokens", "cross_attn.v_proj", "ab_c d"]  # fmt: skip
    compiled = compile_pattern(pattern)
    assert [compiled.search(n) for n in names] == [re.search(pattern, n) is not None for n in names]


@pytest.mark.parametrize(
    ("pattern", "what"),
    [(r"(a)\1", "a backreference"), (r"q(?=_proj)", "a lookaround"), (r"(?i)Q_PROJ", "inline flags"),
     (r"a++", "a possessive quantifier"), (r"(?>a)", "an atomic group"), (r"(a{100}){200}", "automaton states"),
     (r"(", "not a valid regular expression")],
)  # fmt: skip
def test_patterns_that_need_backtracking_are_refused_with_the_reason(pattern, what):
    with pytest.raises(qcore.ConfigError, match=re.escape(what)):
        Recipe([(f"re:{pattern}", ToyConfig())])
