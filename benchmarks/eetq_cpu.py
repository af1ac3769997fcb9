"""Batch-1 decoding on the CPU: a bf16 Llama against the same model quantized by qcore-eetq (int8 weights).

    python benchmarks/eetq_cpu.py [--tokens 32] [--rounds 5] [--threads N]

Builds a synthetic ~240M-parameter Llama (random bf16 weights, fixed seed, cached under ``benchmarks/.cache/``; nothing
is downloaded), loads it twice with qcore (plain bf16, and ``{"quant_method": "eetq"}`` in bf16), and times greedy
decoding with the KV cache: a 16-token prompt, then ``--tokens`` single-token steps. The two models take turns,
``--rounds`` times, so a machine shared with other work slows both alike; the median round is reported, as wall
time and as process CPU time per token (CPU time counts only this process's work, so it is the steadier number on a
busy machine). Prints a table and writes ``benchmarks/results/eetq_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache" / "eetq-cpu-llama-240m"
RESULTS = HERE / "results" / "eetq_cpu.json"

#: ~240M parameters: 16 blocks of 11.1M (grouped-query attention, 4 KV heads) and two 32.8M embeddings.
LLAMA = dict(
    vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
    num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False,
)  # fmt: skip
PROMPT = 16


def build_checkpoint() -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    if not (CACHE / "config.json").is_file():
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**LLAMA)).to(torch.bfloat16).save_pretrained(CACHE)
    return CACHE


@torch.no_grad()
def decode(model, prompt: torch.Tensor, tokens: int) -> tuple[float, float, torch.Tensor]:
    """Greedy decoding; returns wall and CPU seconds per decoded token and the first step's logits."""
    out = model(prompt, use_cache=True)
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    first_logits = out.logits[:, -1].float()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(tokens):
        out = model(token, past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return wall / tokens, cpu / tokens, first_logits


def weight_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import qcore

    path = build_checkpoint()
    models = {
        "bf16": qcore.from_pretrained(path, dtype=torch.bfloat16),
        "eetq": qcore.from_pretrained(path, {"quant_method": "eetq"}, dtype=torch.bfloat16),
    }
    prompt = torch.randint(0, LLAMA["vocab_size"], (1, PROMPT), generator=torch.Generator().manual_seed(0))
    for model in models.values():  # warm up allocator and kernels
        decode(model, prompt, 4)

    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    first_logits = {}
    for _ in range(args.rounds):
        for name, model in models.items():
            wall, cpu, logits = decode(model, prompt, args.tokens)
            runs[name].append((wall, cpu))
            first_logits[name] = logits

    result = {
        "model": {**LLAMA, "parameters": sum(p.numel() for p in models["bf16"].parameters())},
        "torch": torch.__version__,
        "threads": args.threads,
        "tokens": args.tokens,
        "rounds": args.rounds,
        "kernel": models["eetq"].qcore_kernels.get("qcore-eetq"),
    }
    for name, model in models.items():
        result[name] = {
            "ms_per_token_wall": 1e3 * statistics.median(w for w, _ in runs[name]),
            "ms_per_token_cpu": 1e3 * statistics.median(c for _, c in runs[name]),
            "weight_mib": weight_bytes(model) / 2**20,
        }
    bf16, eetq = result["bf16"], result["eetq"]
    result["speedup_wall"] = bf16["ms_per_token_wall"] / eetq["ms_per_token_wall"]
    result["speedup_cpu"] = bf16["ms_per_token_cpu"] / eetq["ms_per_token_cpu"]
    # Random weights give nearly flat logits, so this shows the int8 error's size, not a model's quality.
    reference = first_logits["bf16"]
    result["first_step_logits_max_abs_diff_relative"] = float(
        (first_logits["eetq"] - reference).abs().max() / reference.abs().max()
    )

    print(f"{result['model']['parameters'] / 1e6:.0f}M-parameter Llama, batch 1, {args.tokens} decoded tokens, "
          f"{args.threads} threads, torch {torch.__version__}, median of {args.rounds} rounds")  # fmt: skip
    print(f"{'model':<6} {'ms/token (wall)':>16} {'ms/token (CPU)':>15} {'weights MiB':>12}")
    for name in models:
        row = result[name]
        print(
            f"{name:<6} {row['ms_per_token_wall']:>16.1f} {row['ms_per_token_cpu']:>15.1f} {row['weight_mib']:>12.0f}"
        )
    print(f"speedup: {result['speedup_wall']:.2f}x wall, {result['speedup_cpu']:.2f}x CPU; kernel: {result['kernel']}")
    print(f"first-step logits differ by {result['first_step_logits_max_abs_diff_relative']:.4f} of their largest")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
