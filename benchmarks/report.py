"""Turning worker records into medians, qcore/transformers ratios, target verdicts and rich tables.

Pure Python (plus rich): ``run.py`` collects the records, this module judges and prints them. The targets are those
of issue 8; benchmarks/README.md explains each column and each target.
"""

from __future__ import annotations

import math
import pstats
import statistics
import sysconfig
from pathlib import Path

from methods import METHODS
from rich.console import Console
from rich.table import Table

MIB = 2**20
REPO = Path(__file__).resolve().parent.parent
STDLIB = Path(sysconfig.get_paths()["stdlib"])

#: Per-run metrics whose median the summary reports (peak_minus_base and quantized_nbytes are derived).
METRICS = ("import_s", "load_s", "peak_rss", "peak_anon", "peak_minus_base", "rss_after_import", "footprint",
           "state_nbytes", "quantized_nbytes", "forward_s", "decode_tok_s")  # fmt: skip


def console() -> Console:
    # Wide enough for the comparison table when the output is a file or a pipe (rich would assume 80 columns).
    return Console(width=None if Console().is_terminal else 200, highlight=False)


def progress_line(record: dict) -> str:
    where = f"{record.get('size', '')} {record['tool']:<12} {record['method']:<13} #{record.get('repeat', 0)}"
    if "error" in record:
        return f"{where} [red]error[/]: {record['error'][:300]}"
    parts = [f"load {record['load_s']:.2f} s", f"peak {record['peak_rss'] / MIB:.0f} MiB",
             f"after import {record['rss_after_import'] / MIB:.0f} MiB"]  # fmt: skip
    if record.get("anon_after_trim") is not None:
        parts.append(f"heap kept free {(record['anon_after_load'] - record['anon_after_trim']) / MIB:.0f} MiB")
    if "forward_s" in record:
        parts += [f"fwd {record['forward_s'] * 1e3:.0f} ms", f"decode {record['decode_tok_s']:.1f} tok/s"]
    return f"{where} " + ", ".join(parts)


# -- summarizing ---------------------------------------------------------------------------------------------------


def _derived(record: dict) -> dict:
    record = dict(record)
    if "peak_rss" in record:
        record["peak_minus_base"] = record["peak_rss"] - record["rss_after_import"]
    if "footprint" in record:
        # get_memory_footprint counts parameters and buffers only; bnb's absmax and HQQ's scales live elsewhere.
        record["quantized_nbytes"] = max(record["footprint"], record.get("state_nbytes", 0))
    return record


def medians(runs: list[dict]) -> dict:
    """Median of each metric over the successful runs; the first error when every run failed."""
    good = [_derived(r) for r in runs if "error" not in r]
    if not good:
        return {"error": runs[0]["error"] if runs else "not run", "runs": 0}
    values: dict = {"runs": len(good)}
    for metric in METRICS:
        samples = [r[metric] for r in good if r.get(metric) is not None]
        if samples:
            values[metric] = statistics.median(samples)
    return values


def summarize(runs, infos, prequantized, differences, cli, methods, sizes) -> dict:
    by_key: dict[tuple[str, str, str], list[dict]] = {}
    for record in runs:
        by_key.setdefault((record["size"], record["tool"], record["method"]), []).append(record)
    summary = []
    for size in sizes:
        for name in methods:
            method = METHODS[name]
            ours = medians(by_key.get((size, "qcore", name), []))
            theirs = medians(by_key.get((size, "transformers", method.reference), []))
            ratios = {m: ours[m] / theirs[m] for m in METRICS if m in ours and theirs.get(m)}
            summary.append({
                "size": size, "method": name, "reference": f"transformers {method.reference}",
                "same_backend": method.same_backend, "qcore": ours, "transformers": theirs, "ratios": ratios,
                "logits_max_abs_diff": differences.get(size, {}).get(name),
            })  # fmt: skip
    results = {
        "checkpoints": infos,
        "prequantized_checkpoints": prequantized,
        "summary": summary,
        "cli": cli,
        "runs": runs,
    }
    results["targets"] = targets(summary, infos, prequantized, cli)
    results["scaling"] = scaling(summary, infos)
    return results


# -- targets -------------------------------------------------------------------------------------------------------


def _verdict(name, size, method, value, limit, ok, unit="×") -> dict:
    return {"target": name, "size": size, "method": method, "value": value, "limit": limit, "unit": unit,
            "status": "PASS" if ok else "FAIL"}  # fmt: skip


def _skip(name, size, method, reason) -> dict:
    return {"target": name, "size": size, "method": method, "value": None, "limit": None, "unit": "",
            "status": "SKIP", "reason": reason}  # fmt: skip


def targets(summary: list[dict], infos: dict, prequantized: dict, cli: dict) -> list[dict]:
    """Every target of issue 8 that the measured rows allow, each PASS, FAIL, or SKIP with the reason."""
    verdicts = []
    rows = {(row["size"], row["method"]): row for row in summary}
    bf16_decode = {row["size"]: row["transformers"].get("decode_tok_s") for row in summary
                   if METHODS[row["method"]].reference == "bf16"}  # fmt: skip

    def ratio_target(label, size, name, metric, limit, at_least=False):
        row = rows.get((size, name))
        if row is None:
            return
        missing = row["qcore"].get("error") or row["transformers"].get("error")
        if metric not in row["ratios"]:
            verdicts.append(_skip(label, size, name, missing or f"{metric} not measured"))
            return
        value = row["ratios"][metric]
        verdicts.append(_verdict(label, size, name, value, limit, value >= limit if at_least else value <= limit))

    for size in infos:
        ratio_target("on-the-fly nf4 peak RSS ≤ 0.5× transformers", size, "bnb-nf4", "peak_rss", 0.5)
        for name in ("bnb-nf4", "bnb-int8"):
            ratio_target("on-the-fly load time ≤ 0.8× transformers (same backend)", size, name, "load_s", 0.8)
        ratio_target("pre-quantized load time ≤ 1.0× transformers", size, "prequant-nf4", "load_s", 1.0)
        ratio_target("pre-quantized peak RSS ≤ 1.0× transformers", size, "prequant-nf4", "peak_rss", 1.0)
        for name in ("bf16", "bnb-nf4", "bnb-int8", "prequant-nf4"):
            ratio_target("decode tok/s ≥ 0.98× transformers (same backend)", size, name, "decode_tok_s", 0.98,
                         at_least=True)  # fmt: skip

        for (row_size, name), row in rows.items():
            if row_size != size:
                continue
            label = "peak − after-import RSS < 1.25 × quantized + 2 × largest tensor"
            ours = row["qcore"]
            if "error" in ours:
                verdicts.append(_skip(label, size, name, ours["error"]))
                continue
            source = prequantized.get(size, {}) if METHODS[name].pre_quantized else infos[size]
            limit = 1.25 * ours["quantized_nbytes"] + 2 * source["largest_tensor_nbytes"]
            verdicts.append(_verdict(label, size, name, ours["peak_minus_base"] / MIB, limit / MIB,
                                     ours["peak_minus_base"] < limit, unit="MiB"))  # fmt: skip

        eetq = rows.get((size, "eetq-int8"))
        if eetq is not None:
            label = "eetq int8 decode faster than transformers bf16 (CPU, batch 1)"
            ours, theirs = eetq["qcore"].get("decode_tok_s"), bf16_decode.get(size)
            if ours is None or theirs is None:
                verdicts.append(_skip(label, size, "eetq-int8", eetq["qcore"].get("error") or "bf16 not measured"))
            else:
                verdicts.append(_verdict(label, size, "eetq-int8", ours / theirs, 1.0, ours > theirs))

        for (row_size, name), row in rows.items():
            difference = row["logits_max_abs_diff"]
            if row_size == size and row["same_backend"] and difference is not None:
                verdicts.append(_verdict("logits identical to transformers (same backend; extra)", size, name,
                                         difference, 0.0, difference == 0.0, unit="max|Δ|"))  # fmt: skip

    ours, torch_import = cli.get("qcore backends", {}), cli.get("import torch", {})
    if ours.get("median_s") and torch_import.get("median_s"):
        value = ours["median_s"] / torch_import["median_s"]
        verdicts.append(_verdict("`qcore backends` ≤ 0.5× `import torch`", "-", "-", value, 0.5, value <= 0.5))
    elif cli:
        verdicts.append(_skip("`qcore backends` ≤ 0.5× `import torch`", "-", "-", ours.get("error") or "not measured"))
    return verdicts


# -- scaling -------------------------------------------------------------------------------------------------------


def scaling(summary: list[dict], infos: dict) -> dict:
    """Load time and memory against model size for one method (bnb-nf4 when measured), with log-log slopes."""
    candidates = [row for row in summary if "load_s" in row["qcore"]]
    if not candidates:
        return {}
    method = "bnb-nf4" if any(r["method"] == "bnb-nf4" for r in candidates) else candidates[0]["method"]
    rows = []
    for row in candidates:
        if row["method"] != method:
            continue
        info = infos[row["size"]]
        rows.append({
            "size": row["size"], "params": info["params"], "checkpoint_nbytes": info["nbytes"],
            "qcore_load_s": row["qcore"]["load_s"], "transformers_load_s": row["transformers"].get("load_s"),
            "qcore_peak_minus_base": row["qcore"]["peak_minus_base"],
            "transformers_peak_minus_base": row["transformers"].get("peak_minus_base"),
            "quantized_nbytes": row["qcore"]["quantized_nbytes"],
        })  # fmt: skip
    slopes = {}
    for tool in ("qcore", "transformers"):
        points = [(r["params"], r[f"{tool}_load_s"]) for r in rows if r.get(f"{tool}_load_s")]
        slopes[tool] = _loglog_slope(points)
    return {"method": method, "rows": rows, "load_time_exponent": slopes}


def _loglog_slope(points: list[tuple[float, float]]) -> float | None:
    """k in time ∝ params^k, least squares on logs; 1.0 is linear."""
    if len(points) < 2:
        return None
    xs = [math.log(x) for x, _ in points]
    ys = [math.log(y) for _, y in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    denominator = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / denominator if denominator else None


# -- printing ------------------------------------------------------------------------------------------------------


def print_all(results: dict, out: Console) -> None:
    sizes = list(results["checkpoints"])
    for size in sizes:
        info = results["checkpoints"][size]
        out.print()
        out.print(comparison_table(size, info, [r for r in results["summary"] if r["size"] == size]))
    out.print()
    out.print(targets_table(results["targets"]))
    if results["scaling"].get("rows"):
        out.print()
        out.print(scaling_table(results["scaling"]))
    if results["cli"]:
        out.print()
        out.print(cli_table(results["cli"]))


def _pair(ours, theirs, scale=1.0, digits=2) -> str:
    def one(value):
        return "—" if value is None else f"{value * scale:.{digits}f}"

    return f"{one(ours)} / {one(theirs)}"


def _ratio(row: dict, metric: str, good_below: bool = True) -> str:
    value = row["ratios"].get(metric)
    if value is None:
        return "—"
    good = value <= 1.0 if good_below else value >= 1.0
    return f"[{'green' if good else 'red'}]{value:.2f}×[/]"


def comparison_table(size: str, info: dict, rows: list[dict]) -> Table:
    table = Table(title=f"{size}: {info['params'] / 1e6:.0f}M params, {info['nbytes'] / MIB:.0f} MiB bf16, "
                        f"{info['shards']} shards — qcore / transformers (medians), ratio = qcore ÷ transformers",
                  title_justify="left")  # fmt: skip
    for column in ("method", "vs transformers", "load s", "×", "peak RSS MiB", "×", "peak−base MiB", "×",
                   "quantized MiB", "fwd ms", "×", "decode tok/s", "×", "max|Δlogits|"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("method", "vs transformers") else "right")
    failures = []
    for row in rows:
        ours, theirs = row["qcore"], row["transformers"]
        if "error" in ours or "error" in theirs:
            which = "qcore" if "error" in ours else "transformers"
            failures.append(f"{row['method']}: {which} failed: {(ours if 'error' in ours else theirs)['error']}")
            table.add_row(row["method"], row["reference"], f"[red]{which} failed[/]")
            continue
        difference = row["logits_max_abs_diff"]
        table.add_row(
            row["method"], row["reference"] + ("" if row["same_backend"] else " (other backend)"),
            _pair(ours.get("load_s"), theirs.get("load_s")), _ratio(row, "load_s"),
            _pair(ours.get("peak_rss"), theirs.get("peak_rss"), 1 / MIB, 0), _ratio(row, "peak_rss"),
            _pair(ours.get("peak_minus_base"), theirs.get("peak_minus_base"), 1 / MIB, 0),
            _ratio(row, "peak_minus_base"),
            _pair(ours.get("quantized_nbytes"), theirs.get("quantized_nbytes"), 1 / MIB, 0),
            _pair(ours.get("forward_s"), theirs.get("forward_s"), 1e3, 0), _ratio(row, "forward_s"),
            _pair(ours.get("decode_tok_s"), theirs.get("decode_tok_s"), 1, 1), _ratio(row, "decode_tok_s", False),
            "—" if difference is None else f"{difference:.3g}",
        )  # fmt: skip
    if failures:
        table.caption = "\n".join(failures)
        table.caption_justify = "left"
    return table


def targets_table(verdicts: list[dict]) -> Table:
    table = Table(title="targets (issue 8)", title_justify="left")
    for column in ("target", "size", "method", "measured", "limit", "result"):
        table.add_column(column)
    colors = {"PASS": "green", "FAIL": "red", "SKIP": "yellow"}
    for v in verdicts:
        if v["status"] == "SKIP":
            measured, limit = f"[yellow]{(v.get('reason') or '')[:90]}[/]", ""
        elif v["unit"] == "MiB":
            measured, limit = f"{v['value']:.0f} MiB", f"< {v['limit']:.0f} MiB"
        elif v["unit"] == "max|Δ|":
            measured, limit = f"{v['value']:.3g}", "0"
        else:
            measured, limit = f"{v['value']:.2f}×", f"{v['limit']:.2f}×"
        table.add_row(v["target"], v["size"], v["method"], measured, limit,
                      f"[{colors[v['status']]}]{v['status']}[/]")  # fmt: skip
    return table


def scaling_table(data: dict) -> Table:
    slopes = data["load_time_exponent"]
    note = ", ".join(f"{tool} load ∝ params^{k:.2f}" for tool, k in slopes.items() if k is not None)
    table = Table(title=f"scaling, {data['method']}" + (f" ({note}; 1.00 = linear)" if note else ""),
                  title_justify="left")  # fmt: skip
    for column in ("size", "params M", "bf16 MiB", "qcore load s", "qcore s/100M", "transformers load s",
                   "transformers s/100M", "quantized MiB", "qcore peak−base MiB", "÷ quantized",
                   "transformers peak−base MiB"):  # fmt: skip
        table.add_column(column, justify="right")
    for r in data["rows"]:
        per = 1e8 / r["params"]
        theirs = r["transformers_load_s"]
        table.add_row(
            r["size"], f"{r['params'] / 1e6:.0f}", f"{r['checkpoint_nbytes'] / MIB:.0f}",
            f"{r['qcore_load_s']:.2f}", f"{r['qcore_load_s'] * per:.2f}",
            "—" if theirs is None else f"{theirs:.2f}", "—" if theirs is None else f"{theirs * per:.2f}",
            f"{r['quantized_nbytes'] / MIB:.0f}", f"{r['qcore_peak_minus_base'] / MIB:.0f}",
            f"{r['qcore_peak_minus_base'] / r['quantized_nbytes']:.2f}",
            "—" if r["transformers_peak_minus_base"] is None else f"{r['transformers_peak_minus_base'] / MIB:.0f}",
        )  # fmt: skip
    return table


def cli_table(cli: dict) -> Table:
    table = Table(title="start-up: median wall time of fresh processes", title_justify="left")
    for column in ("command", "median s", "samples"):
        table.add_column(column)
    for label, timing in cli.items():
        median = "error: " + (timing["error"] or "") if timing["median_s"] is None else f"{timing['median_s']:.3f}"
        table.add_row(label, median, " ".join(f"{s:.3f}" for s in timing["samples_s"]))
    return table


# -- profiles --------------------------------------------------------------------------------------------------------


def print_profile(results: dict, out: Console, top: int = 25) -> None:
    info = results["checkpoint"]
    out.print(f"\nprofile of the {results['method']} load of {results['size']} "
              f"({info['params'] / 1e6:.0f}M params, {info['nbytes'] / MIB:.0f} MiB bf16)")  # fmt: skip
    out.print(phase_table(results["phases"], results["read_only"]))
    for tool, entry in results["profiles"].items():
        record = entry["record"]
        if "error" in record:
            out.print(f"[red]{tool} profile failed:[/] {record['error']}")
            continue
        stats = pstats.Stats(entry["stats_file"])
        out.print(f"\n[bold]{tool}[/]: {record['load_s']:.2f} s under cProfile")
        out.print(package_table(stats, f"{tool}: own time by package"))
        out.print(function_table(stats, "cumulative", top, f"{tool}: top {top} by cumulative time"))
        out.print(function_table(stats, "tottime", top, f"{tool}: top {top} by own time"))


def phase_table(phases: dict, read_only: dict) -> Table:
    table = Table(title="qcore load by phase (one unprofiled run; hook time measured by pluggy monitoring)",
                  title_justify="left")  # fmt: skip
    for column in ("part", "calls", "s", "% of load"):
        table.add_column(column, justify="left" if column == "part" else "right")
    if "error" in phases:
        table.add_row(f"[red]failed: {phases['error']}[/]", "", "", "")
        return table
    total = phases["load_s"]
    hooks = phases.get("phases", {})
    in_hooks = sum(h["s"] for h in hooks.values())
    for name, entry in sorted(hooks.items(), key=lambda item: -item[1]["s"]):
        table.add_row(f"hook {name}", str(entry["calls"]), f"{entry['s']:.3f}", f"{100 * entry['s'] / total:.1f}")
    table.add_row("outside hooks: config, skeleton, reading, plain placement", "", f"{total - in_hooks:.3f}",
                  f"{100 * (total - in_hooks) / total:.1f}")  # fmt: skip
    table.add_row("[bold]whole load[/]", "", f"{total:.3f}", "100.0")
    if "load_s" in read_only:
        table.add_row("for scale: copying every tensor out of the checkpoint", "", f"{read_only['load_s']:.3f}",
                      f"{100 * read_only['load_s'] / total:.1f}")  # fmt: skip
    return table


def _where(key: tuple[str, int, str]) -> str:
    file, line, function = key
    if file == "~":
        return function
    if "site-packages/" in file:
        short = file.split("site-packages/", 1)[1]
    elif file.startswith(str(REPO)):
        short = str(Path(file).relative_to(REPO))
    elif file.startswith(str(STDLIB)):
        short = "stdlib/" + str(Path(file).relative_to(STDLIB))
    else:
        short = file
    return f"{short}:{line}({function})"


def _package(key: tuple[str, int, str]) -> str:
    file, _, function = key
    if file == "~":
        for name in ("torch", "safetensors", "bitsandbytes", "hqq", "eetq"):
            if name in function:
                return f"{name} (C)"
        return "builtins (C)"
    if "site-packages/" in file:
        return file.split("site-packages/", 1)[1].split("/")[0].removesuffix(".py")
    if file.startswith(str(REPO)):
        parts = Path(file).relative_to(REPO).parts
        return parts[parts.index("src") + 1] if "src" in parts else parts[0]
    return "stdlib"


def package_table(stats: pstats.Stats, title: str) -> Table:
    totals: dict[str, float] = {}
    for key, (_, _, own, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        totals[_package(key)] = totals.get(_package(key), 0.0) + own
    whole = sum(totals.values()) or 1.0
    table = Table(title=title, title_justify="left")
    for column in ("package", "s", "%"):
        table.add_column(column, justify="left" if column == "package" else "right")
    for name, seconds in sorted(totals.items(), key=lambda item: -item[1])[:12]:
        table.add_row(name, f"{seconds:.3f}", f"{100 * seconds / whole:.1f}")
    return table


def function_table(stats: pstats.Stats, order: str, top: int, title: str) -> Table:
    index = {"cumulative": 3, "tottime": 2}[order]
    entries = sorted(stats.stats.items(), key=lambda item: -item[1][index])[:top]  # type: ignore[attr-defined]
    table = Table(title=title, title_justify="left")
    for column in ("ncalls", "tottime", "cumtime", "function"):
        table.add_column(column, justify="left" if column == "function" else "right")
    for key, (primitive, calls, own, cumulative, _) in entries:
        count = str(calls) if calls == primitive else f"{calls}/{primitive}"
        table.add_row(count, f"{own:.3f}", f"{cumulative:.3f}", _where(key))
    return table
