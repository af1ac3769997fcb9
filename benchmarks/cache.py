"""Quantize once: a repeat on-the-fly load through qcore's cache against transformers' on-the-fly load.

Each load runs in a fresh process (``worker.py`` for transformers; a small loader below for qcore), in this order:

1. transformers, ``BitsAndBytesConfig`` nf4 on the fly (what every load costs without a cache);
2. qcore with ``cache=DIR`` on an empty cache: quantizes, then writes the cache entry (the first load);
3. qcore with ``cache=DIR`` again: the verified cached copy (the repeat load);
4. the same, once more.

It reports each load's wall time, the repeat load's ratio to transformers', and whether the repeat load's logits
equal the first load's.

    python benchmarks/checkpoints.py build large
    python benchmarks/cache.py --size large --json benchmarks/results/cache.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import checkpoints  # noqa: E402

NF4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
       "bnb_4bit_compute_dtype": "bfloat16"}  # fmt: skip

QCORE_LOAD = """
import hashlib, json, sys, time
started = time.perf_counter()
import torch, qcore
imported = time.perf_counter()
model = qcore.from_pretrained(sys.argv[1], json.loads(sys.argv[2]), cache=sys.argv[3])
loaded = time.perf_counter()
with torch.inference_mode():
    logits = model(torch.arange(1, 33)[None]).logits.float()
print(json.dumps({"import_s": imported - started, "load_s": loaded - imported,
                  "from_cache": getattr(model, "qcore_cache", None),
                  "logits_sha256": hashlib.sha256(logits.numpy().tobytes()).hexdigest()}))
"""


def run_json(command: list[str]) -> dict:
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="large", choices=[*checkpoints.SIZES, "quick"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    source = checkpoints.checkpoint_dir(args.size)
    if not checkpoints.is_complete(source):
        raise SystemExit(f"build it first: python benchmarks/checkpoints.py build {args.size}")
    cache = Path(tempfile.mkdtemp(prefix="qcore-cache-bench-"))
    try:
        transformers = run_json([sys.executable, str(HERE / "worker.py"), "--tool", "transformers", "--method",
                                 "bnb-nf4", "--path", str(source), "--load-only"])  # fmt: skip
        loads = [
            run_json([sys.executable, "-c", QCORE_LOAD, str(source), json.dumps(NF4), str(cache)]) for _ in range(3)
        ]
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    first, repeat = loads[0], loads[1:]
    result = {
        "model": checkpoints.describe(source),
        "transformers_on_the_fly_load_s": transformers["load_s"],
        "qcore_first_load_s": first["load_s"],
        "qcore_repeat_load_s": [load["load_s"] for load in repeat],
        "repeat_over_transformers": min(load["load_s"] for load in repeat) / transformers["load_s"],
        "repeat_logits_identical": all(load["logits_sha256"] == first["logits_sha256"] for load in repeat),
        "repeat_from_cache": all(load["from_cache"] for load in repeat),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
