"""What ``"compile": true`` costs and buys for a qcore-torchao model on the CPU: the first call's compile time, then
the time per forward, eager against compiled, for batch-1 decoding steps and a 64-token prompt.

    python benchmarks/torchao_compile.py [--quant-type int8_weight_only] [--calls 20] [--threads N]

Builds a synthetic Llama (random bf16 weights, fixed seed: 4 blocks, hidden 1024, intermediate 2816, vocab 32000,
~90M parameters; cached under ``benchmarks/.cache/``, nothing is downloaded), loads it twice with qcore-torchao in
bf16, once eager and once with ``"compile": true``, and times ``model(ids)`` without a KV cache (the same shapes every
call, so the compiled graph is reused): one token, then a 64-token prompt. The two models take turns call by call, so
a machine shared with other work slows both alike; medians are reported, with the largest logit difference between
the two. Prints a table and writes ``benchmarks/results/torchao_compile.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache" / "torchao-compile-llama-90m"
RESULTS = HERE / "results" / "torchao_compile.json"
LLAMA = dict(
    vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
    num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False,
)  # fmt: skip


def build_checkpoint() -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    if not (CACHE / "config.json").is_file():
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**LLAMA)).to(torch.bfloat16).save_pretrained(CACHE)
    return CACHE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quant-type", default="int8_weight_only")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import qcore

    path = build_checkpoint()
    config = {"quant_method": "torchao", "quant_type": args.quant_type}
    eager = qcore.from_pretrained(path, config, dtype=torch.bfloat16)
    compiled = qcore.from_pretrained(path, {**config, "compile": True}, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    rows = {}
    for label, length in (("1 token", 1), ("64-token prompt", 64)):
        ids = torch.randint(0, LLAMA["vocab_size"], (1, length), generator=generator)
        with torch.no_grad():
            start = time.perf_counter()
            first = compiled(ids, use_cache=False).logits
            compile_s = time.perf_counter() - start
            difference = float((first.float() - eager(ids, use_cache=False).logits.float()).abs().max())
            times = {"eager": [], "compiled": []}
            for _ in range(args.calls):
                for name, model in (("eager", eager), ("compiled", compiled)):
                    start = time.perf_counter()
                    model(ids, use_cache=False)
                    times[name].append(time.perf_counter() - start)
        eager_ms = 1000 * statistics.median(times["eager"])
        compiled_ms = 1000 * statistics.median(times["compiled"])
        rows[label] = {
            "first_call_s": round(compile_s, 2), "eager_ms": round(eager_ms, 2), "compiled_ms": round(compiled_ms, 2),
            "speedup": round(eager_ms / compiled_ms, 2), "max_abs_logit_difference": difference,
        }  # fmt: skip
    print(f"qcore-torchao {args.quant_type}, bf16, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'input':<18}{'first call (s)':>16}{'eager ms':>10}{'compiled ms':>13}{'speedup':>9}{'max |diff|':>12}")
    for label, row in rows.items():
        print(
            f"{label:<18}{row['first_call_s']:>16}{row['eager_ms']:>10}{row['compiled_ms']:>13}{row['speedup']:>9}"
            f"{row['max_abs_logit_difference']:>12.4g}"
        )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps({"quant_type": args.quant_type, "threads": torch.get_num_threads(), **rows}, indent=2)
    )


if __name__ == "__main__":
    main()
