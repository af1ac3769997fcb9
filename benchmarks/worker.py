"""One measurement in a fresh process: load a checkpoint with qcore or transformers, time it, run it, report.

    python benchmarks/worker.py --tool qcore --method bnb-nf4 --path CHECKPOINT [--logits FILE] [--profile FILE]

Prints one JSON line on stdout (the last line): import and load times, the RSS after imports and the peak RSS of
the process, the quantized footprint, forward latency, decode speed, and ``error`` when the load failed. ``run.py``
starts one worker per measurement so that no two loads share an allocator, a page of memory or a warm cache of
Python objects.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from methods import METHODS, REFERENCES  # noqa: E402

MIB = 2**20


def proc_status(*fields: str) -> dict[str, int]:
    """Fields of /proc/self/status in bytes. VmHWM is the kernel's high-water mark of this process's RSS since exec."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in fields:
                values[key] = int(rest.split()[0]) * 1024
    return values


class AnonymousPeak:
    """Samples RssAnon every few milliseconds: the peak of memory the process owns, without mapped file pages.

    VmHWM counts the pages of memory-mapped safetensors files a loader touches; this tells them apart.
    """

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak = proc_status("RssAnon")["RssAnon"]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> AnonymousPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, proc_status("RssAnon")["RssAnon"])

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, proc_status("RssAnon")["RssAnon"])


def load(tool: str, method: str, path: str, torch):
    """The load being measured, and nothing else."""
    if tool == "read":
        return read_checkpoint(path)
    if tool == "qcore":
        import qcore

        return qcore.from_pretrained(path, METHODS[method].qcore_config, dtype=torch.bfloat16)
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = REFERENCES[method]["quantization"]
    kwargs = {}
    if quantization is not None:
        kwargs["quantization_config"] = BitsAndBytesConfig(**_torch_dtypes(quantization, torch))
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cpu", **kwargs)


def read_checkpoint(path: str) -> None:
    """The floor under any loader: copy every tensor out of its memory-mapped shard once, then drop it."""
    from safetensors import safe_open

    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(file, framework="pt") as shard:
            for name in shard.keys():  # noqa: SIM118 (safe_open has no __iter__)
                shard.get_tensor(name).clone()


def _torch_dtypes(quantization: dict, torch) -> dict:
    return {k: getattr(torch, v) if k.endswith("_dtype") else v for k, v in quantization.items()}


def state_nbytes(model) -> int:
    """Bytes of every distinct tensor in the state dict: counts quantization metadata (bnb absmax, HQQ scales) that
    ``get_memory_footprint`` misses because it is not a parameter or buffer."""
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        if hasattr(tensor, "untyped_storage"):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def forward_latency(model, ids, repeats: int, torch) -> tuple[list[float], object]:
    with torch.inference_mode():
        logits = model(ids).logits  # warm-up: first-call allocations and kernel selection
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(ids)
            times.append(time.perf_counter() - start)
    return times, logits


def decode_speed(model, ids, new_tokens: int, torch) -> dict:
    """Greedy generation at batch 1 with the KV cache; tokens/s from per-step timestamps, so prefill is excluded."""
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps: list[float] = []

    class Timestamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    settings = {"do_sample": False, "use_cache": True, "pad_token_id": model.config.eos_token_id}
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **settings)  # warm-up
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       logits_processor=LogitsProcessorList([Timestamp()]), **settings)  # fmt: skip
        total = time.perf_counter() - start
    # stamps[0] follows the prefill; each later stamp follows one single-token decode step.
    steps = len(stamps) - 1
    return {
        "generate_s": total,
        "prefill_s": stamps[0] - start if stamps else None,
        "decode_tok_s": steps / (stamps[-1] - stamps[0]) if steps > 0 else None,
        "new_tokens": len(stamps),
    }


def anonymous_after_trim() -> int | None:
    """RssAnon once glibc has returned its free heap memory to the system (None off glibc).

    The difference to RssAnon before the trim is memory the load freed but the allocator kept: fragmentation, not
    live tensors.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "malloc_trim"):
        return None
    libc.malloc_trim(0)
    return proc_status("RssAnon")["RssAnon"]


def phase_timer():
    """Total seconds spent in each qcore hook, measured with pluggy's hook-call monitoring."""
    from qcore import plugins

    totals: dict[str, list] = {}
    starts: list[float] = []

    def before(hook_name, hook_impls, kwargs):
        starts.append(time.perf_counter())

    def after(outcome, hook_name, hook_impls, kwargs):
        entry = totals.setdefault(hook_name, [0.0, 0])
        entry[0] += time.perf_counter() - starts.pop()
        entry[1] += 1

    plugins.plugin_manager().add_hookcall_monitoring(before, after)
    return totals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tool",
        choices=("qcore", "transformers", "read"),
        required=True,
        help="read: only copy every tensor out of the checkpoint (the floor of any load)",
    )
    parser.add_argument("--method", required=True, help="a qcore method (methods.METHODS) or, for transformers, a "
                        "reference (methods.REFERENCES)")  # fmt: skip
    parser.add_argument("--path", required=True)
    parser.add_argument("--logits", help="save the forward pass's float32 logits here (safetensors)")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--forward-repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--load-only", action="store_true", help="skip forward and decode")
    parser.add_argument("--profile", help="run the load under cProfile and write the stats here")
    parser.add_argument("--phases", action="store_true", help="qcore only: report the seconds spent in each hook")
    args = parser.parse_args(argv)

    table = METHODS if args.tool == "qcore" else REFERENCES
    if args.tool != "read" and args.method not in table:
        parser.error(f"unknown {args.tool} method {args.method!r}; choose from {', '.join(table)}")
    library = None
    if args.tool == "qcore":
        library = METHODS[args.method].library
    elif args.tool == "transformers":
        library = REFERENCES[args.method]["library"]
    # Other work on the machine stalls torch's OpenMP threads at every barrier: keep the load beside each result.
    result: dict = {"tool": args.tool, "method": args.method, "path": args.path, "load_average": os.getloadavg()[0]}

    start = time.perf_counter()
    import torch
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: F401

    if args.tool == "qcore":
        import qcore.loading  # noqa: F401
    if library is not None:
        # Best effort: a backend may run without its library (qcore-eetq on CPU); the load reports a real need.
        try:
            importlib.import_module(library)
            result["library"] = library
        except ImportError:
            result["library"] = None
    if args.threads:
        torch.set_num_threads(args.threads)
    result["import_s"] = time.perf_counter() - start
    result["threads"] = torch.get_num_threads()
    status = proc_status("VmRSS", "RssAnon")
    result["rss_after_import"], result["anon_after_import"] = status["VmRSS"], status["RssAnon"]

    phases = phase_timer() if args.phases and args.tool == "qcore" else None
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
    try:
        with AnonymousPeak() as anonymous:
            start = time.perf_counter()
            if profiler is not None:
                profiler.enable()
            model = load(args.tool, args.method, args.path, torch)
            if profiler is not None:
                profiler.disable()
            result["load_s"] = time.perf_counter() - start
    except Exception as error:
        result["error"] = f"{type(error).__name__}: {' '.join(str(error).split())}"
        result["traceback"] = traceback.format_exc(limit=-6)
        print(json.dumps(result))
        return 1
    status = proc_status("VmHWM", "VmRSS", "RssAnon")
    if phases is not None:
        result["phases"] = {name: {"s": s, "calls": n} for name, (s, n) in phases.items()}
    result["peak_rss"] = status["VmHWM"]
    result["peak_anon"] = anonymous.peak
    result["rss_after_load"] = status["VmRSS"]
    result["anon_after_load"] = status["RssAnon"]
    if profiler is not None:
        profiler.dump_stats(args.profile)
    if model is None:  # --tool read
        print(json.dumps(result))
        return 0
    result["footprint"] = model.get_memory_footprint()
    result["state_nbytes"] = state_nbytes(model)
    result["anon_after_trim"] = anonymous_after_trim()

    if not args.load_only:
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(3, model.config.vocab_size, (1, args.prompt_tokens), generator=generator)
        times, logits = forward_latency(model, ids, args.forward_repeats, torch)
        result["forward_s"] = statistics.median(times)
        result.update(decode_speed(model, ids, args.new_tokens, torch))
        if args.logits:
            from safetensors.torch import save_file

            save_file({"logits": logits.float().contiguous()}, args.logits)
    result["peak_rss_end"] = proc_status("VmHWM")["VmHWM"]
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
