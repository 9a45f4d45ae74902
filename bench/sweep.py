"""Figures 13 and 14 of the RWKV paper: peak memory (excluding parameters) and time to generate N
tokens against model size, for RWKV-4 and four transformer families, on CPU and GPU.

    python -m bench.sweep --preset quick                  # small sizes, 64 tokens: minutes
    python -m bench.sweep --preset paper --device cpu     # every size that fits, 512 tokens, 3 repeats
    python -m bench.sweep --preset paper --device cuda --protocol paper

Every run is one fresh process (`bench.runner`, as in `bench.generate`). Before a model runs, its
memory is estimated (parameters + state/KV cache/activations + margin) and checked against free RAM
(or GPU memory); what does not fit is skipped with the reason printed. Each finished run is appended
to OUT/runs.jsonl at once, so a killed sweep loses only the run in progress and a re-run skips
finished rows (failed and timed-out runs count as finished; --retry-failed runs them again). One
sweep at a time may write to OUT (a lock on OUT/.lock); a second one refuses at once.
Each run records the CPU time other processes used meanwhile; --wait-quiet SECONDS waits (at most
that long) before each run for the machine to be quiet.
Outputs in OUT (default results/): runs.jsonl (every run), sweep_<protocol>.csv, .json and .md
(medians; the .md is the table docs/results.md links), fig13_memory_<protocol>.png and
fig14_time_<protocol>.png. Tables and figures say which models ran on synthetic weights, mark the
runs made on a busy machine (figures: hollow markers) and flag a suspect bandwidth baseline.
--plot-only rebuilds them from OUT/runs.jsonl without running anything.
"""
import contextlib
import csv
import fcntl
import json
import os
import statistics
import sys
from pathlib import Path

from tqdm import tqdm

from bench import models
from bench.cli import (OneLineParser, check_writable_dir, command, fail, fmt_bytes, fmt_params, nonnegative_float,
                       positive_float, positive_int, write_json_atomic, write_text_atomic)
from bench.cpuload import BUSY_PCT, busy_warning, wait_quiet
from bench.generate import add_run_arguments
from bench.machine import baseline_problem, share_caveats
from bench.runner import run_child

PRESETS = {
    # small sizes, few tokens: the whole sweep in a few minutes on 2 cores
    "quick": dict(models=["rwkv-4-pile-169m", "rwkv-4-pile-430m", "pythia-160m", "pythia-410m", "opt-125m",
                          "opt-350m", "gpt-neo-125m", "bloom-560m"], tokens=64, repeats=1),
    # every registered size of every family, as in the paper's figures
    "paper": dict(models=None, tokens=512, repeats=3),
}
METRICS = ("total_s", "prefill_s", "decode_s", "tokens_per_s", "decode_tokens_per_s", "weight_GBps", "peak_bytes",
           "others_cpu_pct")
ROW_KEYS = ("key", "model", "status")                      # what every runs.jsonl row has


# ---------------------------------------------------------------------------------------------
# Planning

def effective_protocol(spec):
    """RWKV is recurrent whatever --protocol says; the transformers follow it."""
    return "recurrent" if models.family_of(spec["model"]) == models.RWKV else spec["protocol"]


def run_key(spec, repeat):
    """The identity of one run in runs.jsonl; the weight format joins it only when not the dtype's
    (so rows written before --weights existed keep their keys)."""
    parts = [spec["model"], spec["device"], spec["dtype"], effective_protocol(spec), spec["tokens"], spec["threads"],
             repeat]
    if spec.get("weights") not in (None, spec["dtype"]):
        parts.append(f"w={spec['weights']}")
    return "|".join(str(x) for x in parts)


def plan_runs(names, devices, tokens, repeats, protocol="kv-cache", dtype="float32", threads=None, budget_bytes=None,
         weights=None):
    """-> (runs, skipped). runs: [(key, spec)] in order, repeats of a model together;
    skipped: [{model, device, reason}] for what does not fit (counting the weight format's bytes)."""
    runs, skipped = [], []
    for device in devices:
        for name in names:
            ok, reason = models.fits(name, device, tokens, protocol=protocol, dtype=dtype, budget_bytes=budget_bytes,
                                     weights=weights)
            if not ok:
                skipped.append({"model": name, "device": device, "reason": reason})
                continue
            spec = dict(model=name, device=device, dtype=dtype, weights=weights, tokens=tokens, threads=threads,
                        protocol=protocol)
            runs += [(run_key(spec, r), dict(spec, repeat=r, run_protocol=effective_protocol(spec)))
                     for r in range(repeats)]
    return runs, skipped


# ---------------------------------------------------------------------------------------------
# The results file: one JSON object per line, appended as each run ends

def read_rows(path):
    """Every complete row of a runs.jsonl (a line torn by a kill is ignored). A line that is JSON
    but not a row of ours raises ValueError naming the file and line."""
    rows = []
    if not Path(path).exists():
        return rows
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(row, dict) or any(k not in row for k in ROW_KEYS):
            raise ValueError(f"{path} line {n}: not a bench row (needs keys {', '.join(ROW_KEYS)}): {line[:60]!r}")
        rows.append(row)
    return rows


def append_row(path, row):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() > 0:                                   # a torn last line must not swallow this row
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write((json.dumps(row, default=str) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


def execute(runs, results_path, runner=run_child, timeout=None, retry_failed=False, progress=True, estimate=None,
            wait_quiet_s=0):
    """Run every planned run not already in results_path, appending each row as it finishes.
    timeout: seconds or a function spec -> seconds. estimate: spec -> expected seconds (ETA weights).
    wait_quiet_s: before each run, wait up to this long for other processes to go quiet."""
    done = {r["key"] for r in read_rows(results_path) if r.get("status") == "ok" or not retry_failed}
    pending = [(k, s) for k, s in runs if k not in done]
    weights = [max(1.0, estimate(s)) if estimate else 1.0 for _, s in pending]
    bar = tqdm(total=sum(weights), disable=not progress, unit="s", unit_scale=True, dynamic_ncols=True,
               bar_format="{desc} {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]")
    try:
        for i, ((key, spec), w) in enumerate(zip(pending, weights)):
            bar.set_description(f"run {i + 1}/{len(pending)} {spec['model']} {spec['device']} #{spec['repeat']}")
            if wait_quiet_s:
                quiet, pct = wait_quiet(wait_quiet_s)
                if not quiet:
                    bar.write(f"machine still busy after --wait-quiet {wait_quiet_s:.0f} s ({pct:.0f}% others): running")
            limit = timeout(spec) if callable(timeout) else timeout
            child_spec = {k: v for k, v in spec.items() if k not in ("repeat", "run_protocol")}
            result = runner(child_spec, limit)
            append_row(results_path, {"key": key, **child_spec, "repeat": spec["repeat"], **result,
                                      "protocol": spec.get("run_protocol", spec["protocol"])})
            if result["status"] != "ok":
                bar.write(f"{spec['model']} ({spec['device']}): {result['status']}: {result.get('error', '')}")
            elif busy_warning(result.get("others_cpu_pct")):
                bar.write(f"{spec['model']}: {busy_warning(result['others_cpu_pct'])}")
            bar.update(w)
    finally:
        bar.close()
    return len(pending)


# ---------------------------------------------------------------------------------------------
# Summaries

def row_format(row):
    """A row's weight format: recorded by the child, else the spec's --weights (failed runs), else fp32
    (rows written before --weights existed)."""
    spec_format = row.get("weights") if row.get("weights") in models.WEIGHT_BYTES else None
    return row.get("weight_format") or spec_format or row.get("dtype") or "float32"


def summarize(rows, protocol):
    """Median over repeats per (model, device) for one protocol (RWKV rows count for both). A run
    retried with --retry-failed counts once, with its latest result."""
    groups = {}
    for r in {r["key"]: r for r in rows}.values():
        if r["protocol"] not in (protocol, "recurrent"):
            continue
        fmt = row_format(r)
        groups.setdefault((r["model"], r["device"], r["tokens"], fmt), []).append(r)
    out = []
    for (name, device, tokens, fmt), group in groups.items():
        ok = [r for r in group if r["status"] == "ok"]
        row = {"family": models.family_of(name), "model": name, "n_params": models.n_params(name),
               "device": device, "tokens": tokens, "protocol": protocol, "weight_format": fmt,
               "runs_ok": len(ok), "runs": len(group),
               "status": "ok" if ok else group[-1]["status"], "error": "" if ok else group[-1].get("error", "")}
        for m in METRICS:
            vals = [r[m] for r in ok if r.get(m) is not None]
            row[m] = statistics.median(vals) if vals else None
        if ok:
            row.update(mem_method=ok[0]["mem_method"], expected_runtime_bytes=ok[0].get("expected_runtime_bytes"),
                       synthetic=ok[0]["synthetic"], threads=ok[0]["threads"],
                       weight_bytes_per_token=ok[0].get("weight_bytes_per_token"))
        out.append(row)
    return sorted(out, key=lambda r: (r["device"], r["family"] != models.RWKV, r["family"], r["n_params"]))


CSV_FIELDS = ["family", "model", "n_params", "device", "protocol", "weight_format", "tokens", "status", "runs_ok", "runs",
              "total_s", "prefill_s", "decode_s", "tokens_per_s", "decode_tokens_per_s", "weight_GBps", "bandwidth_pct",
              "peak_bytes", "expected_runtime_bytes", "mem_method", "threads", "synthetic", "others_cpu_pct", "error",
              "bandwidth_note"]


def write_csv(path, summary):
    tmp = Path(path).with_name(f".{Path(path).name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore")
            w.writeheader()
            w.writerows(summary)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def bandwidth_cell(r):
    """'23.4 (114%, suspect baseline, above 100%: ...)': the share of the measured bandwidth with
    what qualifies it."""
    if not r.get("weight_GBps"):
        return "-"
    if r.get("bandwidth_pct") is None:
        return f"{r['weight_GBps']:.1f}"
    note = r.get("bandwidth_note")
    return f"{r['weight_GBps']:.1f} ({r['bandwidth_pct']:.0f}%" + (f", {note})" if note else ")")


def markdown(summary, skipped, protocol, machines):
    from bench.plots import synthetic_note
    lines = [f"Protocol: **{protocol}** (" + ("transformers with a KV cache" if protocol == "kv-cache" else
             "transformers recompute the whole sequence every step, no KV cache, as the paper's code") +
             "; RWKV is recurrent either way). Median of the repeats; each run a fresh process.", ""]
    if synthetic_note(summary):
        lines += [f"**{synthetic_note(summary)}**", ""]
    for m in machines.values():
        problem = baseline_problem(m)
        lines.append(f"- {m['device']}: {m['device_name']}, {m['threads']} threads, measured read bandwidth "
                     f"{m['read_bandwidth_GBps']:.1f} GB/s, fp32 GEMM {m['gemm_fp32_GFLOPs']:.0f} GFLOP/s"
                     + (f" (**suspect baseline: {problem}**; the shares of it below are too)" if problem else ""))
    lines += ["", "| model | params | device | weights | tokens | total time (s) | tokens/s | weight GB/s (% of measured) "
              "| peak mem excl. params | state / KV alone | others' CPU | runs |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    busy = [r["model"] for r in summary if (r.get("others_cpu_pct") or 0) > BUSY_PCT]
    for r in summary:
        fmt = r.get("weight_format", "float32")
        if r["status"] != "ok":
            lines.append(f"| {r['model']} | {fmt_params(r['n_params'])} | {r['device']} | {fmt} | {r['tokens']} | "
                         f"{r['status']}: {r['error']} | | | | | | 0/{r['runs']} |")
            continue
        others = f"{r['others_cpu_pct']:.0f}%" if r.get("others_cpu_pct") is not None else "-"
        bw = bandwidth_cell(r)
        lines.append(f"| {r['model']} | {fmt_params(r['n_params'])} | {r['device']} | {fmt} | {r['tokens']} | "
                     f"{r['total_s']:.2f} | {r['tokens_per_s']:.2f} | {bw} | {fmt_bytes(r['peak_bytes'])} | "
                     f"{fmt_bytes(r['expected_runtime_bytes'])} | {others} | {r['runs_ok']}/{r['runs']} |")
    if busy:
        lines += ["", f"**WARNING: other processes used more than {BUSY_PCT:.0f}% of the CPU during the runs of "
                  f"{', '.join(busy)}: those timings are not quiet-machine timings.**"]
    if skipped:
        lines += ["", "Skipped (estimated before running):", ""]
        lines += [f"- {s['model']} ({s['device']}): {s['reason']}" for s in skipped]
    return "\n".join(lines) + "\n"


def write_outputs(out_dir, rows, skipped, protocol, machines):
    """CSV + markdown table + the two figures for one protocol; returns the paths written."""
    from bench.plots import sweep_figures
    out_dir = Path(out_dir)
    summary = summarize(rows, protocol)
    for r in summary:
        m = machines.get(r["device"])
        if m and r.get("weight_GBps"):
            r["bandwidth_pct"] = 100 * r["weight_GBps"] / m["read_bandwidth_GBps"]
            r["bandwidth_note"] = ", ".join(share_caveats(r["bandwidth_pct"], m, r.get("weight_bytes_per_token")))
    paths = [out_dir / f"sweep_{protocol}.csv", out_dir / f"sweep_{protocol}.md", out_dir / f"sweep_{protocol}.json"]
    write_csv(paths[0], summary)
    write_text_atomic(paths[1], markdown(summary, skipped, protocol, machines))
    write_json_atomic(paths[2], {"schema": "bench.sweep/1", "protocol": protocol, "machines": machines,
                                 "summary": summary, "skipped": skipped})
    paths += sweep_figures(summary, out_dir, protocol)
    return paths, summary


# ---------------------------------------------------------------------------------------------

def describe_preset(name):
    preset = PRESETS[name]
    which = f"{len(preset['models'])} small models" if preset["models"] else "every registered size of every family"
    return f"{which}, {preset['tokens']} tokens, {preset['repeats']} repeat{'s' if preset['repeats'] > 1 else ''}"


def parse(argv):
    p = OneLineParser(prog="python -m bench.sweep", description=__doc__)
    p.add_argument("--preset", default="quick", choices=sorted(PRESETS),
                   help="what to run (default: quick): " + "; ".join(f"{name}: {describe_preset(name)}"
                                                                      for name in sorted(PRESETS, reverse=True)))
    p.add_argument("--models", help="comma-separated names or families (rwkv, pythia, opt, gpt-neo, bloom) "
                                    "instead of the preset's")
    add_run_arguments(p, device_help="cpu, cuda or cpu,cuda",
                      timeout_help="seconds per run (default: 600 + 5x the roofline estimate)")
    p.add_argument("--protocol", default="kv-cache", choices=["kv-cache", "paper"])
    p.add_argument("--tokens", type=positive_int, help="override the preset's token count")
    p.add_argument("--repeats", type=positive_int, help="override the preset's repeats")
    p.add_argument("--mem-budget-gb", type=positive_float, help="memory budget instead of what is free now")
    p.add_argument("--wait-quiet", type=nonnegative_float, default=0, metavar="SECONDS",
                   help=f"before each run, wait up to SECONDS for other processes to use <= {BUSY_PCT:.0f}%% of the CPU")
    p.add_argument("--retry-failed", action="store_true", help="run failed/timed-out rows again")
    p.add_argument("--out", default="results", help="output directory (default results/)")
    p.add_argument("--dry-run", action="store_true", help="print the plan with estimated times, run nothing")
    p.add_argument("--plot-only", action="store_true",
                   help="run nothing; tables and figures from every row of OUT/runs.jsonl with this token count "
                        "(e.g. CPU and GPU runs.jsonl files concatenated)")
    return p.parse_args(argv)


def expand_models(spec, preset):
    """--models (names and family names, comma-separated) -> canonical names, once each, in order.
    None: the preset's. ValueError for an empty list or an unknown name."""
    fams = models.families()
    if spec is None:
        return preset["models"] or [n for f in fams.values() for n in f]
    items = [x.strip() for x in spec.split(",") if x.strip()]
    if not items:
        raise ValueError(f"--models {spec!r}: no model names given")
    names = [models.canonical(n) for item in items for n in fams.get(item, [item])]
    return list(dict.fromkeys(names))


def expand_devices(spec):
    devices = list(dict.fromkeys(d.strip() for d in spec.split(",") if d.strip()))
    if not devices or set(devices) - {"cpu", "cuda"}:
        raise ValueError(f"--device must be cpu, cuda or cpu,cuda, got {spec!r}")
    return devices


@contextlib.contextmanager
def locked(out_dir):
    """Hold an exclusive lock on OUT/.lock for the whole sweep; ValueError if another sweep has it
    or OUT cannot be written."""
    check_writable_dir(out_dir, "--out")
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        f = open(out_dir / ".lock", "a+")
    except OSError as e:
        raise ValueError(f"--out {out_dir}: {e.strerror}") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise ValueError(f"--out {out_dir}: another sweep is writing there (pid {f.read().strip() or '?'})") \
                from None
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        yield


def make_plan(args, names, devices, threads):
    """-> (runs, skipped, machines, estimate): what will run, what will not and why."""
    import torch
    from bench.machine import get as machine_get
    preset = PRESETS[args.preset]
    tokens, repeats = args.tokens or preset["tokens"], args.repeats or preset["repeats"]
    skipped = []
    if "cuda" in devices and not torch.cuda.is_available():
        devices = [d for d in devices if d != "cuda"]
        skipped += [{"model": n, "device": "cuda", "reason": "no CUDA GPU on this machine"} for n in names]
    budget = args.mem_budget_gb * 1e9 if args.mem_budget_gb else None
    runs, more = plan_runs(names, devices, tokens, repeats, args.protocol, args.dtype, threads, budget, args.weights)
    machines = {d: machine_get(d, threads) for d in devices}

    def estimate(s):
        return models.estimate_seconds(s["model"], s["tokens"], machines[s["device"]], protocol=s["protocol"],
                                       dtype=s["dtype"], weights=s["weights"])
    return runs, skipped + more, machines, estimate


def dry_run(runs, out, estimate):
    done = {r["key"] for r in read_rows(out / "runs.jsonl")}
    for key, spec in runs:
        print(f"{'done' if key in done else 'todo'}  {spec['model']:<18} {spec['device']:<5} #{spec['repeat']}  "
              f"~{estimate(spec):8.0f} s (roofline estimate)")
    todo = sum(estimate(s) for k, s in runs if k not in done)
    print(f"{len(runs)} runs, {sum(k not in done for k, _ in runs)} to do, ~{todo / 60:.0f} min of generation "
          f"(plus loading and first-use checkpoint writing)")


def report(args, out, tokens, threads, skipped, machines):
    """Tables and figures from every run at this token count (CPU ones at this thread count), not
    only this plan's: earlier sweeps and rows from another machine (e.g. the GPU) join them."""
    rows = [r for r in read_rows(out / "runs.jsonl")
            if r.get("tokens") == tokens and (r.get("device") != "cpu" or r.get("threads") == threads)]
    paths, _ = write_outputs(out, rows, skipped, args.protocol, machines)
    print((out / f"sweep_{args.protocol}.md").read_text())
    print("wrote " + ", ".join(str(x) for x in paths))


@command("bench.sweep")
def main(argv=None):
    prog = "bench.sweep"
    args = parse(argv)
    from rwkv_engine.process import usable_cores
    threads = args.threads or usable_cores()
    out = Path(args.out)
    try:
        names, devices = expand_models(args.models, PRESETS[args.preset]), expand_devices(args.device)
        with locked(out):
            runs, skipped, machines, estimate = make_plan(args, names, devices, threads)
            for s in skipped:
                print(f"skip {s['model']} ({s['device']}): {s['reason']}", file=sys.stderr)
            if args.dry_run:
                return dry_run(runs, out, estimate)
            if not args.plot_only:
                timeout = args.timeout or (lambda s: 600 + 5 * estimate(s))
                n = execute(runs, out / "runs.jsonl", timeout=timeout, retry_failed=args.retry_failed,
                            estimate=estimate, wait_quiet_s=args.wait_quiet)
                print(f"{n} runs done, {len(runs) - n} already in {out / 'runs.jsonl'}", file=sys.stderr)
            report(args, out, args.tokens or PRESETS[args.preset]["tokens"], threads, skipped, machines)
    except ValueError as e:
        fail(prog, str(e))


if __name__ == "__main__":
    main()
