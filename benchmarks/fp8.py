"""FP8 on CPU: the speed of each kernel qcore-fp8 can run against the bfloat16 layer, and footprint and error of a
real model.

Kernels, per layer shape and batch (median of ``--rounds`` timed calls after a warm-up, one thread):

* ``bf16``: the full-precision ``F.linear`` the quantized layer replaces;
* ``dequantize`` (block 128x128 and per tensor): qcore's fallback, the weight rebuilt in bfloat16 each call;
* ``scaled_mm`` (per tensor): ``torch._scaled_mm`` on CPU, activations quantized to e4m3 per row.

Then SmolLM2-135M-Instruct (``real_model.py``) loaded in bfloat16 and with each preset: bytes held, the largest
logit difference from bfloat16 on a fixed prompt, and perplexity on the held-out corpus.

    python benchmarks/fp8.py --json benchmarks/results/fp8.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def time_call(function, rounds: int) -> float:
    function()
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        function()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def kernels(shapes, batches, rounds):
    import torch
    import torch.nn.functional as F
    from qcore.kernels import Fp8Weight
    from qcore_fp8.layers import quantize

    rows = []
    for out_features, in_features in shapes:
        weight = torch.randn(out_features, in_features, dtype=torch.bfloat16) * 0.02
        block_codes, block_scale = quantize(weight, (128, 128))
        tensor_codes, tensor_scale = quantize(weight, None)
        variants = {"dequantize, block 128": Fp8Weight.from_codes(block_codes, block_scale, (128, 128))}
        per_tensor = Fp8Weight.from_codes(tensor_codes, tensor_scale)
        variants["dequantize, per tensor"] = per_tensor
        scaled = Fp8Weight.from_codes(tensor_codes.clone(), tensor_scale.clone())
        for packed in variants.values():
            packed.select("cpu", torch.bfloat16, kernel="dequantize")
        scaled.select("cpu", torch.bfloat16, kernel="scaled_mm")
        variants["scaled_mm, per tensor"] = scaled
        for batch in batches:
            x = torch.randn(batch, in_features, dtype=torch.bfloat16)
            with torch.inference_mode():
                dense = time_call(lambda x=x, weight=weight: F.linear(x, weight), rounds)
                row = {"shape": f"{out_features}x{in_features}", "batch": batch, "bf16_ms": dense * 1e3}
                for name, packed in variants.items():
                    row[name] = time_call(lambda p=packed, x=x: p.matmul(x), rounds) * 1e3
            rows.append(row)
    return rows


def model_rows(tokens: int):
    import qcore
    import real_model
    import torch
    from qcore.cli.output import held_nbytes
    from qcore.corpus import evaluation_texts
    from qcore.evaluate import encode_texts, perplexity
    from transformers import AutoTokenizer

    source = real_model.checkpoint("bfloat16")
    tokenizer = AutoTokenizer.from_pretrained(source)
    held_out = encode_texts(tokenizer, evaluation_texts(), max_tokens=tokens)
    prompt = held_out[:, :64]
    results = {}
    reference = None
    for name, config in (
        ("bf16", None),
        ("fp8-block128", {"quant_method": "fp8", "weight_block_size": [128, 128]}),
        ("fp8-tensor", {"quant_method": "fp8", "weight_block_size": None}),
    ):
        model = qcore.from_pretrained(source, config, dtype=torch.bfloat16)
        with torch.inference_mode():
            out = model(prompt).logits.float()
        reference = out if reference is None else reference
        results[name] = {
            "nbytes": held_nbytes(model),
            "max_abs_logit_diff": float((out - reference).abs().max()),
            "perplexity": perplexity(model, input_ids=held_out).perplexity,
            "kernel": getattr(model, "qcore_kernels", {}),
        }
        del model
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="2048x2048,5632x2048")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=2048, help="held-out tokens for perplexity (0: skip the model)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.shapes.split(",")]
    result = {"kernels": kernels(shapes, [int(b) for b in args.batches.split(",")], args.rounds)}
    for row in result["kernels"]:
        print(", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    if args.tokens:
        torch.set_num_threads(2)
        result["model"] = model_rows(args.tokens)
        for name, row in result["model"].items():
            print(name, row)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
