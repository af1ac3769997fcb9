"""Decode speed of bf16 and every installed 4-bit and 8-bit preset, side by side in one run, each beside its
memory-bandwidth roofline measured on the same machine.

    python benchmarks/decode.py                                  # 336M synthetic model, every 4/8-bit preset
    python benchmarks/decode.py --presets hqq-4bit,eetq-int8 --repeats 3 --threads 1

Each measurement is one fresh process (``--measure PRESET``), as in ``run.py``: it loads the model with
``qcore.from_pretrained(path, preset, dtype=bfloat16)``, then times

* **decode**: greedy generation at batch 1 with the KV cache (``worker.decode_speed``: tokens/s from per-step
  timestamps, prefill excluded);
* **prefill**: one forward pass over a batch of 32 prompts of 8 tokens (the median of 2), in tokens/s.

The roofline: a decode step must read every weight once (the model's state-dict bytes, the embedding table except
one row), so it cannot beat ``copy bandwidth / bytes per token``. The bandwidth is measured by its own process with
the same thread count (``dst.copy_(src)`` of 256 MiB, counted as bytes read + bytes written, the STREAM "copy"
convention). On a shared machine the load drifts between processes, so each process also loads the bf16 model and
alternates rounds of (bf16, preset) decode, prefill and copy bandwidth: every ratio to bf16 and every roofline
fraction in the table comes from measurements taken seconds apart (medians over the rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from checkpoints import build, checkpoint_dir, is_complete, model_config  # noqa: E402

MIB = 2**20
#: Presets a default run leaves out: they calibrate on sample data, minutes per load on a CPU.
CALIBRATING = ("gptq-4bit", "gptq-8bit", "ct-w4a16-gptq")


def default_presets() -> list[str]:
    """Every installed preset of 4 or 8 bits per weight (by name), calibrating ones excepted."""
    import qcore

    names = [preset for backend in qcore.backends() if backend.available for preset in backend.presets]
    return [n for n in names if any(bits in n for bits in ("4", "8")) and n not in CALIBRATING]


def checkpoint(size: str) -> Path:
    """The cached synthetic checkpoint of ``size``, built first when missing."""
    directory = checkpoint_dir(size)
    if not is_complete(directory):
        build(size, directory)
    return directory


def measure(
    preset: str,
    path: str,
    new_tokens: int,
    prefill_batch: int,
    prefill_tokens: int,
    threads: int | None,
    rounds: int = 3,
) -> dict:
    """One preset in this process: load it and the bf16 model, then ``rounds`` alternating rounds of (bf16, preset):
    decode at batch 1, prefill ``prefill_batch`` prompts, and the copy bandwidth; so each ratio to bf16 and each
    roofline fraction comes from measurements seconds apart, under the same load."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    import qcore
    from qcore.plugins import preset_config
    from worker import decode_speed, state_nbytes

    start = time.perf_counter()
    model = qcore.from_pretrained(path, None if preset == "bf16" else preset_config(preset), dtype=torch.bfloat16)
    load_s = time.perf_counter() - start
    reference = model if preset == "bf16" else qcore.from_pretrained(path, dtype=torch.bfloat16)
    embedding = model.get_input_embeddings().weight
    bytes_per_token = state_nbytes(model) - embedding.nbytes + embedding.shape[1] * embedding.element_size()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (1, 16), generator=generator)
    batch = torch.randint(3, model.config.vocab_size, (prefill_batch, prefill_tokens), generator=generator)

    def prefill(which) -> float:
        with torch.inference_mode():
            which(batch[:2])
            start = time.perf_counter()
            which(batch)
            return batch.numel() / (time.perf_counter() - start)

    measured: dict[str, list[float]] = {key: [] for key in ("decode", "prefill", "bf16_decode", "bf16_prefill", "bw")}
    for _ in range(rounds):
        measured["bw"].append(bandwidth(threads, repeats=3))
        if reference is not model:
            measured["bf16_decode"].append(decode_speed(reference, ids, new_tokens, torch)["decode_tok_s"])
            measured["bf16_prefill"].append(prefill(reference))
        measured["decode"].append(decode_speed(model, ids, new_tokens, torch)["decode_tok_s"])
        measured["prefill"].append(prefill(model))
        if reference is model:
            measured["bf16_decode"].append(measured["decode"][-1])
            measured["bf16_prefill"].append(measured["prefill"][-1])
    median = statistics.median
    return {
        "preset": preset,
        "load_s": load_s,
        "decode_tok_s": median(measured["decode"]),
        "prefill_tok_s": median(measured["prefill"]),
        "bf16_decode_tok_s": median(measured["bf16_decode"]),
        "bf16_prefill_tok_s": median(measured["bf16_prefill"]),
        # Per-round ratios, then their median: each pair ran back to back.
        "decode_x_bf16": median(q / b for q, b in zip(measured["decode"], measured["bf16_decode"], strict=True)),
        "prefill_x_bf16": median(q / b for q, b in zip(measured["prefill"], measured["bf16_prefill"], strict=True)),
        "bandwidth": median(measured["bw"]),
        "rounds": measured,
        "bytes_per_token": bytes_per_token,
        "kernels": getattr(model, "qcore_kernels", {}),
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0],
    }


def bandwidth(threads: int | None, nbytes: int = 256 * MIB, repeats: int = 10) -> float:
    """Copy bandwidth in bytes/s (read + write), the median of ``repeats`` copies."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    source = torch.ones(nbytes // 4)
    target = torch.empty_like(source)
    target.copy_(source)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        target.copy_(source)
        times.append(time.perf_counter() - start)
    return 2 * nbytes / statistics.median(times)


def child(arguments: list[str]) -> dict:
    result = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), *arguments], capture_output=True, text=True, check=False
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode or not lines:
        return {"error": (result.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(lines[-1])


def table(rows: dict[str, list[dict]], bandwidths: list[float]) -> str:
    lines = [
        f"copy bandwidth, separate processes before and after: {', '.join(f'{b / 1e9:.2f}' for b in bandwidths)} GB/s",
        "",
        "| preset | kernel | MiB read/token | decode tok/s | bf16 beside it | × bf16 | roofline tok/s | of roofline | "
        "prefill b32 tok/s | × bf16 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    ok = {name: [r for r in runs if "error" not in r] for name, runs in rows.items()}
    median = statistics.median
    for name, runs in ok.items():
        if not runs:
            lines.append(f"| {name} | failed: {rows[name][0]['error']} | | | | | | | | |")
            continue
        decode = median(r["decode_tok_s"] for r in runs)
        read = runs[0]["bytes_per_token"]
        roofline = median(r["bandwidth"] for r in runs) / read
        kernel = "; ".join(runs[0]["kernels"].values()) or "torch bf16 matmul"
        lines.append(
            f"| {name} | {kernel} | {read / MIB:.0f} | {decode:.1f} | "
            f"{median(r['bf16_decode_tok_s'] for r in runs):.1f} | {median(r['decode_x_bf16'] for r in runs):.2f} | "
            f"{roofline:.0f} | {decode / roofline:.0%} | {median(r['prefill_tok_s'] for r in runs):.0f} | "
            f"{median(r['prefill_x_bf16'] for r in runs):.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="medium", help="synthetic checkpoint (benchmarks/checkpoints.py)")
    parser.add_argument("--presets", help="comma-separated; default: every installed 4/8-bit preset")
    parser.add_argument("--repeats", type=int, default=1, help="fresh processes per preset")
    parser.add_argument("--rounds", type=int, default=3, help="alternating bf16/preset rounds in each process")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--prefill-batch", type=int, default=32)
    parser.add_argument("--prefill-tokens", type=int, default=8, help="tokens per prompt in the prefill batch")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in every process (1 on a busy machine)")
    parser.add_argument("--out", default=str(HERE / "results" / "decode.json"))
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--bandwidth", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.bandwidth:
        print(json.dumps({"bandwidth": bandwidth(args.threads)}))
        return 0
    if args.measure:
        result = measure(
            args.measure,
            args.path,
            args.new_tokens,
            args.prefill_batch,
            args.prefill_tokens,
            args.threads,
            args.rounds,
        )
        print(json.dumps(result))
        return 0

    model_config(args.size)  # an unknown size fails here, before anything is built
    path = str(checkpoint(args.size))
    presets = args.presets.split(",") if args.presets else default_presets()
    common = ["--threads", str(args.threads), "--new-tokens", str(args.new_tokens), "--rounds", str(args.rounds)]
    common += ["--prefill-batch", str(args.prefill_batch), "--prefill-tokens", str(args.prefill_tokens)]
    rows: dict[str, list[dict]] = {"bf16": [], **{p: [] for p in presets}}
    bandwidths = [child(["--bandwidth", *common])["bandwidth"]]
    for repeat in range(args.repeats):
        order = presets[repeat % len(presets) :] + presets[: repeat % len(presets)]
        for preset in ["bf16", *order]:
            result = child(["--measure", preset, "--path", path, *common])
            rows[preset].append(result)
            print(preset, json.dumps(result), flush=True)
    bandwidths.append(child(["--bandwidth", *common])["bandwidth"])
    report = table(rows, bandwidths)
    command = "python benchmarks/decode.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"\n{command}\n\n{report}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"command": command, "rows": rows, "bandwidths": bandwidths}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
