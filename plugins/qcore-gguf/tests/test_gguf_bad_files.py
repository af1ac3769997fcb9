"""Malformed and hostile GGUF files: each is refused with a ``CheckpointError`` naming the file (and the tensor or
metadata key), from the header alone, fast, and without allocating what the file claims.

Files are written byte by byte here (GGUF v3: magic, version, counts, key/value pairs, tensor infos, aligned data), so
each case breaks exactly one thing of an otherwise valid file.
"""

from __future__ import annotations

import struct
import time

import pytest
import qcore
from qcore_gguf.reader import GgufReader

U32, U64, STRING, ARRAY = 4, 10, 8, 9


def string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv(key: str, value_type: int, payload: bytes) -> bytes:
    return string(key) + struct.pack("<I", value_type) + payload


def tensor_info(name: str, dims: tuple[int, ...], type_id: int, offset: int) -> bytes:
    return string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, type_id, offset)


def gguf_bytes(
    kvs: list[bytes] | None = None,
    tensors: list[bytes] | None = None,
    data: bytes = b"\0" * 128,
    magic: bytes = b"GGUF",
    version: int = 3,
    counts: tuple[int, int] | None = None,
) -> bytes:
    kvs = [kv("general.architecture", STRING, string("llama"))] if kvs is None else kvs
    tensors = [tensor_info("token_embd.weight", (32,), 0, 0)] if tensors is None else tensors
    tensor_count, kv_count = counts or (len(tensors), len(kvs))
    head = magic + struct.pack("<IQQ", version, tensor_count, kv_count) + b"".join(kvs) + b"".join(tensors)
    return head + b"\0" * (-len(head) % 32) + data


def refused(tmp_path, content: bytes, *patterns: str):
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    start = time.perf_counter()
    with pytest.raises(qcore.CheckpointError) as caught:
        GgufReader(path)
    assert time.perf_counter() - start < 2, "a malformed header must be refused at once, not walked"
    message = str(caught.value)
    assert str(path) in message
    for pattern in patterns:
        assert pattern in message, message
    return caught.value


def test_wrong_magic(tmp_path):
    refused(tmp_path, gguf_bytes(magic=b"GGML"), "wrong magic", "b'GGML'")


def test_unknown_version(tmp_path):
    refused(tmp_path, gguf_bytes(version=1), "GGUF version 1")


@pytest.mark.parametrize("keep", [3, 20, 60, 150])
def test_truncated_file(tmp_path, keep):
    refused(tmp_path, gguf_bytes()[:keep], "download it again")


def test_truncated_real_file_names_the_tensor_whose_data_is_cut(gguf_file, tmp_path):
    content = gguf_file("llama", "Q4_0").read_bytes()
    error = refused(tmp_path, content[: len(content) - 100], "past the end")
    assert error.tensor is not None


def test_tensor_data_past_the_end_of_the_file(tmp_path):
    tensors = [tensor_info("token_embd.weight", (32,), 0, 0), tensor_info("output_norm.weight", (32,), 0, 4096)]
    error = refused(tmp_path, gguf_bytes(tensors=tensors), "past the end", "'output_norm.weight'")
    assert error.tensor == "output_norm.weight"


def test_unknown_block_type(tmp_path):
    refused(tmp_path, gguf_bytes(tensors=[tensor_info("blk.0.attn_q.weight", (32, 4), 99, 0)]),
            "unknown ggml type id 99", "'blk.0.attn_q.weight'")  # fmt: skip


def test_known_type_qcore_does_not_load_is_named(tmp_path):
    refused(tmp_path, gguf_bytes(tensors=[tensor_info("blk.0.attn_q.weight", (256, 4), 16, 0)], data=b"\0" * 512),
            "IQ2_XXS", "re-quantize", "'blk.0.attn_q.weight'")  # fmt: skip


@pytest.mark.parametrize(
    "element_type, count",
    [(U32, 2**62), (STRING, 2**40), (ARRAY, 2**33), (U64, 2**64 - 1)],
    ids=["u32", "strings", "arrays", "u64-max"],
)
def test_absurd_metadata_array_length(tmp_path, element_type, count):
    array = kv("tokenizer.ggml.tokens", ARRAY, struct.pack("<IQ", element_type, count))
    refused(tmp_path, gguf_bytes(kvs=[array]), "'tokenizer.ggml.tokens'", f"array of {count} elements")


def test_absurd_string_length(tmp_path):
    bad = string("general.architecture") + struct.pack("<IQ", STRING, 2**63) + b"llama"
    refused(tmp_path, gguf_bytes(kvs=[bad]), "past the end")


def test_absurd_counts_are_bounded_by_the_file(tmp_path):
    refused(tmp_path, gguf_bytes(counts=(2**63, 1)), "download it again")
    refused(tmp_path, gguf_bytes(counts=(1, 2**63)), "download it again")


def test_arrays_nested_too_deeply(tmp_path):
    nested = struct.pack("<IQ", ARRAY, 1) + struct.pack("<IQ", ARRAY, 1) + struct.pack("<IQ", U32, 1) + b"\0" * 4
    refused(tmp_path, gguf_bytes(kvs=[kv("general.architecture", STRING, string("llama")), kv("deep", ARRAY, nested)]),
            "'deep'", "unknown value type")  # fmt: skip


@pytest.mark.parametrize(
    "tensors, pattern",
    [
        ([tensor_info("a.weight", (32,), 0, 0), tensor_info("a.weight", (32,), 0, 32)], "appears twice"),
        ([tensor_info("a.weight", (32,), 0, 0), tensor_info("b.weight", (32,), 0, 64)], "overlaps tensor 'a.weight'"),
        ([tensor_info("a.weight", (32,), 0, 4)], "misaligned"),
        ([tensor_info("a.weight", (30, 2), 2, 0)], "not whole Q4_0 blocks"),
        ([tensor_info("a.weight", (0,), 0, 0)], "empty"),
        (
            [string("a.weight") + struct.pack("<I", 5) + struct.pack("<5Q", 1, 1, 1, 1, 32) + struct.pack("<IQ", 0, 0)],
            "5 dimensions",
        ),
    ],
    ids=["duplicate", "overlap", "misaligned", "partial-block", "empty", "five-dims"],
)
def test_inconsistent_tensor_table(tmp_path, tensors, pattern):
    refused(tmp_path, gguf_bytes(tensors=tensors, data=b"\0" * 512), pattern)


def test_duplicate_metadata_key(tmp_path):
    key = kv("general.architecture", STRING, string("llama"))
    refused(tmp_path, gguf_bytes(kvs=[key, key]), "appears twice")


def test_metadata_not_utf8(tmp_path):
    refused(tmp_path, gguf_bytes(kvs=[kv("general.architecture", STRING, string(b"\xff\xfe"))]), "not UTF-8")


def test_architecture_qcore_gguf_does_not_map(tmp_path):
    refused(tmp_path, gguf_bytes(kvs=[kv("general.architecture", STRING, string("bloom"))]), "'bloom'", "transformers")


def test_from_pretrained_refuses_before_building_anything(tmp_path):
    (tmp_path / "model.gguf").write_bytes(gguf_bytes(magic=b"XXXX"))
    with pytest.raises(qcore.CheckpointError, match="wrong magic"):
        qcore.from_pretrained(tmp_path)
