"""The cache of on-the-fly loads: a repeat load skips quantization and computes the same logits, and nothing that
could make the copy wrong (a changed shard or config, a damaged entry, two writers at once) is ever served."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import qcore
import torch
import toy_backend
from click.testing import CliRunner
from qcore import cache as quantized_cache
from qcore.cli import cli
from qcore.testing.models import build, logits

CONFIG = {"quant_method": "toy_int8"}


@pytest.fixture
def source(tmp_path) -> Path:
    return build("llama", tmp_path / "llama", dtype=torch.float32)


@pytest.fixture
def root(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("QCORE_CACHE_DIR", str(path))
    return path


def load(source, config=CONFIG, **kwargs):
    return qcore.from_pretrained(source, config, cache=True, **kwargs)


def test_a_repeat_load_uses_the_cached_copy_and_computes_the_same_logits(source, root, toy, monkeypatch):
    first = load(source)
    (entry,) = quantized_cache.entries(root)
    assert first.qcore_cache == str(entry.path)
    monkeypatch.setattr(toy_backend, "quantize", lambda *_: pytest.fail("quantized again instead of using the cache"))
    again = load(source)
    assert again.qcore_cache == str(entry.path)
    assert torch.equal(logits(again), logits(first))
    assert again.is_quantized and again.config.quantization_config["quant_method"] == "toy_int8"


def test_a_changed_shard_is_never_served_stale(source, root, toy):
    load(source)
    before = logits(load(source))
    shard = source / "model.safetensors"
    state = __import__("safetensors.torch", fromlist=["load_file"]).load_file(shard)
    name = next(k for k in state if k.endswith("q_proj.weight"))
    state[name] = state[name] * 2  # same size, same header: only the content differs
    __import__("safetensors.torch", fromlist=["save_file"]).save_file(state, shard, metadata={"format": "pt"})
    changed = load(source)
    assert len(quantized_cache.entries(root)) == 2
    assert not torch.equal(logits(changed), before)
    assert torch.equal(logits(changed), logits(qcore.from_pretrained(source, CONFIG)))


def test_a_rewrite_in_place_that_restores_the_modification_time_is_still_seen(source, root, toy):
    load(source)
    shard = source / "model.safetensors"
    status = shard.stat()
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01  # one bit of the last tensor
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(status.st_atime_ns, status.st_mtime_ns))  # mtime as before; ctime cannot be set back
    load(source)
    assert len(quantized_cache.entries(root)) == 2


def test_a_changed_config_or_dtype_gets_its_own_entry(source, root, toy):
    load(source)
    load(source, {"quant_method": "toy_int8", "modules_to_not_convert": ["lm_head", "q_proj"]})
    load(source, dtype=torch.bfloat16)
    assert len({e.key for e in quantized_cache.entries(root)}) == 3


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_a_damaged_entry_is_rebuilt_never_loaded(source, root, toy, damage):
    expected = logits(load(source))
    (entry,) = quantized_cache.entries(root)
    weights = entry.path / "model.safetensors"
    if damage == "truncate":
        os.truncate(weights, weights.stat().st_size // 2)
    elif damage == "flip":
        data = bytearray(weights.read_bytes())
        data[-3] ^= 0xFF
        weights.write_bytes(bytes(data))
    else:
        weights.unlink()
    rebuilt = load(source)
    assert torch.equal(logits(rebuilt), expected)
    (entry,) = quantized_cache.entries(root)
    assert quantized_cache._verified(entry.path)


def test_an_entry_without_its_manifest_is_incomplete_and_ignored(source, root, toy):
    load(source)
    (entry,) = quantized_cache.entries(root)
    (entry.path / quantized_cache.MANIFEST).unlink()
    assert quantized_cache.entries(root) == []
    load(source)
    assert len(quantized_cache.entries(root)) == 1


def test_least_recently_used_entries_go_first_beyond_the_size_limit(source, root, toy, monkeypatch):
    load(source)
    (first,) = quantized_cache.entries(root)
    monkeypatch.setenv("QCORE_CACHE_SIZE", str(first.nbytes + 1))  # room for one entry
    load(source, dtype=torch.bfloat16)
    (kept,) = quantized_cache.entries(root)
    assert kept.key != first.key and not first.path.exists()


def test_plain_and_pre_quantized_loads_bypass_the_cache(source, root, toy, tmp_path):
    qcore.from_pretrained(source, cache=True)
    saved = qcore.save_pretrained(qcore.from_pretrained(source, CONFIG, cache=False), tmp_path / "saved")
    qcore.from_pretrained(saved, cache=True)
    assert quantized_cache.entries(root) == []


WRITER = """
import sys
sys.path.insert(0, {tests!r})
import qcore, toy_backend
qcore.register_plugin(toy_backend.ToyPlugin(), "toy")
model = qcore.from_pretrained({source!r}, {{"quant_method": "toy_int8"}}, cache=True)
print(model.qcore_cache)
"""


@pytest.mark.slow
def test_concurrent_writers_both_get_a_model_and_leave_one_verified_entry(source, root):
    script = WRITER.format(tests=str(Path(__file__).parent), source=str(source))
    env = {**os.environ, "QCORE_DISABLE_PLUGIN_AUTOLOAD": "1", "QCORE_CACHE_DIR": str(root)}
    writers = [
        subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [w.communicate(timeout=300)[0].strip() for w in writers]
    assert [w.returncode for w in writers] == [0, 0]
    (entry,) = quantized_cache.entries(root)
    assert outputs == [str(entry.path)] * 2
    assert quantized_cache._verified(entry.path)
    assert not [p for p in root.iterdir() if p.name.startswith(".") and p.name.endswith(".build")]


def test_cache_list_and_clear_commands(source, root, toy):
    load(source)
    runner = CliRunner()
    listed = runner.invoke(cli, ["cache", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    (row,) = json.loads(listed.stdout)
    assert row["source"] == str(source) and row["method"] == "toy_int8" and row["nbytes"] > 0
    cleared = runner.invoke(cli, ["cache", "clear"])
    assert cleared.exit_code == 0, cleared.output
    assert quantized_cache.entries(root) == []
    shutil.rmtree(root)
    assert runner.invoke(cli, ["cache", "list"]).exit_code == 0  # an absent cache is an empty one


def test_the_cli_cache_flag_writes_and_reuses_an_entry(source, root, toy_only, tmp_path):
    from qcore.testing.models import add_byte_tokenizer

    add_byte_tokenizer(source)
    text = tmp_path / "text.txt"
    text.write_text("It was the best of times, it was the worst of times. " * 4, encoding="utf-8")
    arguments = ["eval", str(source), "--preset", "toy-int8", "--no-baseline", "--text", str(text), "--window", "64"]
    first = CliRunner().invoke(cli, [*arguments, "--cache", "--json"])
    assert first.exit_code == 0, first.output
    (entry,) = quantized_cache.entries(root)
    again = CliRunner().invoke(cli, [*arguments, "--cache", "--json"])
    assert json.loads(again.stdout)["results"] == [
        {**row, "load_s": json.loads(again.stdout)["results"][0]["load_s"],
         "tokens_per_s": json.loads(again.stdout)["results"][0]["tokens_per_s"]}
        for row in json.loads(first.stdout)["results"]
    ]  # fmt: skip
    assert [e.key for e in quantized_cache.entries(root)] == [entry.key]
