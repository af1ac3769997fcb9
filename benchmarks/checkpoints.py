"""Synthetic Llama checkpoints for the benchmarks, built locally and cached under ``benchmarks/.cache/``.

Nothing is downloaded. Each size is a ``LlamaForCausalLM`` config with random bf16 weights from a fixed seed, written
as ~4 safetensors shards with an index, the way hub checkpoints are laid out. The builder takes tensor names and
shapes from a skeleton on the meta device and fills one shard at a time, so building needs about one shard of memory,
never the whole model.

Importing this module does not import torch (``run.py`` reads checkpoint sizes from the safetensors headers alone);
building does, in a subprocess: ``python benchmarks/checkpoints.py build small``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import struct
import sys
import zlib
from pathlib import Path

CACHE = Path(__file__).resolve().parent / ".cache"

#: Bumped whenever the way weights are generated changes, so stale caches are never reused.
RECIPE_VERSION = 1
SEED = 1234
SHARDS = 4

COMMON = {
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
}

#: Three sizes; grouped-query attention (4 KV heads) as in current Llama-style models.
SIZES = {
    # ~0.10B: 8 x 6.3M in the blocks + 2 x 24.6M embeddings
    "small": {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 8,
              "num_attention_heads": 12, "num_key_value_heads": 4},
    # ~0.34B
    "medium": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 24,
               "num_attention_heads": 16, "num_key_value_heads": 4},
    # ~0.85B: hidden 2048, 16 layers, intermediate 5632, vocab 32000
    "large": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 16,
              "num_attention_heads": 16, "num_key_value_heads": 4},
}  # fmt: skip

#: The model a --quick run builds: loads in well under a second; every dimension divides by 64 (HQQ groups).
QUICK_SIZE = {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4,
              "num_attention_heads": 8, "num_key_value_heads": 4}  # fmt: skip


def model_config(size: str) -> dict:
    shape = QUICK_SIZE if size == "quick" else SIZES[size]
    return {**COMMON, **shape, "architectures": ["LlamaForCausalLM"], "model_type": "llama", "dtype": "bfloat16"}


def checkpoint_dir(size: str) -> Path:
    """Where ``size`` lives in the cache; the name changes whenever its config or the recipe does."""
    key = json.dumps({"config": model_config(size), "seed": SEED, "shards": SHARDS, "recipe": RECIPE_VERSION},
                     sort_keys=True)  # fmt: skip
    return CACHE / f"llama-{size}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def prequantized_dir(size: str, method: str) -> Path:
    return CACHE / f"{checkpoint_dir(size).name}-{method}-qcore"


def is_complete(directory: Path) -> bool:
    """A directory is usable once its config.json exists: builders write it last, after every shard."""
    return (directory / "config.json").is_file()


# -- reading headers without torch --------------------------------------------------------------------------------


def tensor_headers(directory: Path) -> dict[str, dict]:
    """Name -> {dtype, shape, nbytes} of every tensor in the directory's safetensors files, from their headers."""
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for name, info in header.items():
            if name != "__metadata__":
                start, end = info["data_offsets"]
                tensors[name] = {"dtype": info["dtype"], "shape": info["shape"], "nbytes": end - start}
    return tensors


def describe(directory: Path) -> dict:
    """Size facts the report needs: parameter count (bf16 elements), bytes on disk, largest tensor, shard count."""
    tensors = tensor_headers(directory)
    files = sorted(directory.glob("*.safetensors"))
    return {
        "path": str(directory),
        "shards": len(files),
        "tensors": len(tensors),
        "params": sum(_numel(t["shape"]) for t in tensors.values() if t["dtype"] in ("BF16", "F16", "F32")),
        "nbytes": sum(f.stat().st_size for f in files),
        "largest_tensor_nbytes": max(t["nbytes"] for t in tensors.values()),
        "largest_tensor": max(tensors, key=lambda n: tensors[n]["nbytes"]),
    }


def _numel(shape: list[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


# -- building (imports torch) ----------------------------------------------------------------------------------------


def build(size: str, directory: Path) -> None:
    """Write the random checkpoint of ``size`` into ``directory`` (atomically: a staging dir renamed at the end)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{k: v for k, v in model_config(size).items() if k != "model_type"})
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    shapes = [(name, tuple(t.shape)) for name, t in skeleton.state_dict().items()]
    total = sum(_numel(list(shape)) * 2 for _, shape in shapes)

    # A tensor goes to the shard its midpoint falls in: about equal shards, never more than SHARDS.
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[] for _ in range(SHARDS)]
    offset = 0
    for name, shape in shapes:
        nbytes = _numel(list(shape)) * 2
        groups[min(SHARDS - 1, (offset + nbytes // 2) * SHARDS // total)].append((name, shape))
        offset += nbytes
    groups = [group for group in groups if group]

    staging = directory.with_name(directory.name + f".building-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    weight_map = {}
    for index, group in enumerate(groups, start=1):
        file = f"model-{index:05d}-of-{len(groups):05d}.safetensors"
        shard = {name: _random_tensor(torch, name, shape) for name, shape in group}
        save_file(shard, staging / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
        del shard
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (staging / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))
    config.save_pretrained(staging)
    shutil.rmtree(directory, ignore_errors=True)
    staging.rename(directory)


def _random_tensor(torch, name: str, shape: tuple[int, ...]):
    """A reproducible tensor for ``name``: its own generator, so the values do not depend on shard layout."""
    generator = torch.Generator().manual_seed(SEED * 1_000_003 + zlib.crc32(name.encode()))
    values = torch.randn(shape, generator=generator, dtype=torch.float32)
    # Norm weights sit around 1 as in a trained model; matrices get the usual init scale.
    values = 1.0 + 0.05 * values if len(shape) == 1 else 0.02 * values
    return values.to(torch.bfloat16)


def build_prequantized(src: Path, dst: Path, method: str) -> None:
    """Quantize ``src`` with qcore while loading and save the result with ``qcore.save_pretrained``."""
    import qcore
    import torch
    from methods import METHODS

    model = qcore.from_pretrained(src, METHODS[method].qcore_config, dtype=torch.bfloat16)
    staging = dst.with_name(dst.name + f".building-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    qcore.save_pretrained(model, staging)
    shutil.rmtree(dst, ignore_errors=True)
    staging.rename(dst)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("build", help="build one size into the cache (no-op when present)")
    one.add_argument("size", choices=[*SIZES, "quick"])
    one.add_argument("--rebuild", action="store_true")
    pre = sub.add_parser("prequantize", help="save a qcore-quantized copy of one size")
    pre.add_argument("size", choices=[*SIZES, "quick"])
    pre.add_argument("method")
    pre.add_argument("--rebuild", action="store_true")
    args = parser.parse_args(argv)

    if args.command == "build":
        directory = checkpoint_dir(args.size)
        if args.rebuild or not is_complete(directory):
            build(args.size, directory)
        target = directory
    else:
        directory = prequantized_dir(args.size, args.method)
        if args.rebuild or not is_complete(directory):
            build_prequantized(checkpoint_dir(args.size), directory, args.method)
        target = directory
    print(json.dumps(describe(target)))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
