"""Hostile and damaged HQQ checkpoints: qcore decodes hqq's stored metadata itself, so no string in the file reaches
hqq's ``eval``, and every stored tensor is checked against the module and the config before hqq sees it."""

from __future__ import annotations

from pathlib import Path

import pytest
import qcore
import torch
from hqq.core.utils import decode_safetensor_type
from qcore.testing import build
from qcore.testing.hostile import Stored, payload, write_copy
from qcore_hqq.layers import STORED_KEYS
from qcore_hqq.stored import FIELDS
from safetensors.torch import load_file

MODULE = "model.layers.1.mlp.down_proj"  # 128 -> 64 weights: 128 groups of 64


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[int, Path]:
    """nbits -> a saved pre-quantized tiny Llama (bfloat16, groups of 64, axis 1)."""
    source = build("llama", tmp_path_factory.mktemp("llama"))
    paths = {}
    for nbits in (4, 8):
        model = qcore.from_pretrained(source, {"quant_method": "hqq", "nbits": nbits, "group_size": 64, "axis": 1})
        paths[nbits] = tmp_path_factory.mktemp(f"hqq{nbits}") / "model"
        qcore.save_pretrained(model, paths[nbits])
    return paths


def stored(directory: Path, field: str) -> torch.Tensor:
    return load_file(directory / "model.safetensors")[f"{MODULE}.{field}"]


def text(value: str) -> torch.Tensor:
    """A string as hqq stores it: its ASCII codes as uint8."""
    return torch.tensor(list(value.encode()), dtype=torch.uint8)


def tampered(directory: Path, tmp_path: Path, **fields: torch.Tensor | None) -> Path:
    """A copy of ``directory`` with some of MODULE's stored tensors replaced (or deleted, with ``None``)."""
    replace = {f"{MODULE}.{k}": None if v is None else Stored.of(f"{MODULE}.{k}", v) for k, v in fields.items()}
    return write_copy(directory, tmp_path / "tampered", replace)


def refused(directory: Path, field: str, *fragments: str) -> None:
    with pytest.raises(qcore.CheckpointError) as caught:
        qcore.from_pretrained(directory)
    assert caught.value.tensor == f"{MODULE}.{field}"
    assert caught.value.file == str(directory / "model.safetensors")
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_the_allow_list_is_exactly_what_hqq_stores():
    assert FIELDS == STORED_KEYS


@pytest.mark.parametrize("field", ["compute_dtype", "unpack_view_dtype", "packing"])
def test_code_in_a_stored_string_never_runs(saved, tmp_path, field):
    marker = tmp_path / "the-checkpoint-ran-code"
    expression = text(payload(marker) + " or torch.bfloat16")
    refused(tampered(saved[4], tmp_path, **{field: expression}), field, "expected the ASCII codes of one of")
    assert not marker.exists()
    if field != "packing":
        # What the check prevents: hqq's own decoder (used by HQQLinear.load_state_dict, and so by transformers'
        # HQQ path) evaluates the stored bytes.
        decode_safetensor_type(expression, torch.dtype)
        assert marker.exists()


@pytest.mark.parametrize(
    ("fields", "field", "expected"),
    [
        ({"shape": torch.tensor([64, 64])}, "shape", "holds [64, 64]; expected the module's shape [64, 128]"),
        ({"shape": torch.tensor([64, 128, 1])}, "shape", "an int64 tensor of 2 elements"),
        ({"nbits": torch.tensor(8, dtype=torch.int32)}, "packing", "names '4bit_u8' for 8-bit weights"),
        ({"nbits": torch.tensor(3, dtype=torch.int32)}, "packing", "names '4bit_u8' for 3-bit weights"),
        ({"nbits": torch.tensor(5, dtype=torch.int32)}, "nbits", "holds 5; expected one of [1, 2, 3, 4, 8]"),
        ({"group_size": torch.tensor(128, dtype=torch.int32)}, "W_q", "torch.uint8 of shape (32, 128)"),
        ({"group_size": torch.tensor(0, dtype=torch.int32)}, "group_size", "a positive divisor"),
        ({"group_size": torch.tensor(64.0)}, "group_size", "is torch.float32 of shape (); expected an int32 scalar"),
        ({"packing": text("4bit_u9")}, "packing", "spells '4bit_u9'"),
        ({"axis": torch.tensor(2, dtype=torch.int32)}, "axis", "holds 2; expected 0 or 1"),
        ({"view_as_float": torch.tensor(2, dtype=torch.uint8)}, "view_as_float", "holds 2"),
        ({"offload_meta": torch.tensor(1, dtype=torch.uint8)}, "offload_meta", "qcore loads no other"),
        ({"zero": None}, "zero", "the module lacks ['zero']"),
        ({"meta": torch.zeros(1)}, "meta", "tensors hqq does not store: ['meta']"),
    ],
    ids=["shape changed", "shape 3-D", "nbits 8", "nbits 3", "nbits 5", "group_size 128", "group_size 0",
         "group_size float", "packing garbage", "axis 2", "flag 2", "offload_meta", "zero deleted", "meta"],
)  # fmt: skip
def test_stored_metadata_that_does_not_fit_is_refused(saved, tmp_path, fields, field, expected):
    refused(tampered(saved[4], tmp_path, **fields), field, expected)


@pytest.mark.parametrize(
    ("field", "change", "expected"),
    [
        ("scale", lambda t: t[:10], "of shape (128, 1) (one per group)"),
        ("zero", lambda t: t.reshape(1, 128, 1), "of shape (128, 1) (one per group)"),
        ("scale", lambda t: t.view(torch.int16), "a float16/bfloat16/float32 tensor"),
        ("scale", lambda t: torch.full_like(t, float("inf")), "finite values"),
        ("W_q", lambda t: t[:16], "torch.uint8 of shape (64, 64)"),
        ("W_q", lambda t: t.view(torch.int8), "torch.uint8 of shape (64, 64)"),
    ],
    ids=["scale truncated", "zero 3-D", "scale as int16", "scale inf", "W_q truncated", "W_q as int8"],
)
def test_stored_tensors_that_do_not_fit_are_refused(saved, tmp_path, field, change, expected):
    refused(tampered(saved[4], tmp_path, **{field: change(stored(saved[4], field))}), field, expected)


def test_a_module_stored_with_other_settings_than_config_json_says_is_refused(saved, tmp_path):
    """An 8-bit module, consistent in itself, inside a checkpoint whose config.json says 4-bit."""
    eight_bit = {field: stored(saved[8], field) for field in FIELDS}
    refused(tampered(saved[4], tmp_path, **eight_bit), "nbits", "config.json quantizes this module with nbits=4")


def test_an_untampered_rewrite_loads_bit_identically(saved, tmp_path):
    """The tampering above changes only what it names: rewritten unchanged, the checkpoint loads as before."""
    from qcore.testing import logits

    directory = tampered(saved[4], tmp_path, scale=stored(saved[4], "scale"), W_q=stored(saved[4], "W_q"))
    assert torch.equal(logits(qcore.from_pretrained(directory)), logits(qcore.from_pretrained(saved[4])))
