"""qcore vs transformers: load time, memory, footprint, speed and parity on synthetic Llama checkpoints.

    python benchmarks/run.py                                   # everything: 3 sizes, all methods, 3 repeats
    python benchmarks/run.py --sizes small --methods bnb-nf4 --repeats 1
    python benchmarks/run.py --quick                           # smoke run on a tiny model, about a minute
    python benchmarks/run.py --profile --sizes small           # where the nf4 load spends its time

Every measurement runs in a fresh ``worker.py`` process, one after another (never two at once, so they do not
compete for cores or memory). Medians over ``--repeats`` go into a table with qcore/transformers ratios and a
PASS/FAIL per target, and into ``benchmarks/results/latest.json``. See benchmarks/README.md for what each column
means. This process imports neither torch nor transformers: checkpoints are built by subprocesses too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import checkpoints  # noqa: E402
import report  # noqa: E402
from methods import METHODS, PREQUANTIZED_FROM  # noqa: E402

DEFAULT_OUT = HERE / "results" / "latest.json"

#: Quiet, offline workers: no progress bars (transformers draws one while loading; it costs time and clutters logs).
WORKER_ENV = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
              "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = report.console()
    started = time.time()
    sizes = args.sizes
    methods = args.methods

    busy = os.getloadavg()[0]
    if busy > 0.5 * (os.cpu_count() or 1) and not args.threads:
        console.print(
            f"[yellow]warning:[/] load average {busy:.1f} on {os.cpu_count()} CPUs: other work will stall "
            f"torch's threads and skew every time; use an idle machine, or --threads 1 to limit the damage"
        )
    infos = {size: prepare_checkpoint(size, args, console) for size in sizes}
    if args.profile:
        return profile(sizes[0], infos[sizes[0]], args, console)

    prequantized = {}
    if "prequant-nf4" in methods:
        for size in sizes:
            prequantized[size] = prepare_prequantized(size, args, console)

    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="qcore-bench-") as scratch:
        logits: dict[tuple[str, str, str], Path] = {}
        for size in sizes:
            jobs = plan_jobs(methods, infos[size], prequantized.get(size))
            for repeat in range(args.repeats):
                # Alternate the order so neither tool always runs first (on a warmer or cooler machine).
                for tool, name, path in jobs if repeat % 2 == 0 else reversed(jobs):
                    logits_file = None
                    if repeat == 0:
                        logits_file = Path(scratch) / f"{size}-{tool}-{name}.safetensors"
                        logits[(size, tool, name)] = logits_file
                    record = run_worker(tool, name, path, args, logits_file)
                    record.update(size=size, repeat=repeat)
                    runs.append(record)
                    console.print(report.progress_line(record))
        differences = logits_differences(logits, methods, sizes)

    cli = {} if args.no_cli else time_cli(args.cli_repeats, console)
    results = report.summarize(runs, infos, prequantized, differences, cli, methods, sizes)
    results["meta"] = machine_facts(args, started)
    report.print_all(results, console)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    console.print(f"\nwritten: {args.out}")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--sizes", default="small,medium,large", help="comma-separated: small, medium, large")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from: {', '.join(METHODS)}")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; the table shows medians")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the JSON results go")
    parser.add_argument("--quick", action="store_true", help="smoke run: a tiny model, 1 repeat, short generation")
    parser.add_argument("--profile", action="store_true",
                        help="profile one load (first of --sizes) instead of benchmarking")  # fmt: skip
    parser.add_argument("--profile-method", default="bnb-nf4", choices=[m for m in METHODS if m != "prequant-nf4"])
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--forward-repeats", type=int, default=5)
    parser.add_argument("--cli-repeats", type=int, default=5)
    parser.add_argument("--no-cli", action="store_true", help="skip timing `qcore backends` against `import torch`")
    parser.add_argument("--threads", type=int, help="torch threads in every worker (default: torch's choice)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds before a worker is killed")
    parser.add_argument("--rebuild", action="store_true", help="rebuild cached checkpoints")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats, args.new_tokens, args.forward_repeats, args.cli_repeats = "quick", 1, 8, 2, 2
    args.sizes = _choices(parser, "--sizes", args.sizes, [*checkpoints.SIZES, "quick"])
    args.methods = _choices(parser, "--methods", args.methods, list(METHODS))
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def _choices(parser: argparse.ArgumentParser, option: str, value: str, allowed: list[str]) -> list[str]:
    chosen = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in allowed]
    if unknown or not chosen:
        parser.error(f"{option}: unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(allowed)}")
    return chosen


# -- checkpoints ---------------------------------------------------------------------------------------------------


def prepare_checkpoint(size: str, args: argparse.Namespace, console) -> dict:
    directory = checkpoints.checkpoint_dir(size)
    if args.rebuild or not checkpoints.is_complete(directory):
        console.print(f"building the {size} checkpoint in {directory} ...")
        rebuild = ["--rebuild"] if args.rebuild else []
        _subprocess([sys.executable, str(HERE / "checkpoints.py"), "build", size, *rebuild])
    info = checkpoints.describe(directory)
    console.print(f"{size}: {info['params'] / 1e6:.1f}M parameters, {info['nbytes'] / 2**20:.0f} MiB bf16 in "
                  f"{info['shards']} shards ({directory.name})")  # fmt: skip
    _warm_page_cache(directory)
    return info


def prepare_prequantized(size: str, args: argparse.Namespace, console) -> dict:
    """The qcore-saved nf4 copy of ``size``; ``{"error": ...}`` when it cannot be made."""
    directory = checkpoints.prequantized_dir(size, PREQUANTIZED_FROM)
    if args.rebuild or not checkpoints.is_complete(directory):
        console.print(f"saving the {PREQUANTIZED_FROM} copy of {size} with qcore.save_pretrained ...")
        command = [sys.executable, str(HERE / "checkpoints.py"), "prequantize", size, PREQUANTIZED_FROM]
        done = subprocess.run([*command, *(["--rebuild"] if args.rebuild else [])], capture_output=True, text=True,
                              env={**os.environ, **WORKER_ENV})  # fmt: skip
        if done.returncode != 0:
            error = _last_error_line(done.stderr)
            console.print(f"[red]cannot build the pre-quantized checkpoint:[/] {error}")
            return {"error": error}
    _warm_page_cache(directory)
    return checkpoints.describe(directory)


def _warm_page_cache(directory: Path) -> None:
    """Read every file once so that no measurement pays for the first read from disk (all of them read from cache)."""
    for file in directory.iterdir():
        with open(file, "rb") as handle:
            while handle.read(1 << 24):
                pass


# -- measurements ------------------------------------------------------------------------------------------------


def plan_jobs(methods: list[str], info: dict, prequantized: dict | None) -> list[tuple[str, str, str]]:
    """(tool, method or reference, checkpoint path) for one size: every qcore method, each reference once."""
    jobs: list[tuple[str, str, str]] = []
    for name in methods:
        method = METHODS[name]
        if method.pre_quantized:
            if prequantized is None or "error" in prequantized:
                continue
            path = prequantized["path"]
        else:
            path = info["path"]
        jobs.append(("qcore", name, path))
        if ("transformers", method.reference, path) not in jobs:
            jobs.append(("transformers", method.reference, path))
    return jobs


def run_worker(tool: str, name: str, path: str, args: argparse.Namespace, logits: Path | None,
               extra: tuple[str, ...] = ()) -> dict:  # fmt: skip
    command = [sys.executable, str(HERE / "worker.py"), "--tool", tool, "--method", name, "--path", path,
               "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
               "--forward-repeats", str(args.forward_repeats), *extra]  # fmt: skip
    if logits is not None:
        command += ["--logits", str(logits)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout,
                              env={**os.environ, **WORKER_ENV})  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"tool": tool, "method": name, "path": path, "error": f"timed out after {args.timeout} s"}
    record = _last_json(done.stdout)
    if record is None:
        record = {"tool": tool, "method": name, "path": path,
                  "error": f"worker exited {done.returncode}: {_last_error_line(done.stderr)}"}  # fmt: skip
    record["process_s"] = time.perf_counter() - start
    return record


def _last_json(stdout: str) -> dict | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def _last_error_line(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def _subprocess(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **WORKER_ENV})
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{done.stderr[-4000:]}")


def logits_differences(files: dict, methods: list[str], sizes: list[str]) -> dict:
    """size -> method -> max |qcore logits - transformers logits| on the same 16-token input."""
    from safetensors.numpy import load_file

    differences: dict[str, dict[str, float]] = {}
    for size in sizes:
        for name in methods:
            ours = files.get((size, "qcore", name))
            theirs = files.get((size, "transformers", METHODS[name].reference))
            if ours is None or theirs is None or not ours.is_file() or not theirs.is_file():
                continue
            a, b = load_file(str(ours))["logits"], load_file(str(theirs))["logits"]
            differences.setdefault(size, {})[name] = float(abs(a - b).max()) if a.shape == b.shape else float("nan")
    return differences


# -- `qcore backends` vs `import torch` ----------------------------------------------------------------------------


def time_cli(repeats: int, console) -> dict:
    """Median wall time of each command over ``repeats`` fresh processes, after one untimed warm-up run."""
    script = Path(sys.executable).parent / "qcore"
    # The script next to this interpreter: a version manager's shim in front of it would add its own start-up.
    backends = [str(script), "backends"] if script.is_file() else [sys.executable, "-m", "qcore.cli", "backends"]
    commands = {
        "qcore backends": backends,
        "import torch": [sys.executable, "-c", "import torch"],
        "import qcore; qcore.backends()": [sys.executable, "-c", "import qcore; qcore.backends()"],
    }
    timings = {}
    for label, command in commands.items():
        samples, error = [], None
        for attempt in range(repeats + 1):
            start = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **WORKER_ENV})
            elapsed = time.perf_counter() - start
            if done.returncode != 0:
                error = _last_error_line(done.stderr)
                break
            if attempt:
                samples.append(elapsed)
        timings[label] = {"command": " ".join(command), "median_s": statistics.median(samples) if samples else None,
                          "samples_s": samples, "error": error}  # fmt: skip
        console.print(f"cli: {label}: " + (f"{timings[label]['median_s']:.3f} s" if samples else f"error {error}"))
    return timings


# -- profiling -----------------------------------------------------------------------------------------------------


def profile(size: str, info: dict, args: argparse.Namespace, console) -> int:
    """Where one load spends its time: qcore's phases (unprofiled), then cProfile of qcore and of transformers."""
    method = METHODS[args.profile_method]
    out_dir = args.out.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {"size": size, "method": method.name, "checkpoint": info}

    read = run_worker("read", "bf16", info["path"], args, None, ("--load-only",))
    phases = run_worker("qcore", method.name, info["path"], args, None, ("--load-only", "--phases"))
    results["read_only"], results["phases"] = read, phases
    profiles = {}
    for tool, name in (("qcore", method.name), ("transformers", method.reference)):
        stats_file = out_dir / f"profile-{size}-{tool}-{name}.prof"
        record = run_worker(tool, name, info["path"], args, None, ("--load-only", "--profile", str(stats_file)))
        profiles[tool] = {"record": record, "stats_file": str(stats_file)}
    results["profiles"] = profiles
    report.print_profile(results, console)
    path = out_dir / f"profile-{size}-{method.name}.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    console.print(f"\nwritten: {path} and the .prof files beside it (open with python -m pstats or snakeviz)")
    return 0


def machine_facts(args: argparse.Namespace, started: float) -> dict:
    import importlib.metadata
    import platform

    versions = {}
    for package in ("qcore", "qcore-bnb", "qcore-hqq", "qcore-eetq", "torch", "transformers", "bitsandbytes", "hqq",
                    "eetq", "safetensors", "accelerate"):  # fmt: skip
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    total_memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": time.time() - started,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": total_memory,
        "load_average_at_end": load,
        "versions": versions,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "git": _git_head(),
    }


def _git_head() -> str | None:
    if shutil.which("git") is None:
        return None
    done = subprocess.run(["git", "-C", str(HERE), "describe", "--always", "--dirty"], capture_output=True, text=True)
    return done.stdout.strip() or None


if __name__ == "__main__":
    sys.exit(main())
