"""Figures 13 and 14 of the RWKV paper: peak memory (excluding parameters) and time to generate N
tokens against model size, for RWKV-4 and four transformer families, on CPU and GPU.

    python -m bench.sweep --preset quick                  # small sizes, 64 tokens: minutes
    python -m bench.sweep --preset paper --device cpu     # every size that fits, 512 tokens, 3 repeats
    python -m bench.sweep --preset paper --device cuda --protocol paper

Every run is one fresh process (`bench._run_one`, as in `bench.generate`). Before a model runs, its
memory is estimated (parameters + state/KV cache/activations + margin) and checked against free RAM
(or GPU memory); what does not fit is skipped with the reason printed. Each finished run is appended
to OUT/runs.jsonl at once, so a killed sweep loses only the run in progress and a re-run skips
finished rows (failed and timed-out runs count as finished; --retry-failed runs them again).
Outputs in OUT (default results/): runs.jsonl (every run), sweep_<protocol>.csv, .json and .md
(medians; the .md is the table docs/results.md links), fig13_memory_<protocol>.png and
fig14_time_<protocol>.png.
"""
import csv
import json
import os
import statistics
import sys
from pathlib import Path

from tqdm import tqdm

from bench import models
from bench._run_one import run_child
from bench.generate import OneLineParser, fail, fmt_bytes, fmt_params, write_json_atomic

PRESETS = {
    # small sizes, few tokens: the whole sweep in a few minutes on 2 cores
    "quick": dict(models=["rwkv-4-pile-169m", "rwkv-4-pile-430m", "pythia-160m", "pythia-410m", "opt-125m",
                          "opt-350m", "gpt-neo-125m", "bloom-560m"], tokens=64, repeats=1),
    # every registered size of every family, as in the paper's figures
    "paper": dict(models=None, tokens=512, repeats=3),
}
METRICS = ("total_s", "prefill_s", "decode_s", "tokens_per_s", "decode_tokens_per_s", "weight_GBps", "peak_bytes")


# ---------------------------------------------------------------------------------------------
# Planning

def run_key(spec, repeat):
    protocol = "recurrent" if models.family_of(spec["model"]) == models.RWKV else spec["protocol"]
    return "|".join(str(x) for x in (spec["model"], spec["device"], spec["dtype"], protocol, spec["tokens"],
                                     spec["threads"], repeat))


def plan(names, devices, tokens, repeats, protocol="kv-cache", dtype="float32", threads=None, budget_bytes=None):
    """-> (runs, skipped). runs: [(key, spec)] in order, repeats of a model together;
    skipped: [{model, device, reason}] for what does not fit."""
    runs, skipped = [], []
    for device in devices:
        for name in names:
            ok, reason = models.fits(name, device, tokens, protocol=protocol, dtype=dtype, budget_bytes=budget_bytes)
            if not ok:
                skipped.append({"model": name, "device": device, "reason": reason})
                continue
            spec = dict(model=name, device=device, dtype=dtype, tokens=tokens, threads=threads, protocol=protocol)
            runs += [(run_key(spec, r), dict(spec, repeat=r)) for r in range(repeats)]
    return runs, skipped


# ---------------------------------------------------------------------------------------------
# The results file: one JSON object per line, appended as each run ends

def read_rows(path):
    """Every complete row of a runs.jsonl (a line torn by a kill is ignored)."""
    rows = []
    if Path(path).exists():
        for line in Path(path).read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
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


def execute(runs, results_path, runner=run_child, timeout=None, retry_failed=False, progress=True, estimate=None):
    """Run every planned run not already in results_path, appending each row as it finishes.
    timeout: seconds or a function spec -> seconds. estimate: spec -> expected seconds (ETA weights)."""
    done = {r["key"] for r in read_rows(results_path) if r.get("status") == "ok" or not retry_failed}
    pending = [(k, s) for k, s in runs if k not in done]
    weights = [max(1.0, estimate(s)) if estimate else 1.0 for _, s in pending]
    bar = tqdm(total=sum(weights), disable=not progress, unit="s", unit_scale=True, dynamic_ncols=True,
               bar_format="{desc} {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]")
    try:
        for i, ((key, spec), w) in enumerate(zip(pending, weights)):
            bar.set_description(f"run {i + 1}/{len(pending)} {spec['model']} {spec['device']} #{spec['repeat']}")
            limit = timeout(spec) if callable(timeout) else timeout
            result = runner({k: v for k, v in spec.items() if k != "repeat"}, limit)
            protocol = key.split("|")[3]                   # "recurrent" for RWKV, whatever the status
            append_row(results_path, {"key": key, **spec, **result, "protocol": protocol})
            if result["status"] != "ok":
                bar.write(f"{spec['model']} ({spec['device']}): {result['status']}: {result.get('error', '')}")
            bar.update(w)
    finally:
        bar.close()
    return len(pending)


# ---------------------------------------------------------------------------------------------
# Summaries

def summarize(rows, protocol):
    """Median over repeats per (model, device) for one protocol (RWKV rows count for both). A run
    retried with --retry-failed counts once, with its latest result."""
    groups = {}
    for r in {r["key"]: r for r in rows}.values():
        if r["protocol"] not in (protocol, "recurrent"):
            continue
        groups.setdefault((r["model"], r["device"], r["tokens"]), []).append(r)
    out = []
    for (name, device, tokens), group in groups.items():
        ok = [r for r in group if r["status"] == "ok"]
        row = {"family": models.family_of(name), "model": name, "n_params": models.n_params(name),
               "device": device, "tokens": tokens, "protocol": protocol, "runs_ok": len(ok), "runs": len(group),
               "status": "ok" if ok else group[-1]["status"], "error": "" if ok else group[-1].get("error", "")}
        for m in METRICS:
            vals = [r[m] for r in ok if r.get(m) is not None]
            row[m] = statistics.median(vals) if vals else None
        if ok:
            row.update(mem_method=ok[0]["mem_method"], expected_runtime_bytes=ok[0].get("expected_runtime_bytes"),
                       synthetic=ok[0]["synthetic"], threads=ok[0]["threads"])
        out.append(row)
    return sorted(out, key=lambda r: (r["device"], r["family"] != models.RWKV, r["family"], r["n_params"]))


CSV_FIELDS = ["family", "model", "n_params", "device", "protocol", "tokens", "status", "runs_ok", "runs", "total_s",
              "prefill_s", "decode_s", "tokens_per_s", "decode_tokens_per_s", "weight_GBps", "bandwidth_pct",
              "peak_bytes", "expected_runtime_bytes", "mem_method", "threads", "synthetic", "error"]


def write_csv(path, summary):
    tmp = Path(path).with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(summary)
    os.replace(tmp, path)


def markdown(summary, skipped, protocol, machines):
    lines = [f"Protocol: **{protocol}** (" + ("transformers with a KV cache" if protocol == "kv-cache" else
             "transformers recompute the whole sequence every step, no KV cache, as the paper's code") +
             "; RWKV is recurrent either way). Median of the repeats; each run a fresh process.", ""]
    for m in machines.values():
        lines.append(f"- {m['device']}: {m['device_name']}, {m['threads']} threads, measured read bandwidth "
                     f"{m['read_bandwidth_GBps']:.1f} GB/s, fp32 GEMM {m['gemm_fp32_GFLOPs']:.0f} GFLOP/s")
    lines += ["", "| model | params | device | tokens | total time (s) | tokens/s | weight GB/s (% of measured) "
              "| peak mem excl. params | state / KV alone | runs |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary:
        if r["status"] != "ok":
            lines.append(f"| {r['model']} | {fmt_params(r['n_params'])} | {r['device']} | {r['tokens']} | "
                         f"{r['status']}: {r['error']} | | | | | 0/{r['runs']} |")
            continue
        bw = f"{r['weight_GBps']:.1f}" + (f" ({r['bandwidth_pct']:.0f}%)" if r.get("bandwidth_pct") else "") \
            if r["weight_GBps"] else "-"
        lines.append(f"| {r['model']} | {fmt_params(r['n_params'])} | {r['device']} | {r['tokens']} | "
                     f"{r['total_s']:.2f} | {r['tokens_per_s']:.2f} | {bw} | {fmt_bytes(r['peak_bytes'])} | "
                     f"{fmt_bytes(r['expected_runtime_bytes'])} | {r['runs_ok']}/{r['runs']} |")
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
    paths = [out_dir / f"sweep_{protocol}.csv", out_dir / f"sweep_{protocol}.md", out_dir / f"sweep_{protocol}.json"]
    write_csv(paths[0], summary)
    paths[1].write_text(markdown(summary, skipped, protocol, machines))
    write_json_atomic(paths[2], {"schema": "bench.sweep/1", "protocol": protocol, "machines": machines,
                                 "summary": summary, "skipped": skipped})
    paths += sweep_figures(summary, out_dir, protocol)
    return paths, summary


# ---------------------------------------------------------------------------------------------

def main(argv=None):
    prog = "bench.sweep"
    p = OneLineParser(prog="python -m bench.sweep", description=__doc__)
    p.add_argument("--preset", default="quick", choices=sorted(PRESETS))
    p.add_argument("--models", help="comma-separated names or families (rwkv, pythia, opt, gpt-neo, bloom) "
                                    "instead of the preset's")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cpu,cuda")
    p.add_argument("--protocol", default="kv-cache", choices=["kv-cache", "paper"])
    p.add_argument("--tokens", type=int, help="override the preset's token count")
    p.add_argument("--repeats", type=int, help="override the preset's repeats")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--timeout", type=float, help="seconds per run (default: 600 + 5x the roofline estimate)")
    p.add_argument("--mem-budget-gb", type=float, help="memory budget instead of what is free now")
    p.add_argument("--retry-failed", action="store_true", help="run failed/timed-out rows again")
    p.add_argument("--out", default="results", help="output directory (default results/)")
    p.add_argument("--dry-run", action="store_true", help="print the plan with estimated times, run nothing")
    p.add_argument("--plot-only", action="store_true",
                   help="run nothing; tables and figures from every row of OUT/runs.jsonl with this token count "
                        "(e.g. CPU and GPU runs.jsonl files concatenated)")
    args = p.parse_args(argv)

    preset = PRESETS[args.preset]
    tokens = args.tokens or preset["tokens"]
    repeats = args.repeats or preset["repeats"]
    if tokens <= 0 or repeats <= 0:
        fail(prog, "--tokens and --repeats must be >= 1")
    fams = models.families()
    names = preset["models"] or [n for f in fams.values() for n in f]
    if args.models:
        names = []
        for item in args.models.split(","):
            names += fams.get(item.strip(), [item.strip()])
    try:
        names = [models.canonical(n) for n in names]
    except ValueError as e:
        fail(prog, str(e))
    devices = [d.strip() for d in args.device.split(",")]
    if set(devices) - {"cpu", "cuda"}:
        fail(prog, f"--device must be cpu, cuda or cpu,cuda, got {args.device!r}")
    import torch
    from bench.machine import default_threads, get as machine_get
    threads = args.threads or default_threads()
    skipped = []
    if "cuda" in devices and not torch.cuda.is_available():
        devices.remove("cuda")
        skipped += [{"model": n, "device": "cuda", "reason": "no CUDA GPU on this machine"} for n in names]
    budget = args.mem_budget_gb * 1e9 if args.mem_budget_gb else None
    runs, more_skipped = plan(names, devices, tokens, repeats, args.protocol, "float32", threads, budget)
    skipped += more_skipped
    for s in skipped:
        print(f"skip {s['model']} ({s['device']}): {s['reason']}", file=sys.stderr)
    machines = {d: machine_get(d, threads) for d in devices}
    estimate = lambda s: models.estimate_seconds(s["model"], s["tokens"], machines[s["device"]], protocol=s["protocol"])
    timeout = args.timeout or (lambda s: 600 + 5 * estimate(s))
    out = Path(args.out)
    if args.dry_run:
        done = {r["key"] for r in read_rows(out / "runs.jsonl")}
        for key, spec in runs:
            print(f"{'done' if key in done else 'todo'}  {spec['model']:<18} {spec['device']:<5} #{spec['repeat']}  "
                  f"~{estimate(spec):8.0f} s (roofline estimate)")
        todo = sum(estimate(s) for k, s in runs if k not in done)
        print(f"{len(runs)} runs, {sum(k not in done for k, _ in runs)} to do, ~{todo / 60:.0f} min of generation "
              f"(plus loading and first-use checkpoint writing)")
        return
    if not args.plot_only:
        n = execute(runs, out / "runs.jsonl", timeout=timeout, retry_failed=args.retry_failed, estimate=estimate)
        print(f"{n} runs done, {len(runs) - n} already in {out / 'runs.jsonl'}", file=sys.stderr)
    # every run at this token count (CPU ones at this thread count), not only this plan's: earlier
    # sweeps and runs.jsonl rows from another machine (e.g. the GPU) join the same figures
    rows = [r for r in read_rows(out / "runs.jsonl")
            if r.get("tokens") == tokens and (r.get("device") != "cpu" or r.get("threads") == threads)]
    paths, _ = write_outputs(out, rows, skipped, args.protocol, machines)
    print((out / f"sweep_{args.protocol}.md").read_text())
    print("wrote " + ", ".join(str(x) for x in paths))


if __name__ == "__main__":
    main()
