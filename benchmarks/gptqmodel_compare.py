"""qcore-gptq against gptqmodel: GPTQ quality from the same calibration data, and loading a GPTQ checkpoint on CPU.

gptqmodel is not a dependency of this repository (7.7 needs a newer torch than the one pinned here; 7.6 installs
from source beside torch 2.13), so it runs in a virtual environment of its own that also holds ``qcore`` (for the
built-in corpus and the perplexity function, so both sides are scored by the same code):

    python -m venv /tmp/gptqmodel && /tmp/gptqmodel/bin/pip install torch==2.13.0 gptqmodel==7.6.0 optimum ./core
    python benchmarks/gptq.py --sequences 8 --tokens 512     # qcore-gptq's checkpoint, if not built yet
    python benchmarks/gptqmodel_compare.py --gptqmodel-python /tmp/gptqmodel/bin/python --json \\
        benchmarks/results/gptqmodel.json

Steps, each in a fresh process with one torch thread:

* ``quantize`` (gptqmodel's venv): ``GPTQModel.load(SmolLM2 bf16, GPTQConfig(...))`` then ``quantize`` on the token
  ids ``gptq.py`` calibrates qcore-gptq with (the same sequences), with the settings qcore-gptq uses (4-bit, groups
  of 64, symmetric, no act-order, damping 0.1, no group-aware reordering), then ``save``;
* ``transformers`` (gptqmodel's venv): ``AutoModelForCausalLM.from_pretrained`` of gptqmodel's checkpoint (the
  transformers + gptqmodel path a CPU user has today): load time, peak RSS, perplexity, decode;
* ``qcore-gptqmodel`` and ``qcore-own`` (this venv): ``qcore.from_pretrained`` of gptqmodel's checkpoint and of
  qcore-gptq's: the same figures.

Every load step imports the model code and its quantization libraries before taking its baseline, so the load
time and peak are the load's own.

Perplexity: sliding window on the held-out part of qcore's corpus (``qcore.evaluate.perplexity``), which neither
calibration sees.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import real_model  # noqa: E402

GPTQMODEL_OUT = real_model.CACHE / "smollm2-135m-gptqmodel-4bit-g64"
QCORE_OUT = real_model.CACHE / "smollm2-135m-gptq-4bit-g64"  # written by gptq.py


def _peak_rss_mib() -> float:  # the quantize step's figure (gptqmodel's own process)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _calibration(tokenizer, sequences: int, tokens: int):
    from qcore.corpus import calibration_texts

    ids = tokenizer("\n\n".join(calibration_texts()), return_tensors="pt", add_special_tokens=False).input_ids[0]
    return ids[: sequences * tokens].reshape(sequences, tokens)


def quantize(args) -> dict:
    import torch
    from gptqmodel import GPTQConfig, GPTQModel
    from transformers import AutoTokenizer

    source = real_model.checkpoint("bfloat16")
    tokenizer = AutoTokenizer.from_pretrained(source)
    calibration = _calibration(tokenizer, args.sequences, args.tokens)
    rows = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in calibration]
    config = GPTQConfig(
        bits=4, group_size=64, sym=True, desc_act=False, damp_percent=0.1, act_group_aware=False,
        true_sequential=True,
    )  # fmt: skip
    baseline = _peak_rss_mib()
    started = time.perf_counter()
    model = GPTQModel.load(str(source), config, dtype=torch.bfloat16, device="cpu")
    model.quantize(rows, batch_size=1, calibration_sort=None)
    seconds = time.perf_counter() - started
    peak = _peak_rss_mib()
    model.save(str(GPTQMODEL_OUT))
    tokenizer.save_pretrained(GPTQMODEL_OUT)
    import gptqmodel

    return {
        "gptqmodel_version": gptqmodel.__version__,
        "gptqmodel quantize seconds": round(seconds, 1),
        "gptqmodel quantize peak RSS over baseline MiB": round(peak - baseline, 1),
    }


def _score(model, label: str, args) -> dict:
    import torch
    from qcore.corpus import evaluation_texts
    from qcore.evaluate import encode_texts, perplexity
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(real_model.checkpoint("bfloat16"))
    held_out = encode_texts(tokenizer, evaluation_texts(), max_tokens=args.eval_tokens)
    result = {f"perplexity {label}": round(perplexity(model, input_ids=held_out).perplexity, 3)}
    prompt = held_out[:, :16]
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=4, do_sample=False)
        started = time.perf_counter()
        model.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    result[f"decode ms/token {label}"] = round(1000 * (time.perf_counter() - started) / args.new_tokens, 1)
    linear = next(m for n, m in model.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
    result[f"q_proj module {label}"] = type(linear).__module__ + "." + type(linear).__qualname__
    return result


def _import_before_baseline() -> None:
    """Import what a load pulls in (the model code, the quantization libraries), so load time and peak RSS are the
    load's own on both sides, not the first import's."""
    import transformers.models.llama.modeling_llama  # noqa: F401

    try:
        import gptqmodel  # noqa: F401
        import optimum  # noqa: F401
    except ImportError:  # qcore's side
        import qcore_gptq.layers  # noqa: F401


def _load(label: str, load, args) -> dict:
    """Load time and peak resident memory above the baseline, anonymous (what the load holds) and file-backed (the
    memory-mapped checkpoint, which the kernel may drop) apart: a load that keeps lazily mapped tensors touches few
    file pages until the first forward, so ``ru_maxrss`` alone would compare unlike things."""
    from gptq import _Sampler, _status

    _import_before_baseline()
    sampler = _Sampler()
    baseline = sampler.peak["RssAnon"] = _status("RssAnon")
    sampler.start()
    started = time.perf_counter()
    model = load()
    seconds = time.perf_counter() - started
    time.sleep(0.05)
    sampler.running = False
    result = {
        f"load seconds {label}": round(seconds, 2),
        f"load peak anonymous RSS over baseline MiB {label}": round((sampler.peak["RssAnon"] - baseline) / 2**20, 1),
        f"load peak file-backed RSS MiB {label}": round(sampler.peak["RssFile"] / 2**20, 1),
    }
    result.update(_score(model, label, args))
    return result


def load_transformers(args) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    def load():
        return AutoModelForCausalLM.from_pretrained(GPTQMODEL_OUT, dtype=torch.bfloat16, device_map="cpu")

    result = {"transformers_version": transformers.__version__}
    result.update(_load("transformers+gptqmodel (gptqmodel's checkpoint)", load, args))
    return result


def _load_qcore(label: str, path: Path, args) -> dict:
    import qcore
    import torch

    return _load(label, lambda: qcore.from_pretrained(path, dtype=torch.bfloat16), args)


def load_qcore_gptqmodel(args) -> dict:
    return _load_qcore("qcore (gptqmodel's checkpoint)", GPTQMODEL_OUT, args)


def load_qcore_own(args) -> dict:
    if not QCORE_OUT.exists():
        return {"qcore (qcore-gptq's checkpoint)": "missing: run benchmarks/gptq.py first"}
    return _load_qcore("qcore (qcore-gptq's checkpoint)", QCORE_OUT, args)


STEPS = {
    "quantize": quantize, "transformers": load_transformers, "qcore-gptqmodel": load_qcore_gptqmodel,
    "qcore-own": load_qcore_own,
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gptqmodel-python", help="python of a venv with gptqmodel, transformers and qcore")
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--skip-quantize", action="store_true", help="reuse gptqmodel's saved checkpoint")
    parser.add_argument("--step", choices=sorted(STEPS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.step:
        import torch

        torch.set_num_threads(1)
        print(json.dumps(STEPS[args.step](args)))
        return
    if not args.gptqmodel_python:
        parser.error("--gptqmodel-python is required")
    passed = [a for a in sys.argv[1:] if a != "--skip-quantize"]
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2", "CUDA_VISIBLE_DEVICES": ""}
    # A rerun that skips quantizing keeps the quantize step's figures from the last run.
    result = json.loads(args.json.read_text()) if args.skip_quantize and args.json and args.json.exists() else {}
    steps = [
        ("transformers", args.gptqmodel_python), ("qcore-gptqmodel", sys.executable), ("qcore-own", sys.executable),
    ]  # fmt: skip
    if not args.skip_quantize:
        steps.insert(0, ("quantize", args.gptqmodel_python))
    for step, python in steps:
        command = [python, __file__, "--step", step, *passed]
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode:
            sys.stderr.write(done.stderr[-4000:])
            raise SystemExit(f"step {step} failed ({done.returncode})")
        result.update(json.loads(done.stdout.splitlines()[-1]))
        print(json.dumps(result, indent=2), flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
