"""Memory and per-token latency against sequence length: the KV cache grows linearly with position,
RWKV's state does not.

    python -m bench.seqlen                                   # one size per family, 512 .. 16k tokens
    python -m bench.seqlen --models rwkv-4-pile-430m,bloom-560m --max-tokens 8192

For each model, one fresh-process run per generation length (default 512, 1k, 2k, 4k, 8k, 16k
tokens after the paper's prompt): its peak memory excluding parameters, measured as in
bench.generate. The baselines preallocate their KV cache for the whole run (gpt-fast style), so
the peak of an N-token run grows with N while a single long run is flat; that is why each length is
its own run. Per-token latency against position comes from the longest run (`step_s` of the
engine's generation loop). OPT, GPT-Neo and Pythia stop at their 2048 positions (learned or trained
position range), which is said in the output; Bloom (ALiBi) and RWKV have no limit. A length whose
estimated memory does not fit is skipped with the reason. Resumable like bench.sweep.
Outputs in OUT (default results/): seqlen_runs.jsonl, seqlen.csv, seqlen_steps.csv, seqlen.png.
"""
import csv
import io
import sys
from pathlib import Path

from bench import PROMPT_TOKENS, models
from bench.cli import (OneLineParser, check_writable_dir, command, fail, fmt_bytes, positive_float, positive_int,
                       write_text_atomic)
from bench.sweep import execute, read_rows, run_key

DEFAULT_MODELS = ["rwkv-4-pile-169m", "pythia-160m", "opt-125m", "gpt-neo-125m", "bloom-560m"]
DEFAULT_LENGTHS = [512, 1024, 2048, 4096, 8192, 16384]
SMOOTH = 33                    # rolling median window for the latency curve


def lengths_for(name, lengths, device, budget_bytes=None):
    """-> (lengths to run, notes). Clips at the model's max positions and skips what does not fit."""
    notes, out = [], []
    limit = models.max_positions(name)
    for n in sorted(lengths):
        if limit is not None and PROMPT_TOKENS + n > limit:
            last = limit - PROMPT_TOKENS
            if last not in out and (not out or last > out[-1]):
                out.append(last)
            notes.append(f"{name}: stops at {limit} positions ({last} generated tokens): its max positions")
            break
        ok, reason = models.fits(name, device, n, PROMPT_TOKENS, budget_bytes=budget_bytes)
        if not ok:
            notes.append(f"{name}: {n} tokens skipped: {reason}")
            break
        out.append(n)
    return out, notes


def rolling_median(xs, window=SMOOTH):
    half = window // 2
    return [sorted(xs[max(0, i - half):i + half + 1])[len(xs[max(0, i - half):i + half + 1]) // 2]
            for i in range(len(xs))]


def curves(rows):
    """One curve per (model, device): peak memory per run length, latency along the longest run."""
    out = []
    groups = {}
    for r in rows:
        if r["status"] == "ok":
            groups.setdefault((r["model"], r["device"]), []).append(r)
    for (name, device), group in groups.items():
        group.sort(key=lambda r: r["tokens"])
        longest = group[-1]
        first = longest["prompt_tokens"] + 1             # position of the first decode step's input
        out.append({"model": name, "family": models.family_of(name), "device": device,
                    "positions": [r["prompt_tokens"] + r["tokens"] for r in group],
                    "peak_bytes": [r["peak_bytes"] for r in group],
                    "step_positions": list(range(first, first + len(longest["step_s"]))),
                    "step_s": rolling_median(longest["step_s"]), "raw_step_s": longest["step_s"],
                    "mem_trace": longest.get("mem_trace", []), "synthetic": longest.get("synthetic")})
    return out


def write_csv_atomic(path, rows):
    buf = io.StringIO(newline="")
    csv.writer(buf).writerows(rows)
    write_text_atomic(path, buf.getvalue())


def write_outputs(out_dir, rows, title):
    from bench.plots import seqlen_figure
    out_dir = Path(out_dir)
    cs = curves(rows)
    table = [["model", "family", "device", "tokens", "positions", "peak_bytes", "total_s", "tokens_per_s",
              "expected_runtime_bytes", "mem_method", "status", "error"]]
    for r in sorted(rows, key=lambda r: (r["model"], r["device"], r["tokens"])):
        table.append([r["model"], models.family_of(r["model"]), r["device"], r["tokens"],
                      PROMPT_TOKENS + r["tokens"], r.get("peak_bytes"), r.get("total_s"), r.get("tokens_per_s"),
                      r.get("expected_runtime_bytes"), r.get("mem_method"), r["status"], r.get("error", "")])
    write_csv_atomic(out_dir / "seqlen.csv", table)
    steps = [["model", "device", "position", "step_s", "peak_bytes_so_far"]]
    for c in cs:
        trace = c["mem_trace"][1:] if c["mem_trace"] else [None] * len(c["raw_step_s"])
        steps += [[c["model"], c["device"], pos, s, m] for pos, s, m in zip(c["step_positions"], c["raw_step_s"], trace)]
    write_csv_atomic(out_dir / "seqlen_steps.csv", steps)
    fig = seqlen_figure(cs, out_dir / "seqlen.png", title)
    return [out_dir / "seqlen.csv", out_dir / "seqlen_steps.csv", fig], cs


@command("bench.seqlen")
def main(argv=None):
    prog = "bench.seqlen"
    p = OneLineParser(prog="python -m bench.seqlen", description=__doc__)
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated model names")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)), help="generation lengths (tokens)")
    p.add_argument("--max-tokens", type=positive_int, default=None, help="drop lengths above this")
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--timeout", type=positive_float, default=None, help="seconds per run (default: none)")
    p.add_argument("--mem-budget-gb", type=positive_float, help="memory budget instead of what is free now")
    p.add_argument("--out", default="results")
    args = p.parse_args(argv)
    try:
        check_writable_dir(args.out, "--out")
        names = list(dict.fromkeys(models.canonical(n.strip()) for n in args.models.split(",") if n.strip()))
        lengths = sorted({int(x) for x in args.lengths.split(",") if x.strip()})
    except ValueError as e:
        fail(prog, str(e))
    if args.max_tokens:
        lengths = [n for n in lengths if n <= args.max_tokens]
    if not lengths or lengths[0] <= 0:
        fail(prog, "--lengths must be positive integers (and not all above --max-tokens)")
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            fail(prog, "--device cuda but no CUDA GPU is available")
    from rwkv_engine.process import usable_cores
    threads = args.threads or usable_cores()
    budget = args.mem_budget_gb * 1e9 if args.mem_budget_gb else None
    runs = []
    for name in names:
        todo, notes = lengths_for(name, lengths, args.device, budget)
        for note in notes:
            print(note, file=sys.stderr)
        for n in todo:
            spec = dict(model=name, device=args.device, dtype="float32", tokens=n, threads=threads,
                        protocol="kv-cache", mode="trace")
            runs.append((run_key(spec, 0), dict(spec, repeat=0)))
    out = Path(args.out)
    execute(runs, out / "seqlen_runs.jsonl", timeout=args.timeout)
    keys = {k for k, _ in runs}
    rows = [r for r in read_rows(out / "seqlen_runs.jsonl") if r["key"] in keys]
    paths, cs = write_outputs(out, rows, f"Memory and latency against position ({args.device}, fp32, KV cache)")
    for c in cs:
        mem = ", ".join(f"{pos}: {fmt_bytes(b)}" for pos, b in zip(c["positions"], c["peak_bytes"]))
        print(f"{c['model']:<20} peak excl. params at position {mem}")
    print("wrote " + ", ".join(str(x) for x in paths))


if __name__ == "__main__":
    main()
