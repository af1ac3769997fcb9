"""GPTQ on a real model: qcore-gptq's quantizing load against round-to-nearest, and what the GPTQ checkpoint costs.

On SmolLM2-135M-Instruct (``real_model.py``; learned weights, bfloat16): GPTQ 4-bit, groups of 64 (its 576-wide
layers take no groups of 128), calibrated on the calibration part of qcore's built-in corpus (token ids cut into
``--sequences`` x ``--tokens``), one decoder block at a time; round-to-nearest (RTN) on the same grids (the same
code with an identity Hessian, so no error is compensated); full precision. Each is scored by sliding-window
perplexity on the held-out part of the corpus, which calibration never sees. Each step runs in a fresh process, so
its peak RSS is its own:

* ``quantize``: time and peak RSS of the quantizing load, against the bound "quantized model + one decoder block in
  full precision + calibration activations" (every number above the process's baseline with torch, transformers
  and qcore imported); the model is saved as a GPTQ checkpoint.
* ``evaluate``: load time of the saved checkpoint, perplexity of the three models, decode speed (greedy, batch 1,
  ``--new-tokens`` tokens after a warm-up) of full precision and GPTQ.

    python benchmarks/gptq.py --sequences 32 --tokens 512 --eval-tokens 4096 --json benchmarks/results/gptq.json

``--model large`` runs the ``quantize`` step alone on the 0.85B synthetic Llama (``checkpoints.py``; random weights,
so no perplexity: it measures time and memory against the bound, with random token ids as calibration data):

    python benchmarks/gptq.py --model large --sequences 4 --tokens 128 --json benchmarks/results/gptq-large.json

Prints one JSON object (and writes it to ``--json``).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import real_model  # noqa: E402

CONFIG = {"quant_method": "gptq", "bits": 4, "group_size": 64, "sym": True}
OUT = real_model.CACHE / "smollm2-135m-gptq-4bit-g64"


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class _Sampler(threading.Thread):
    """Samples the process's anonymous and file-backed resident memory (``/proc/self/status``) every 20 ms: the
    file-backed part is the memory-mapped checkpoint, which the kernel may drop at any time; the anonymous part is
    what the load itself holds."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self.running = True

    def run(self) -> None:
        while self.running:
            for line in Path("/proc/self/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in self.peak:
                    self.peak[key] = max(self.peak[key], int(value.split()[0]) * 1024)
            time.sleep(0.02)


def _status(key: str) -> int:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(key + ":"))
    return int(line.split()[1]) * 1024


def _nbytes(module) -> int:
    seen, total = set(), 0
    for tensor in (*module.parameters(), *module.buffers(), *module.state_dict().values()):
        key = (tensor.data_ptr(), tensor.numel() * tensor.element_size())
        if tensor.device.type != "meta" and key not in seen:
            seen.add(key)
            total += key[1]
    return total


def _calibration(tokenizer, sequences: int, tokens: int):
    from qcore.corpus import calibration_texts

    ids = tokenizer("\n\n".join(calibration_texts()), return_tensors="pt", add_special_tokens=False).input_ids[0]
    return ids[: sequences * tokens].reshape(sequences, tokens)


def _source(args):
    if args.model == "large":
        from checkpoints import build, checkpoint_dir, is_complete

        directory = checkpoint_dir("large")
        if not is_complete(directory):
            build("large", directory)
        return directory
    return real_model.checkpoint("bfloat16")


def quantize(args) -> dict:
    import qcore
    import torch
    import transformers  # noqa: F401  (imported before the baseline, as the load needs it)
    from transformers import AutoConfig, AutoTokenizer

    source = _source(args)
    if args.model == "large":
        vocab = AutoConfig.from_pretrained(source).vocab_size
        generator = torch.Generator().manual_seed(0)
        calibration = torch.randint(0, vocab, (args.sequences, args.tokens), generator=generator)
    else:
        calibration = _calibration(AutoTokenizer.from_pretrained(source), args.sequences, args.tokens)
    # A tiny model through the same path first, so the baseline includes every module the load imports.
    from qcore.testing import build

    tiny = build("llama", OUT.parent / "tiny-llama", dtype=torch.bfloat16)
    qcore.from_pretrained(tiny, {**CONFIG, "group_size": 32}, calibration=calibration[:1, :32] % 256)
    baseline = _peak_rss()
    sampler = _Sampler()
    sampler.peak["RssAnon"] = _status("RssAnon")
    baseline_anon = sampler.peak["RssAnon"]
    sampler.start()
    started = time.perf_counter()
    model = qcore.from_pretrained(source, CONFIG, dtype=torch.bfloat16, calibration=calibration)
    seconds = time.perf_counter() - started
    sampler.running = False
    peak = _peak_rss()
    hidden = model.config.hidden_size
    full = qcore.from_pretrained(source, dtype=torch.bfloat16)
    block = _nbytes(full.model.layers[0])
    # Activations the core keeps: the block's inputs and outputs per sequence, plus one block forward's temporaries
    # (the MLP's two intermediate activations and the attention scores of one sequence).
    activations = 2 * args.sequences * args.tokens * hidden * 2
    temporaries = args.tokens * (
        3 * model.config.intermediate_size * 2 + model.config.num_attention_heads * args.tokens * 4
    )
    quantized = _nbytes(model)
    del full
    if args.model != "large":
        qcore.save_pretrained(model, OUT, overwrite=True)
    return {
        "model": str(args.model),
        "quantize_seconds": round(seconds, 1),
        "calibration": f"{args.sequences} x {args.tokens} tokens",
        "peak_rss_over_baseline_mib": round((peak - baseline) / 2**20, 1),
        "peak_anonymous_rss_over_baseline_mib": round((sampler.peak["RssAnon"] - baseline_anon) / 2**20, 1),
        "peak_file_backed_rss_mib": round(sampler.peak["RssFile"] / 2**20, 1),
        "bound_mib": round((quantized + block + activations + temporaries) / 2**20, 1),
        "quantized_model_mib": round(quantized / 2**20, 1),
        "one_block_fp_mib": round(block / 2**20, 1),
        "activations_mib": round((activations + temporaries) / 2**20, 1),
        "full_precision_model_mib": round(_nbytes(qcore.from_pretrained(source, dtype=torch.bfloat16)) / 2**20, 1),
        "blocks": model.config.num_hidden_layers,
    }


def evaluate(args) -> dict:
    import qcore
    import torch
    from qcore.corpus import evaluation_texts
    from qcore.evaluate import encode_texts, perplexity
    from qcore_gptq.gptq import quantize_layer
    from transformers import AutoTokenizer

    source = real_model.checkpoint("bfloat16")
    tokenizer = AutoTokenizer.from_pretrained(source)
    held_out = encode_texts(tokenizer, evaluation_texts(), max_tokens=args.eval_tokens)
    started = time.perf_counter()
    gptq = qcore.from_pretrained(OUT, dtype=torch.bfloat16)
    load_seconds = time.perf_counter() - started
    full = qcore.from_pretrained(source, dtype=torch.bfloat16)
    rtn = qcore.from_pretrained(source, dtype=torch.bfloat16)
    for name, module in rtn.named_modules():
        if isinstance(module, torch.nn.Linear) and name in gptq.qcore_applied:
            decoded = quantize_layer(
                module.weight, torch.eye(module.in_features), bits=4, group_size=64, sym=True, desc_act=False,
                damp_percent=0.1,
            )  # fmt: skip
            groups = decoded.g_idx.long()
            weight = (decoded.codes.float() - decoded.zero.float()[:, groups]) * decoded.scale.float()[:, groups]
            module.weight.data = weight.to(torch.bfloat16)
    result = {
        "gptq_load_seconds": round(load_seconds, 2),
        "kernel": gptq.qcore_kernels["qcore-gptq"],
        "held_out_tokens": int(held_out.shape[1]),
    }
    for label, model in (("full precision", full), ("rtn", rtn), ("gptq", gptq)):
        result[f"perplexity {label}"] = round(perplexity(model, input_ids=held_out).perplexity, 3)
    prompt = held_out[:, :16]
    for label, model in (("full precision", full), ("gptq", gptq)):
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=4, do_sample=False)
            started = time.perf_counter()
            model.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
        result[f"decode ms/token {label}"] = round(1000 * (time.perf_counter() - started) / args.new_tokens, 1)
        result[f"weights MiB {label}"] = round(_nbytes(model) / 2**20, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: see benchmarks/README.md)")
    parser.add_argument("--model", choices=("smollm2", "large"), default="smollm2")
    parser.add_argument("--step", choices=("quantize", "evaluate"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.step:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps((quantize if args.step == "quantize" else evaluate)(args)))
        return
    result = {}
    for step in ("quantize",) if args.model == "large" else ("quantize", "evaluate"):
        command = [sys.executable, __file__, "--step", step, *sys.argv[1:]]
        lines = subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()
        result.update(json.loads(lines[-1]))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
