"""Damaged and tampered bitsandbytes checkpoints: every stored tensor of a 4-bit or int8 module is checked against
the module and the config before bitsandbytes sees it, and a bad one is a ``CheckpointError`` naming the file, the
tensor and what was expected, never a silent load, a ``PluginError`` or a crash (the segfault case runs in a child
process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import qcore
import torch
from qcore.testing.hostile import Stored, stored_tensors, write_copy
from safetensors.torch import load_file

LAST = "model.layers.1.mlp.down_proj"  # 128 -> 64: 8192 weights, 128 blocks of 64
FIRST = "model.layers.0.self_attn.q_proj"  # 64 -> 64


@pytest.fixture(scope="module")
def saved(checkpoints, tmp_path_factory, bnb_dict) -> dict[str, Path]:
    """Method -> a saved pre-quantized tiny Llama (bfloat16)."""
    paths = {}
    for method in ("nf4", "nf4-dq", "int8"):
        model = qcore.from_pretrained(checkpoints["llama"], bnb_dict(method), dtype=torch.bfloat16)
        paths[method] = tmp_path_factory.mktemp(method) / "model"
        qcore.save_pretrained(model, paths[method])
    return paths


def tampered(saved: Path, tmp_path: Path, name: str, value: torch.Tensor | None) -> Path:
    """A copy of ``saved`` with tensor ``name`` replaced (stored last in the file) or deleted."""
    return write_copy(saved, tmp_path / "tampered", {name: None if value is None else Stored.of(name, value)})


def stored(saved: Path, name: str) -> torch.Tensor:
    return load_file(saved / "model.safetensors")[name]


def state_with(saved: Path, module: str, **changes) -> torch.Tensor:
    """The module's packed nf4 quant state with some JSON fields changed."""
    key = f"{module}.weight.quant_state.bitsandbytes__nf4"
    state = json.loads(bytes(stored(saved, key).tolist()))
    return torch.tensor(list(json.dumps({**state, **changes}).encode()), dtype=torch.uint8)


def refused(directory: Path, tensor: str, *fragments: str) -> qcore.CheckpointError:
    with pytest.raises(qcore.CheckpointError) as caught:
        qcore.from_pretrained(directory)
    error = caught.value
    assert error.tensor == tensor
    assert error.file == str(directory / "model.safetensors")
    for fragment in fragments:
        assert fragment in str(error)
    return error


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda t: t[:10], "torch.float32 of shape (128,) (one per block of 64 of the 8192 weights"),
        (lambda t: t[:1], "of shape (128,)"),
        (lambda t: t.reshape(2, -1), "of shape (128,)"),
        (lambda t: t.to(torch.float16), "torch.float32 of shape (128,)"),
    ],
    ids=["truncated", "one element", "2-D", "float16"],
)
def test_nf4_absmax_that_does_not_fit_is_refused(saved, tmp_path, change, expected):
    name = f"{LAST}.weight.absmax"
    refused(tampered(saved["nf4"], tmp_path, name, change(stored(saved["nf4"], name))), name, expected)


@pytest.mark.parametrize(
    ("tensor", "change", "expected"),
    [
        ("weight.quant_map", lambda t: t[:2], "torch.float32 of shape (16,)"),
        ("weight", lambda t: t[:-1], "torch.uint8 of shape (4096, 1) (8192 4-bit codes as uint8)"),
        ("weight", lambda t: t.view(torch.int8), "torch.uint8 of shape (4096, 1)"),
        ("weight.quant_map", lambda t: torch.full_like(t, float("nan")), "finite values"),
    ],
    ids=["quant_map 2 of 16", "packed weight truncated", "packed weight as int8", "quant_map NaN"],
)
def test_nf4_tensor_that_does_not_fit_is_refused(saved, tmp_path, tensor, change, expected):
    name = f"{LAST}.{tensor}"
    refused(tampered(saved["nf4"], tmp_path, name, change(stored(saved["nf4"], name))), name, expected)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"shape": [4096, 4096]}, "names shape [4096, 4096]; expected the module's shape [64, 128]"),
        ({"shape": [16, 16]}, "names shape [16, 16]"),
        ({"blocksize": 32}, "of shape (256,) (one per block of 32"),
        ({"blocksize": 4096}, "of shape (2,) (one per block of 4096"),
        ({"blocksize": 48}, "field 'blocksize' holds 48; expected one of [32, 64"),
        ({"quant_type": "nf5"}, "field 'quant_type' holds 'nf5'"),
        ({"dtype": "_inductor"}, "field 'dtype' holds '_inductor'; expected one of ['float16', 'bfloat16'"),
        ({"blocksize": "64"}, "field 'blocksize' holds '64'"),
        ({"shape": [64, True]}, "field 'shape' holds [64, True]"),
        ({"extra": 1}, "holds the fields ['blocksize', 'dtype', 'extra', 'quant_type', 'shape']"),
    ],
    ids=["shape 4096x4096", "shape 16x16", "blocksize 32", "blocksize 4096", "blocksize 48", "nf5", "dtype name",
         "blocksize string", "shape bool", "unknown field"],
)  # fmt: skip
def test_nf4_quant_state_json_that_does_not_fit_is_refused(saved, tmp_path, changes, expected):
    name = f"{LAST}.weight.quant_state.bitsandbytes__nf4"
    # A block size that disagrees with the stored absmax is reported on absmax, with the block size it implies.
    blamed = f"{LAST}.weight.absmax" if "(one per block" in expected else name
    refused(tampered(saved["nf4"], tmp_path, name, state_with(saved["nf4"], LAST, **changes)), blamed, expected)


@pytest.mark.parametrize(
    "raw",
    [b"\xff\xfe garbage", b'{"quant_type": "nf4", "blocksize": 64,', b'{"blocksize": NaN}', b"[1, 2]"],
    ids=["not UTF-8", "truncated", "NaN", "not an object"],
)
def test_garbage_quant_state_bytes_are_a_checkpoint_error_not_a_plugin_error(saved, tmp_path, raw):
    name = f"{LAST}.weight.quant_state.bitsandbytes__nf4"
    value = torch.tensor(list(raw), dtype=torch.uint8)
    refused(tampered(saved["nf4"], tmp_path, name, value), name, "the JSON object bitsandbytes packs")


def test_a_quant_state_of_another_type_is_refused(saved, tmp_path):
    name = f"{LAST}.weight.quant_state.bitsandbytes__nf4"
    directory = write_copy(
        saved["nf4"],
        tmp_path / "renamed",
        {name: None, name.replace("nf4", "nf5"): Stored.of(name.replace("nf4", "nf5"), stored(saved["nf4"], name))},
    )
    with pytest.raises(qcore.CheckpointError, match=r"exactly one, weight\.quant_state\.bitsandbytes__<fp4\|nf4>"):
        qcore.from_pretrained(directory)


def test_deleted_absmax_is_a_checkpoint_error_not_a_plugin_error(saved, tmp_path):
    name = f"{LAST}.weight.absmax"
    refused(tampered(saved["nf4"], tmp_path, name, None), name, "the module lacks ['weight.absmax']")


@pytest.mark.parametrize(
    ("tensor", "change", "expected"),
    [
        ("weight.absmax", lambda t: t[:1], "torch.uint8 of shape (128,)"),
        ("weight.nested_absmax", lambda t: t.reshape(1, 1), "torch.float32 of shape (1,)"),
        ("weight.nested_quant_map", lambda t: t[:16], "torch.float32 of shape (256,)"),
        ("weight.nested_absmax", None, "the module lacks ['weight.nested_absmax']"),
    ],
    ids=["absmax", "nested_absmax 2-D", "nested_quant_map", "nested_absmax deleted"],
)
def test_double_quant_statistics_that_do_not_fit_are_refused(saved, tmp_path, tensor, change, expected):
    name = f"{LAST}.{tensor}"
    value = None if change is None else change(stored(saved["nf4-dq"], name))
    refused(tampered(saved["nf4-dq"], tmp_path, name, value), name, expected)


def test_double_quant_offset_must_be_a_finite_number(saved, tmp_path):
    name = f"{LAST}.weight.quant_state.bitsandbytes__nf4"
    value = state_with(saved["nf4-dq"], LAST, nested_offset="0.1")
    refused(tampered(saved["nf4-dq"], tmp_path, name, value), name, "field 'nested_offset' holds '0.1'")


@pytest.mark.parametrize(
    ("tensor", "change", "expected"),
    [
        ("SCB", lambda t: t[:3], "torch.float32 of shape (64,)"),
        ("weight", lambda t: t.float(), "torch.int8 of shape (64, 64)"),
        ("weight", lambda t: t[:, :32], "torch.int8 of shape (64, 64)"),
        ("weight_format", lambda t: t.reshape(1), "a uint8 scalar"),
        ("weight_format", lambda t: t + 2, "a GPU-specific int8 layout"),
        ("SCB", None, "the module lacks ['SCB']"),
    ],
    ids=["SCB wrong length", "weight as float", "weight truncated", "weight_format 1-D", "weight_format 2", "no SCB"],
)
def test_int8_tensor_that_does_not_fit_is_refused(saved, tmp_path, tensor, change, expected):
    name = f"{FIRST}.{tensor}"
    value = None if change is None else change(stored(saved["int8"], name))
    refused(tampered(saved["int8"], tmp_path, name, value), name, expected)


@pytest.mark.parametrize("method", ["nf4", "nf4-dq", "int8"])
def test_an_untampered_rewrite_loads_bit_identically(saved, tmp_path, logits_of, method):
    """The tampering above changes only the tensor it names: rewritten unchanged, the checkpoint loads as before."""
    name = f"{LAST}.weight.absmax" if method != "int8" else f"{LAST}.SCB"
    directory = tampered(saved[method], tmp_path, name, stored(saved[method], name))
    assert torch.equal(logits_of(qcore.from_pretrained(directory)), logits_of(qcore.from_pretrained(saved[method])))


def test_absmax_cut_to_one_element_and_stored_last_never_crashes_the_process(saved, tmp_path):
    """The attack that crashed bitsandbytes' CPU kernel with SIGSEGV at the first forward: refused before it runs."""
    name = f"{LAST}.weight.absmax"
    directory = tampered(saved["nf4"], tmp_path, name, stored(saved["nf4"], name)[:1])
    tensors, _ = stored_tensors(directory / "model.safetensors")
    assert tensors[-1].name == name  # stored last: a read past its end leaves the file's mapping
    script = (
        "import sys, qcore\n"
        "from qcore.testing import logits\n"
        "try:\n"
        f"    logits(qcore.from_pretrained({str(directory)!r}))\n"
        "except qcore.CheckpointError as error:\n"
        "    print('refused:', error)\n"
        "else:\n"
        "    print('loaded')\n"
    )
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, f"the load killed the process (exit {child.returncode}): {child.stderr[-2000:]}"
    assert f"refused: file {directory / 'model.safetensors'}, tensor '{name}'" in child.stdout
