"""Per-shape timings of every ``qcore.kernels`` kernel against the dense matmul, on this machine's CPU.

The measurement behind the kernel order in ``qcore.kernels``: for each weight shape and batch size, one weight of
each kind with random codes, every kernel it can run here, and ``F.linear`` with the dense weight in the same dtype.
Kernels are timed in interleaved rounds (one call of each per round) and reported as medians, so a burst of load
from other processes hits every kernel alike.

    python benchmarks/kernels.py                          # the shapes of the benchmark models, batch 1 and 32
    python benchmarks/kernels.py --shapes 2048x2048 --batches 1 --rounds 50 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F
from qcore.kernels import Fp8Weight, Int4Weight, Int8Weight

#: out x in of every distinct Linear in the 336M and 852M synthetic models (benchmarks/checkpoints.py).
DEFAULT_SHAPES = ("1024x1024", "256x1024", "2816x1024", "1024x2816", "2048x2048", "5632x2048", "2048x5632")


def weights(out_features: int, in_features: int, group_size: int) -> dict[str, object]:
    """One weight of each kind, random codes and statistics of realistic magnitude."""
    generator = torch.Generator().manual_seed(0)
    groups = in_features // group_size
    scale = torch.rand(out_features, groups, generator=generator) * 0.01 + 0.001
    return {
        f"int4 g{group_size}": Int4Weight.from_codes(
            torch.randint(0, 16, (out_features, in_features), generator=generator),
            scale,
            torch.rand(out_features, groups, generator=generator) * 15,
            group_size,
        ),
        "int8 row": Int8Weight.from_codes(
            torch.randint(-128, 128, (out_features, in_features), generator=generator, dtype=torch.int8),
            torch.rand(out_features, generator=generator) * 0.001,
        ),
        f"int8 g{group_size}": Int8Weight.from_codes(
            torch.randint(-128, 128, (out_features, in_features), generator=generator, dtype=torch.int8),
            scale / 16,
            torch.randn(out_features, groups, generator=generator),
            group_size,
        ),
        "fp8 row": Fp8Weight.from_codes(
            (torch.randn(out_features, in_features, generator=generator) * 64).to(torch.float8_e4m3fn),
            torch.rand(out_features, generator=generator) * 0.001,
        ),
    }


def time_rounds(calls: dict[str, object], rounds: int) -> dict[str, float]:
    """Median milliseconds of each call, over ``rounds`` interleaved rounds after one warm-up round."""
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for round_index in range(rounds + 1):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            elapsed = time.perf_counter() - start
            if round_index:
                samples[name].append(elapsed * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}


def measure(shape: str, batch: int, dtype: torch.dtype, group_size: int, rounds: int) -> list[dict]:
    out_features, in_features = (int(n) for n in shape.split("x"))
    x = torch.randn(batch, in_features, dtype=dtype)
    dense = torch.randn(out_features, in_features, dtype=dtype)
    calls = {("dense", "F.linear"): lambda: F.linear(x, dense)}
    for kind, weight in weights(out_features, in_features, group_size).items():
        for kernel in ("int4pack-cpu", "int8pack", "scaled_mm", "dequantize"):
            try:
                weight.select("cpu", dtype, batch_hint=batch, kernel=kernel)
            except ValueError:
                continue
            # Each kernel gets its own prepared copy: select repacks in place.
            prepared = type(weight).__new__(type(weight))
            prepared.__dict__.update(weight.__dict__)
            calls[(kind, kernel)] = lambda w=prepared: w.matmul(x)
        weight.select("cpu", dtype, batch_hint=batch)
        calls[(kind, "auto")] = lambda w=weight: w.matmul(x)
        calls[(kind, "auto")].chosen = weight.kernel
    medians = time_rounds(calls, rounds)
    dense_ms = medians[("dense", "F.linear")]
    rows = []
    for (kind, kernel), ms in medians.items():
        chosen = getattr(calls[(kind, kernel)], "chosen", kernel)
        rows.append(
            {
                "shape": shape,
                "batch": batch,
                "dtype": str(dtype).removeprefix("torch."),
                "weight": kind,
                "kernel": kernel if kernel != "auto" else f"auto -> {chosen}",
                "ms": round(ms, 4),
                "vs_dense": round(dense_ms / ms, 3),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(DEFAULT_SHAPES), help="out x in, comma-separated")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (1 on a shared machine)")
    parser.add_argument("--json", default=None, help="also write every row to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    print(f"{'shape':>10} {'batch':>5} {'weight':>9} {'kernel':>26} {'ms':>9} {'x dense':>8}")
    rows = []
    for shape in args.shapes.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            for row in measure(shape, batch, dtype, args.group_size, args.rounds):
                rows.append(row)
                print(
                    f"{row['shape']:>10} {row['batch']:>5} {row['weight']:>9} {row['kernel']:>26} "
                    f"{row['ms']:>9.3f} {row['vs_dense']:>8.2f}"
                )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
