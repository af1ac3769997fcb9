"""Reliability and security: broken or hostile inputs give a QcoreError naming the file, tensor or field and the fix.

Covers malformed safetensors files and shard indexes (written byte by byte), checkpoints that do not fit the model,
bad configs, pickle checkpoints, plugins that misbehave, saves that fail or are killed, the memory guard, and loads
run in parallel or many times over.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
import weakref
import zipfile
from pathlib import Path

import psutil
import pytest
import qcore
import tiny_models
import torch
import toy_backend
from qcore import plugins
from qcore.checkpoint import CheckpointReader, read_header
from qcore.errors import InsufficientMemory
from safetensors.torch import load_file, save_file
from tiny_models import logits

TOY = {"quant_method": "toy_int8"}
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
#: Every refusal of a damaged file tells the user to fetch it again.
REDOWNLOAD = "download it again"


# -- helpers ---------------------------------------------------------------------------------------------------


def safetensors_file(path: Path, header: dict | bytes, data: bytes = b"", *, header_len: int | None = None) -> Path:
    """A safetensors file written by hand: 8-byte little-endian header length, header JSON, data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)
    return path


def u8(begin: int, end: int) -> dict:
    return {"dtype": "U8", "shape": [end - begin], "data_offsets": [begin, end]}


def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def with_tensors(src: Path, dst: Path, mutate) -> Path:
    """A copy of checkpoint ``src`` whose model.safetensors went through ``mutate(tensors)``."""
    copy_of(src, dst)
    tensors = load_file(dst / "model.safetensors")
    mutate(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def with_config(src: Path, dst: Path, **changes) -> Path:
    copy_of(src, dst)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, **changes}))
    return dst


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``directory`` (the directory included) with its size and mtime."""
    paths = [directory, *directory.rglob("*")]
    return {str(p.relative_to(directory)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in paths}


def contents(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture
def no_weight_read(monkeypatch):
    """Fail the test if any weight is read."""

    def refuse(self, names=None):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(CheckpointReader, "stream", refuse)


@pytest.fixture(scope="module")
def sharded(llama, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sharded") / "llama"
    qcore.save_pretrained(qcore.from_pretrained(llama), out, max_shard_size="40KB")
    assert len(set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values())) > 2
    return out


@pytest.fixture(scope="module")
def llama_logits(llama) -> torch.Tensor:
    return logits(qcore.from_pretrained(llama))


# -- safetensors files -----------------------------------------------------------------------------------------

MALFORMED = {
    "header length past the end": ({"a": u8(0, 2)}, b"xx", 10**6, r"header length 1000000 runs past the end"),
    "header length absurd": ({"a": u8(0, 2)}, b"xx", 2**63, r"header length 9223372036854775808 runs past"),
    "header not JSON": (b"{not json", b"", None, r"header is not valid JSON \(Expecting property name"),
    "header not UTF-8": (b'{"a\xff": 1}', b"", None, r"header is not valid JSON \(it is not UTF-8\)"),
    "header nested too deeply": (b"[" * 100_000, b"", None, r"header is not valid JSON \(it is nested too deeply\)"),
    "header with NaN": (b'{"a": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0], "x": NaN}}', b"", None, "NaN"),
    "header with a duplicate key": (
        b'{"a": {"dtype": "U8", "dtype": "U8", "shape": [0], "data_offsets": [0, 0]}}', b"", None,
        r"duplicate key 'dtype'",
    ),
    "header not an object": (b"[]", b"", None, r"header is not a JSON object"),
    "metadata not strings": ({"__metadata__": {"k": 1}}, b"", None, r"__metadata__ must map strings to strings"),
}  # fmt: skip

MALFORMED_TENSORS = {
    "offsets out of range": ({"a": u8(0, 4)}, b"xx", "a", r"data_offsets \[0, 4\] out of range of the 2-byte data"),
    "offsets reversed": ({"a": {**u8(0, 0), "data_offsets": [2, 0]}}, b"xx", "a", r"out of range"),
    "overlapping": ({"a": u8(0, 4), "b": u8(2, 6)}, b"x" * 6, "b", r"overlaps tensor 'a'"),
    "gap between tensors": ({"a": u8(0, 2), "b": u8(4, 6)}, b"x" * 6, "b", r"leaves bytes 2..4 of the data section"),
    "offsets not dtype x shape": (
        {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"x" * 4, "a",
        r"data_offsets span 4 bytes but F32 x \[2\] needs 8",
    ),
    "unknown dtype": ({"a": {**u8(0, 2), "dtype": "F17"}}, b"xx", "a", r"unknown dtype 'F17' \(known: BOOL, U8"),
    "shape not integers": ({"a": {**u8(0, 2), "shape": [2.0]}}, b"xx", "a", r"shape \[2.0\] is not a list of"),
    "shape negative": ({"a": {**u8(0, 0), "shape": [-1]}}, b"", "a", r"shape \[-1\] is not a list of non-negative"),
    "offsets not a pair": ({"a": {**u8(0, 2), "data_offsets": [0]}}, b"xx", "a", r"data_offsets \[0\] is not a pair"),
    "entry not an object": ({"a": [1, 2]}, b"", "a", r"header entry is not an object"),
    "element count overflows 64 bits": (
        {"a": {**u8(0, 0), "shape": [2**40, 2**40, 0]}}, b"", "a", r"more elements than a 64-bit size can count",
    ),
}  # fmt: skip


@pytest.mark.parametrize("header, data, header_len, message", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_safetensors_file_is_refused_naming_the_file(tmp_path, header, data, header_len, message):
    path = safetensors_file(tmp_path / "model.safetensors", header, data, header_len=header_len)
    with pytest.raises(qcore.CheckpointError, match=message) as caught:
        read_header(path)
    assert caught.value.file == str(path) and str(path) in str(caught.value)
    assert REDOWNLOAD in str(caught.value)


@pytest.mark.parametrize("header, data, tensor, message", MALFORMED_TENSORS.values(), ids=MALFORMED_TENSORS.keys())
def test_malformed_tensor_entry_is_refused_naming_file_and_tensor(tmp_path, header, data, tensor, message):
    path = safetensors_file(tmp_path / "model.safetensors", header, data)
    with pytest.raises(qcore.CheckpointError, match=message) as caught:
        read_header(path)
    assert (caught.value.file, caught.value.tensor) == (str(path), tensor)
    assert f"tensor {tensor!r}" in str(caught.value) and REDOWNLOAD in str(caught.value)


def test_file_shorter_than_the_length_prefix_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x05\x00")
    with pytest.raises(qcore.CheckpointError, match=r"truncated: 2 bytes, shorter than the 8-byte header length"):
        read_header(path)


def test_trailing_bytes_after_the_last_tensor_are_refused(tmp_path):
    path = safetensors_file(tmp_path / "model.safetensors", {"a": u8(0, 2)}, b"xxxx")
    with pytest.raises(qcore.CheckpointError, match="2 bytes past the last tensor"):
        read_header(path)


def test_a_well_formed_file_written_by_hand_is_read(tmp_path):
    header = {"__metadata__": {"format": "pt"}, "b": u8(2, 5), "a": u8(0, 2), "empty": u8(5, 5)}
    infos, metadata = read_header(safetensors_file(tmp_path / "model.safetensors", header, b"abcde"))
    assert metadata == {"format": "pt"}
    assert {name: (info.dtype, info.shape, info.nbytes) for name, info in infos.items()} == {
        "a": ("U8", (2,), 2), "b": ("U8", (3,), 3), "empty": ("U8", (0,), 0),
    }  # fmt: skip


def test_truncated_checkpoint_is_refused_before_the_model_is_built(llama, tmp_path, no_weight_read):
    damaged = copy_of(llama, tmp_path / "damaged")
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(qcore.CheckpointError, match=r"out of range of the .* \(a truncated file\?\)") as caught:
        qcore.from_pretrained(damaged)
    assert caught.value.file == str(weights) and REDOWNLOAD in str(caught.value)


# -- checkpoints that do not fit the model ---------------------------------------------------------------------


@pytest.mark.parametrize("quantization", [None, TOY], ids=["plain", "toy"])
def test_tensor_of_the_wrong_shape_is_refused_before_any_weight_is_read(
    llama, tmp_path, toy, quantization, no_weight_read
):
    bad = with_tensors(llama, tmp_path / "bad", lambda t: t.update({Q_PROJ: torch.zeros(64, 32, dtype=torch.bfloat16)}))
    with pytest.raises(qcore.CheckpointError) as caught:
        qcore.from_pretrained(bad, quantization)
    assert (caught.value.tensor, caught.value.file) == (Q_PROJ, str(bad / "model.safetensors"))
    assert "shape (64, 32) does not fit the model's (64, 64)" in str(caught.value)
    assert "config.json does not match the weights" in str(caught.value)
    assert "preprocess_model" not in [phase for phase, _ in toy_backend.CALLS]


@pytest.mark.parametrize("quantization", [None, TOY], ids=["plain", "toy"])
def test_integer_tensor_where_the_model_has_floats_is_refused(llama, tmp_path, toy, quantization, no_weight_read):
    bad = with_tensors(llama, tmp_path / "bad", lambda t: t.update({Q_PROJ: torch.zeros(64, 64, dtype=torch.int32)}))
    with pytest.raises(qcore.CheckpointError, match=r"dtype I32 does not fit the model's torch.bfloat16") as caught:
        qcore.from_pretrained(bad, quantization)
    assert caught.value.tensor == Q_PROJ and "not for this model" in str(caught.value)


@pytest.mark.parametrize("quantization", [None, TOY], ids=["plain", "toy"])
def test_missing_tensor_is_named(llama, tmp_path, toy, quantization):
    bad = with_tensors(llama, tmp_path / "bad", lambda t: t.pop(Q_PROJ))
    with pytest.raises(qcore.CheckpointError, match="not in the checkpoint") as caught:
        qcore.from_pretrained(bad, quantization)
    assert caught.value.tensor == Q_PROJ and caught.value.file == str(bad)
    assert "checkpoint is incomplete" in str(caught.value)


@pytest.mark.parametrize(
    "extra",
    ["model.layers.0.extra.weight", "model.layers.0.self_attn.q_proj.extra"],
    ids=["new module", "owned module"],
)
@pytest.mark.parametrize("quantization", [None, TOY], ids=["plain", "toy"])
def test_unexpected_tensor_is_an_error_before_reading_unless_allowed(
    llama, tmp_path, toy, quantization, extra, monkeypatch, caplog
):
    bad = with_tensors(llama, tmp_path / "bad", lambda t: t.update({extra: torch.zeros(3)}))
    with monkeypatch.context() as patch:
        patch.setattr(CheckpointReader, "stream", lambda *a, **k: pytest.fail("a weight was read"))
        with pytest.raises(qcore.CheckpointError, match=r"1 checkpoint tensor\(s\) have no place") as caught:
            qcore.from_pretrained(bad, quantization)
    assert caught.value.tensor == extra and "Pass allow_unexpected=True to load anyway" in str(caught.value)

    with caplog.at_level(logging.WARNING, logger="qcore"):
        model = qcore.from_pretrained(bad, quantization, allow_unexpected=True)  # the toy never sees the extra tensor
    assert extra in caplog.text
    clean = qcore.from_pretrained(llama, quantization)
    assert torch.equal(logits(model), logits(clean))


# -- sharded checkpoints and their index -----------------------------------------------------------------------


def edit_index(directory: Path, edit) -> Path:
    index = directory / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    edit(data["weight_map"])
    index.write_text(json.dumps(data))
    return index


def first_shard(directory: Path) -> str:
    return json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"][Q_PROJ]


def point_q_proj_at(name: str):
    return lambda weight_map: weight_map.update({Q_PROJ: name})


def test_missing_shard_is_named(sharded, tmp_path):
    broken = copy_of(sharded, tmp_path / "broken")
    shard = first_shard(broken)
    (broken / shard).unlink()
    message = rf"weight file '{shard}' listed in .*index.json is missing"
    with pytest.raises(qcore.CheckpointError, match=message) as caught:
        qcore.from_pretrained(broken)
    assert caught.value.file == str(broken / shard) and REDOWNLOAD in str(caught.value)


@pytest.mark.parametrize("name", ["../outside.safetensors", "sub/../../outside.safetensors", "/etc/passwd", "a\\..\\b"])
def test_shard_name_leaving_the_directory_is_refused(sharded, tmp_path, name, no_weight_read):
    (tmp_path / "outside.safetensors").write_bytes((sharded / first_shard(sharded)).read_bytes())
    broken = copy_of(sharded, tmp_path / "broken")
    index = edit_index(broken, point_q_proj_at(name))
    with pytest.raises(qcore.CheckpointError, match="points outside the checkpoint directory") as caught:
        qcore.from_pretrained(broken)
    assert caught.value.file == str(index) and "(path traversal); refusing to read it" in str(caught.value)
    assert "fix the index" in str(caught.value)


def test_symlink_leaving_the_directory_is_refused(sharded, tmp_path, no_weight_read):
    broken = copy_of(sharded, tmp_path / "broken")
    shard = broken / first_shard(broken)
    outside = tmp_path / "outside.safetensors"
    shard.rename(outside)
    shard.symlink_to(outside)
    with pytest.raises(qcore.CheckpointError, match="is a symlink leaving the checkpoint directory") as caught:
        qcore.from_pretrained(broken)
    assert str(outside) in str(caught.value) and "path traversal" in str(caught.value)


def test_single_file_symlink_leaving_the_directory_is_refused(llama, tmp_path, no_weight_read):
    broken = copy_of(llama, tmp_path / "broken")
    (broken / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    (broken / "model.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(qcore.CheckpointError, match="symlink leaving the checkpoint directory"):
        qcore.from_pretrained(broken)


def test_symlinks_inside_the_directory_and_into_the_hub_cache_blobs_are_followed(llama, llama_logits, tmp_path):
    inside = copy_of(llama, tmp_path / "inside")
    (inside / "model.safetensors").rename(inside / "weights.bin.real")
    (inside / "model.safetensors").symlink_to("weights.bin.real")
    assert torch.equal(logits(qcore.from_pretrained(inside)), llama_logits)

    # The Hugging Face cache keeps files in blobs/ and links them from snapshots/<revision>/.
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot_dir = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    snapshot_dir.mkdir(parents=True)
    for number, file in enumerate(sorted(llama.iterdir())):
        blob = repo / "blobs" / f"blob{number}"
        shutil.copy(file, blob)
        (snapshot_dir / file.name).symlink_to(Path("..", "..", "blobs", blob.name))
    assert torch.equal(logits(qcore.from_pretrained(snapshot_dir)), llama_logits)


def test_index_mapping_a_tensor_to_a_shard_that_does_not_hold_it_is_refused(sharded, tmp_path, no_weight_read):
    broken = copy_of(sharded, tmp_path / "broken")
    shards = sorted(set(json.loads((broken / "model.safetensors.index.json").read_text())["weight_map"].values()))
    other = next(shard for shard in shards if shard != first_shard(broken))
    index = edit_index(broken, point_q_proj_at(other))
    message = rf"the index maps this tensor to '{other}', which does not hold it"
    with pytest.raises(qcore.CheckpointError, match=message) as caught:
        qcore.from_pretrained(broken)
    assert (caught.value.file, caught.value.tensor) == (str(index), Q_PROJ) and "stale or corrupt" in str(caught.value)


@pytest.mark.parametrize("text", ["{not json", "[1]", '{"weight_map": []}', '{"weight_map": {}}', "[" * 100_000])
def test_malformed_index_is_refused(sharded, tmp_path, text):
    broken = copy_of(sharded, tmp_path / "broken")
    (broken / "model.safetensors.index.json").write_text(text)
    with pytest.raises(qcore.CheckpointError, match="index|weight_map") as caught:
        qcore.from_pretrained(broken)
    assert caught.value.file == str(broken / "model.safetensors.index.json") and REDOWNLOAD in str(caught.value)


def test_a_sharded_checkpoint_loads_like_the_single_file(sharded, llama_logits):
    assert torch.equal(logits(qcore.from_pretrained(sharded)), llama_logits)


# -- config.json and quantization configs ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        ("{oops", r"config.json: invalid JSON \(JSONDecodeError: Expecting property name"),
        ("[" * 100_000, r"config.json: invalid JSON \(RecursionError"),
        ("[]", r"config.json: must hold a JSON object, not list"),
        ('{"hidden_size": 64}', r"config.json: not a usable transformers config .*model_type"),
    ],
    ids=["not JSON", "nested too deeply", "not an object", "no model_type"],
)
def test_broken_config_json_is_a_config_error_naming_the_file(llama, tmp_path, text, message):
    broken = copy_of(llama, tmp_path / "broken")
    (broken / "config.json").write_text(text)
    with pytest.raises(qcore.ConfigError, match=message) as caught:
        qcore.from_pretrained(broken)
    assert str(broken / "config.json") in str(caught.value)
    assert "fix" in str(caught.value) or "regenerate config.json" in str(caught.value)


def test_config_json_field_of_the_wrong_type_names_the_field(llama, tmp_path):
    broken = with_config(llama, tmp_path / "broken", hidden_size="big")
    with pytest.raises(qcore.ConfigError, match=r"(?s)config.json: not a usable .*'hidden_size' expected int"):
        qcore.from_pretrained(broken)


@pytest.mark.parametrize(
    "stored, message",
    [
        ({"quant_method": "toy_int8", "compute_dtype": 5}, r"field 'compute_dtype' must be str or null, got 5"),
        ({"quant_method": "toy_int8", "compute_dtype": "float99"}, r"'compute_dtype' must be one of \['float16'"),
        ({"quant_method": "toy_int8", "bits": 4}, r"unknown field\(s\) \['bits'\]; valid fields are"),
        ({"bits": 4}, r"has no 'quant_method' string .*add e.g."),
        ({"quant_method": "magic"}, r"unknown quant_method 'magic'; installed methods: .*toy_int8.*Install a qcore"),
        ([1], r"config.json: quantization_config must be an object with a 'quant_method'"),
        ({"rules": [[1, 2]]}, r"recipe rule \[1, 2\] must be a \(pattern, config\) pair"),
    ],
    ids=["wrong type", "out of range", "unknown field", "no method", "unknown method", "not an object", "bad recipe"],
)  # fmt: skip
def test_bad_stored_quantization_config_is_a_config_error_naming_config_json(llama, tmp_path, toy, stored, message):
    broken = with_config(llama, tmp_path / "broken", quantization_config=stored)
    with pytest.raises(qcore.ConfigError, match=message) as caught:
        qcore.from_pretrained(broken)
    assert str(caught.value).startswith("config.json")


def real_config_cases():
    """Out-of-range settings of the real backends installed here: (config dict, field the error must name)."""
    cases = {
        "bitsandbytes": [
            ({"load_in_4bit": True, "llm_int8_threshold": -1.0}, "llm_int8_threshold"),
            ({"load_in_4bit": True, "bnb_4bit_blocksize": 0}, "bnb_4bit_blocksize"),
            ({"load_in_4bit": True, "bnb_4bit_quant_type": "nf5"}, "bnb_4bit_quant_type"),
            ({"load_in_4bit": True, "load_in_8bit": True}, "load_in_8bit"),
            ({"load_in_4bit": "yes"}, "load_in_4bit"),
        ],
        "hqq": [
            ({"nbits": 5}, "nbits"),
            ({"nbits": 0}, "nbits"),
            ({"group_size": 0}, "group_size"),
            ({"group_size": -64}, "group_size"),
            ({"nbits": "4"}, "nbits"),
            ({"axis": 2}, "axis"),
        ],
    }
    return [
        pytest.param(method, data, field, id=f"{method}-{field}-{next(iter(data.values()))}")
        for method, items in cases.items()
        for data, field in items
    ]


@pytest.mark.parametrize("method, data, field", real_config_cases())
def test_real_backend_config_out_of_range_names_the_field(method, data, field):
    try:
        plugins.backend_for(method)
    except qcore.ConfigError:
        pytest.skip(f"no plugin for {method} installed")
    with pytest.raises(qcore.ConfigError) as caught:
        qcore.QuantConfig.from_dict({"quant_method": method, **data})
    assert field in str(caught.value) and method in str(caught.value)


def test_toy_config_out_of_range_names_the_field_and_the_allowed_values(llama, toy, no_weight_read):
    with pytest.raises(qcore.ConfigError, match=r"toy_int8 config: field 'compute_dtype' must be one of \["):
        qcore.from_pretrained(llama, {**TOY, "compute_dtype": "float99"})


@pytest.mark.parametrize(
    "recipe, message",
    [
        ({"rules": "q_proj"}, r"recipe field 'rules' must be a list"),
        ({"rules": [7]}, r"recipe rule 7 must be"),
        ({"rules": [{"pattern": "re:(", "config": None}]}, r"recipe pattern 're:\(' is not a valid regular expression"),
        ({"rules": [{"pattern": "*", "config": {**TOY, "compute_dtype": 1}}]}, r"recipe rule '\*': .*'compute_dtype'"),
        ({"rules": [], "modules": {"a": 0}, "configs": {"x": 1}}, r"recipe field 'configs' must be a list"),
        ({"rules": [], "modules": {"a": True}, "configs": [TOY]}, r"'modules' must map module names to indexes"),
    ],
)
def test_bad_recipe_is_a_config_error(toy, recipe, message):
    with pytest.raises(qcore.ConfigError, match=message):
        qcore.Recipe.from_dict(recipe)


@pytest.fixture
def no_plugins(monkeypatch):
    """As if no plugin were installed (the real ones may be, in this environment): no entry point is found."""
    monkeypatch.setattr(plugins.importlib.metadata, "entry_points", lambda **selection: [])
    plugins.reset_plugins()
    yield
    monkeypatch.undo()
    plugins.reset_plugins()


@pytest.mark.parametrize("method, package", plugins.KNOWN_PLUGINS.items())
@pytest.mark.parametrize("where", ["argument", "config.json"])
def test_method_whose_plugin_is_not_installed_names_the_pip_command(
    llama, tmp_path, no_plugins, method, package, where
):
    message = rf"unknown quant_method '{method}'; installed methods: none. Install its plugin: pip install {package}$"
    with pytest.raises(qcore.ConfigError, match=message):
        if where == "argument":
            qcore.from_pretrained(llama, {"quant_method": method})
        else:
            qcore.from_pretrained(with_config(llama, tmp_path / "stored", quantization_config={"quant_method": method}))


# -- pickle checkpoints and remote code ------------------------------------------------------------------------


def pickle_checkpoint(llama: Path, directory: Path, state, **save_kwargs) -> Path:
    directory.mkdir()
    shutil.copy(llama / "config.json", directory / "config.json")
    torch.save(state, directory / "pytorch_model.bin", **save_kwargs)
    return directory


class Payload:
    """Unpickling this runs code: the classic hostile pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def test_pickle_checkpoint_is_refused_by_default_with_the_reason(llama, tmp_path):
    directory = pickle_checkpoint(llama, tmp_path / "bin", load_file(llama / "model.safetensors"))
    with pytest.raises(qcore.CheckpointError) as caught:
        qcore.from_pretrained(directory)
    message = str(caught.value)
    assert caught.value.file == str(directory / "pytorch_model.bin")
    assert "unpickling a file from a stranger can run arbitrary code" in message
    assert "Convert it to safetensors, or pass allow_pickle=True" in message


@pytest.mark.parametrize("legacy", [False, True], ids=["zip format", "legacy format"])
@pytest.mark.parametrize("quantization", [None, TOY], ids=["plain", "toy"])
def test_plain_state_dict_pickle_loads_with_the_opt_in_like_safetensors(llama, tmp_path, toy, quantization, legacy):
    state = load_file(llama / "model.safetensors")
    directory = pickle_checkpoint(llama, tmp_path / "bin", state, _use_new_zipfile_serialization=not legacy)
    loaded = qcore.from_pretrained(directory, quantization, allow_pickle=True)
    assert torch.equal(logits(loaded), logits(qcore.from_pretrained(llama, quantization)))


def test_hostile_pickle_is_refused_even_with_the_opt_in(llama, tmp_path):
    marker = tmp_path / "pwned"
    state = {**load_file(llama / "model.safetensors"), "model.norm.weight": Payload(marker)}
    directory = pickle_checkpoint(llama, tmp_path / "bin", state)
    with pytest.raises(qcore.CheckpointError) as caught:
        qcore.from_pretrained(directory, allow_pickle=True)
    assert not marker.exists()
    message = str(caught.value)
    assert caught.value.file == str(directory / "pytorch_model.bin")
    assert "the file tried to run code: its pickle asks to import and call builtins.exec" in message
    assert "refused by torch.load(weights_only=True)" in message and "even with allow_pickle=True" in message
    assert "ask the publisher for safetensors weights" in message and "weights_only=False" not in message
    assert caught.value.__cause__ is None  # torch's own exception is not the interface
    # The payload is live (a careless loader would run it): the pickle really calls exec.
    import pickletools

    with zipfile.ZipFile(directory / "pytorch_model.bin") as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    assert any(op.name in ("GLOBAL", "STACK_GLOBAL") for op, _, _ in pickletools.genops(data)) and b"exec" in data


@pytest.mark.parametrize(
    "state, message",
    [
        ({"state_dict": {}, "epoch": 3}, "is not a plain state dict"),
        ([torch.zeros(2)], "is not a plain state dict"),
        ({"model.norm.weight": torch.zeros(2, dtype=torch.complex64)}, "dtype torch.complex64 is not one qcore loads"),
    ],
    ids=["nested", "list", "complex dtype"],
)
def test_pickle_that_is_not_a_state_dict_is_refused(llama, tmp_path, state, message):
    directory = pickle_checkpoint(llama, tmp_path / "bin", state)
    with pytest.raises(qcore.CheckpointError, match=message) as caught:
        qcore.from_pretrained(directory, allow_pickle=True)
    assert caught.value.file == str(directory / "pytorch_model.bin")


def test_corrupt_pickle_is_a_checkpoint_error(llama, tmp_path):
    directory = pickle_checkpoint(llama, tmp_path / "bin", {})
    (directory / "pytorch_model.bin").write_bytes(b"\x80\x02garbage" * 10)
    with pytest.raises(qcore.CheckpointError, match=r"cannot be read by torch.load.*download it again"):
        qcore.from_pretrained(directory, allow_pickle=True)


def test_trust_remote_code_is_never_accepted(llama, no_weight_read):
    with pytest.raises(qcore.ConfigError, match="qcore never runs a checkpoint's own code"):
        qcore.from_pretrained(llama, trust_remote_code=True)


def test_trust_remote_code_false_is_accepted(llama, llama_logits):
    assert torch.equal(logits(qcore.from_pretrained(llama, trust_remote_code=False)), llama_logits)


EVIL_MODULE = "import pathlib\npathlib.Path({marker!r}).write_text('remote code ran')\n"
AUTO_MAP = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}


def test_auto_map_is_ignored_and_its_code_never_runs(llama, llama_logits, tmp_path):
    marker = tmp_path / "ran"
    directory = with_config(llama, tmp_path / "remote", auto_map=AUTO_MAP)
    (directory / "evil.py").write_text(EVIL_MODULE.format(marker=str(marker)))
    model = qcore.from_pretrained(directory)
    assert type(model).__name__ == "LlamaForCausalLM" and torch.equal(logits(model), llama_logits)
    assert not marker.exists()


def test_unknown_architecture_that_needs_remote_code_is_refused_without_running_it(llama, tmp_path, no_weight_read):
    marker = tmp_path / "ran"
    directory = with_config(llama, tmp_path / "remote", model_type="evil", auto_map=AUTO_MAP)
    (directory / "evil.py").write_text(EVIL_MODULE.format(marker=str(marker)))
    with pytest.raises(qcore.ConfigError, match=r"config.json: not a usable transformers config .*custom code"):
        qcore.from_pretrained(directory)
    assert not marker.exists()


# -- plugins that misbehave ------------------------------------------------------------------------------------


class Returning(toy_backend.ToyPlugin):
    """The toy backend, returning the wrong kind of value from one hook."""

    def __init__(self, phase):
        super().__init__("returning")
        self.phase = phase

    @qcore.hookimpl
    def update_device_map(self, config, context, device_map):
        return "cpu" if self.phase == "update_device_map" else None

    @qcore.hookimpl
    def load_weight(self, config, context, model, module_name, tensor_name, tensor):
        if self.phase == "load_weight":
            return [tensor]
        return super().load_weight(config, context, model, module_name, tensor_name, tensor)


@pytest.mark.parametrize("phase", ["update_device_map", "load_weight"])
def test_plugin_returning_the_wrong_type_is_a_plugin_error(llama, llama_logits, phase):
    qcore.register_plugin(Returning(phase), "returning", distribution="qcore-returning")
    try:
        with pytest.raises(qcore.PluginError, match=rf"plugin 'qcore-returning' failed in phase '{phase}'") as caught:
            qcore.from_pretrained(llama, TOY)
    finally:
        qcore.unregister_plugin("returning")
    assert "TypeError: returned" in str(caught.value) and caught.value.phase == phase
    if phase == "load_weight":
        assert caught.value.where.startswith("model.layers.0.")
    # Nothing of the failed load lingers: a fresh plain load is as before, modules are built on the CPU.
    assert torch.equal(logits(qcore.from_pretrained(llama)), llama_logits)
    assert torch.nn.Linear(2, 2).weight.device.type == "cpu"


def test_plugin_error_keeps_the_original_exception_as_its_cause(llama):
    class Raising(toy_backend.ToyPlugin):
        @qcore.hookimpl
        def postprocess(self, config, context, model):
            raise ZeroDivisionError("bad maths")

    qcore.register_plugin(Raising("raising"), "raising", distribution="qcore-raising")
    try:
        with pytest.raises(qcore.PluginError) as caught:
            qcore.from_pretrained(llama, TOY)
    finally:
        qcore.unregister_plugin("raising")
    assert isinstance(caught.value.__cause__, ZeroDivisionError)
    assert "model.layers.0.self_attn.q_proj" in caught.value.where


def test_plugin_whose_register_backend_raises_is_listed_unavailable_and_the_others_load(tmp_path, monkeypatch):
    broken = textwrap.dedent(
        """
        import qcore

        @qcore.hookimpl
        def register_backend():
            raise RuntimeError("needs libfoo 2")
        """
    )
    (tmp_path / "qcore_selfbroken.py").write_text(broken)
    info = tmp_path / "qcore_selfbroken-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: qcore-selfbroken\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[qcore]\nselfbroken = qcore_selfbroken\n")
    good = textwrap.dedent(
        """
        import qcore, toy_backend

        @qcore.hookimpl
        def register_backend():
            return qcore.Backend(name="good", configs={"good_q": toy_backend.ToyConfig})
        """
    )
    (tmp_path / "qcore_good.py").write_text(good)
    info = tmp_path / "qcore_good-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: qcore-good\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[qcore]\ngood = qcore_good\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("QCORE_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("QCORE_LOAD_PLUGINS", raising=False)
    plugins.reset_plugins()
    try:
        with pytest.warns(UserWarning, match="qcore-selfbroken failed to load: needs libfoo 2"):
            found = {b.distribution: b for b in qcore.backends()}
        assert not found["qcore-selfbroken"].available
        assert "RuntimeError: needs libfoo 2" in found["qcore-selfbroken"].reason
        assert found["qcore-good"].available and found["qcore-good"].methods == ("good_q",)
    finally:
        sys.modules.pop("qcore_selfbroken", None)
        sys.modules.pop("qcore_good", None)
        plugins.reset_plugins()


# -- saving: nothing lost --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_model(llama):
    """A toy-quantized llama (the plugin is needed to load it, not to use or save it)."""
    qcore.register_plugin(toy_backend.ToyPlugin(), "toy-module")
    try:
        return qcore.from_pretrained(llama, TOY)
    finally:
        qcore.unregister_plugin("toy-module")


def test_save_refuses_a_non_empty_directory_or_a_file(toy_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    message = "destination exists and is not empty; pass overwrite=True"
    with pytest.raises(qcore.CheckpointError, match=message) as caught:
        qcore.save_pretrained(toy_model, out)
    assert caught.value.file == str(out) and contents(out) == {"keep.txt": b"mine"}
    (tmp_path / "file").write_text("mine")
    with pytest.raises(qcore.CheckpointError, match="overwrite=True"):
        qcore.save_pretrained(toy_model, tmp_path / "file")
    assert (tmp_path / "file").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "out"]


def test_save_into_an_empty_directory_and_overwrite_replace_everything(toy_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    qcore.save_pretrained(toy_model, out)
    (out / "stale.txt").write_text("old")
    qcore.save_pretrained(toy_model, out, max_shard_size="40KB", overwrite=True)
    assert "stale.txt" not in contents(out) and "model.safetensors.index.json" in contents(out)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not the 0700 of a private temporary directory


def test_overwrite_without_an_atomic_exchange_falls_back_to_two_renames(toy_model, tmp_path, monkeypatch):
    out = tmp_path / "out"
    qcore.save_pretrained(toy_model, out)
    (out / "stale.txt").write_text("old")
    monkeypatch.setattr("qcore.saving._exchange", lambda a, b: False)
    qcore.save_pretrained(toy_model, out, overwrite=True)
    assert "stale.txt" not in contents(out) and [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("failure", [OSError("disk full"), KeyboardInterrupt()], ids=["OSError", "KeyboardInterrupt"])
def test_failure_after_the_first_shard_leaves_the_destination_exactly_as_it_was(
    toy_model, tmp_path, monkeypatch, failure
):
    import safetensors.torch

    out = tmp_path / "out"
    qcore.save_pretrained(toy_model, out)
    before = contents(out)
    writes = []
    original = safetensors.torch.save_file

    def fail_on_the_second(*args, **kwargs):
        writes.append(args[1])
        if len(writes) == 2:
            raise failure
        original(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", fail_on_the_second)
    # A failed write is reported naming the destination; an interrupt goes through as it is.
    with pytest.raises(qcore.CheckpointError if isinstance(failure, OSError) else type(failure)):
        qcore.save_pretrained(toy_model, out, max_shard_size="40KB", overwrite=True)
    assert len(writes) == 2 and contents(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the staging directory was removed


def test_failure_in_the_final_swap_leaves_the_destination_exactly_as_it_was(toy_model, tmp_path, monkeypatch):
    out = tmp_path / "out"
    qcore.save_pretrained(toy_model, out)
    before = contents(out)

    def broken_exchange(a, b):
        raise OSError("EIO")

    monkeypatch.setattr("qcore.saving._exchange", broken_exchange)
    with pytest.raises(qcore.CheckpointError, match=f"file {out}: cannot write the checkpoint .*EIO"):
        qcore.save_pretrained(toy_model, out, overwrite=True)
    assert contents(out) == before and [p.name for p in tmp_path.iterdir()] == ["out"]


KILLED_SAVER = textwrap.dedent(
    """
    import pathlib, sys, time
    import safetensors.torch
    import torch
    from qcore.saving import save_pretrained

    out, ready = sys.argv[1:3]

    class Config:
        def save_pretrained(self, directory):
            (pathlib.Path(directory) / "config.json").write_text("{}")

    class Model:  # all save_pretrained asks of a model; no transformers, so the child starts fast
        config = Config()

        def state_dict(self):
            return {f"layer{i}.weight": torch.full((100, 100), float(i)) for i in range(4)}

    original = safetensors.torch.save_file

    def write_then_hang(*args, **kwargs):
        original(*args, **kwargs)
        pathlib.Path(ready).touch()
        time.sleep(600)

    safetensors.torch.save_file = write_then_hang
    save_pretrained(Model(), out, max_shard_size="40KB", overwrite=True)
    """
)


def test_sigkill_mid_save_leaves_the_destination_and_the_next_save_clears_the_leftover(llama, tmp_path):
    out, ready = tmp_path / "out", tmp_path / "ready"
    model = qcore.from_pretrained(llama)
    qcore.save_pretrained(model, out)
    before = contents(out)
    script = tmp_path / "saver.py"
    script.write_text(KILLED_SAVER)
    child = subprocess.Popen([sys.executable, str(script), str(out), str(ready)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert child.poll() is None, child.stderr.read().decode()
            assert time.monotonic() < deadline, "the child never wrote its first shard"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        child.kill()
        child.stderr.close()
    assert contents(out) == before
    prefix = f".out.{socket.gethostname()}-{child.pid}."
    (leftover,) = [p for p in tmp_path.iterdir() if p.name.startswith(prefix) and p.name.endswith(".partial")]
    (shard,) = leftover.iterdir()
    assert shard.name.startswith("model-00001-of-")

    # A live process's staging directory (ours) is never touched; the dead child's is cleared by the next save.
    live = tmp_path / f".out.{socket.gethostname()}-{os.getpid()}.live.partial"
    live.mkdir()
    qcore.save_pretrained(model, out, max_shard_size="40KB", overwrite=True)
    assert not leftover.exists() and live.is_dir()
    assert "model.safetensors.index.json" in contents(out)


@pytest.mark.parametrize("kind", ["quantize", "pre-quantized", "sharded", "pickle"])
def test_loading_never_writes_into_the_source(llama, sharded, toy_model, tmp_path, toy, kind):
    if kind == "quantize":
        source, kwargs = copy_of(llama, tmp_path / "src"), {"quantization_config": TOY}
    elif kind == "pre-quantized":
        source, kwargs = qcore.save_pretrained(toy_model, tmp_path / "src"), {}
    elif kind == "sharded":
        source, kwargs = copy_of(sharded, tmp_path / "src"), {"quantization_config": TOY}
    else:
        source = pickle_checkpoint(llama, tmp_path / "src", load_file(llama / "model.safetensors"))
        kwargs = {"allow_pickle": True, "quantization_config": TOY}
    before = snapshot(source)
    time.sleep(0.01)  # a write within the same mtime tick would otherwise go unseen
    qcore.from_pretrained(source, **kwargs)
    assert snapshot(source) == before


# -- the memory guard ------------------------------------------------------------------------------------------


class FakeMemory:
    def __init__(self, available: int):
        self.available = available


def memory_needed(llama, quantization, monkeypatch) -> int:
    monkeypatch.setattr(psutil, "virtual_memory", lambda: FakeMemory(1))
    with pytest.raises(InsufficientMemory) as caught:
        qcore.from_pretrained(llama, quantization)
    return caught.value.needed


@pytest.mark.parametrize("quantization", [None, TOY], ids=["plain", "toy"])
def test_load_that_cannot_fit_fails_fast_with_both_numbers(llama, toy, quantization, monkeypatch, no_weight_read):
    monkeypatch.setattr(psutil, "virtual_memory", lambda: FakeMemory(1000))
    with pytest.raises(InsufficientMemory) as caught:
        qcore.from_pretrained(llama, quantization)
    error = caught.value
    assert isinstance(error, qcore.QcoreError) and isinstance(error, MemoryError)
    assert (error.device, error.available) == ("cpu", 1000) and error.needed > 100_000
    assert f"needs about {error.needed / 2**10:.2f} KiB on cpu but only 1000 bytes is free" in str(error)
    assert "pass check_memory=False to try anyway" in str(error)
    assert "preprocess_model" not in [phase for phase, _ in toy_backend.CALLS]


def test_check_memory_false_skips_the_guard(llama, llama_logits, monkeypatch):
    monkeypatch.setattr(psutil, "virtual_memory", lambda: FakeMemory(1000))
    assert torch.equal(logits(qcore.from_pretrained(llama, check_memory=False)), llama_logits)


def test_guard_counts_quantized_weights_at_the_backends_size(llama, toy, monkeypatch):
    plain, quantized = memory_needed(llama, None, monkeypatch), memory_needed(llama, TOY, monkeypatch)
    assert quantized < plain
    monkeypatch.setattr(psutil, "virtual_memory", lambda: FakeMemory((plain + quantized) // 2))
    qcore.from_pretrained(llama, TOY)
    with pytest.raises(InsufficientMemory):
        qcore.from_pretrained(llama)


def test_guard_checks_each_target_device(llama, monkeypatch, no_weight_read):
    # No GPU is needed: CUDA's presence and free memory are what the guard asks torch, so they are faked.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4096, 8 * 2**30))
    device_map = {"model.layers": "cuda:0", **dict.fromkeys(["model.embed_tokens", "model.norm", "lm_head"], "cpu")}
    device_map["model.rotary_emb"] = "cpu"
    with pytest.raises(InsufficientMemory, match=r"on cuda:0 but only 4.00 KiB is free") as caught:
        qcore.from_pretrained(llama, device_map=device_map)
    assert caught.value.device == "cuda:0"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_guard_estimate_matches_what_a_cuda_load_allocates(wider_llama, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1, 2**40))
        with pytest.raises(InsufficientMemory, match="on cuda:0 but only 1 bytes is free") as caught:
            qcore.from_pretrained(wider_llama, device_map="cuda:0")
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    model = qcore.from_pretrained(wider_llama, device_map="cuda:0")  # the real free memory passes the guard
    allocated = torch.cuda.memory_allocated() - before
    assert abs(allocated - caught.value.needed) < 0.05 * allocated
    del model


# -- many loads ------------------------------------------------------------------------------------------------


def test_parallel_loads_in_threads_match_sequential_loads(checkpoints, toy):
    jobs = [(checkpoints[arch], config) for arch, config in (("llama", TOY), ("qwen2", TOY), ("llama", None))]
    jobs.append((checkpoints["gpt2"], TOY))
    expected = [logits(qcore.from_pretrained(path, config)) for path, config in jobs]
    register_parameter = torch.nn.Module.register_parameter
    for _ in range(2):
        start, results = threading.Barrier(len(jobs)), [None] * len(jobs)

        def load(number, path, config):
            start.wait()
            try:
                results[number] = qcore.from_pretrained(path, config)
            except Exception as error:  # reported below, with the job that raised
                results[number] = error

        threads = [threading.Thread(target=load, args=(n, *job)) for n, job in enumerate(jobs)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for result, reference in zip(results, expected):
            assert not isinstance(result, Exception), repr(result)
            assert torch.equal(logits(result), reference)
        # Global state that building a model touches is as it was.
        assert torch.nn.Module.register_parameter is register_parameter
        assert torch.get_default_dtype() == torch.float32


@pytest.fixture(scope="module")
def wider_llama(tmp_path_factory) -> Path:
    # ~1.3M parameters (2.6 MB in bf16), mostly in the embeddings, which load without quantizing: a load leaking
    # its model would grow RSS by that much each time, and twenty loads stay fast.
    return tiny_models.build(
        "llama", tmp_path_factory.mktemp("wider") / "llama", hidden_size=128, intermediate_size=256, vocab_size=4096
    )


def test_twenty_loads_in_one_process_do_not_grow_memory(wider_llama, toy):
    process = psutil.Process()
    model_bytes = (wider_llama / "model.safetensors").stat().st_size

    def load_and_drop() -> weakref.ref:
        return weakref.ref(qcore.from_pretrained(wider_llama, TOY))

    for _ in range(3):  # warm up caches and the allocator
        load_and_drop()
    gc.collect()
    baseline = process.memory_info().rss
    refs = [load_and_drop() for _ in range(17)]
    gc.collect()
    growth = process.memory_info().rss - baseline
    assert all(ref() is None for ref in refs), "a loaded model is still referenced after it was dropped"
    # Allocator noise stays well within one model's size (measured: under 1 MiB); keeping each of the 17 models
    # would cost 17 times the model's size.
    mib = 2**20
    assert growth < model_bytes, f"RSS grew by {growth / mib:.1f} MiB over 17 loads (model {model_bytes / mib:.1f} MiB)"
