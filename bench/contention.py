"""Decode speed on a busy machine: quiet vs next to a competing process, for each thread count.

    python -m bench.contention --model rwkv-4-pile-169m [--weights FORMAT] [--threads 1,2]
                               [--competitor cpu,torch-matmul] [--tokens 128] [--repeats 3] [--json out.json]

For each thread count, decode tokens/s (`model.generate(...).decode_tokens_per_s`, greedy, median of
the repeats) with no competitor, then next to each competitor:
  * cpu: one process spinning on one core (a CPU-bound job);
  * torch-matmul: a 2-thread torch process multiplying 1024x1024 matrices in bursts (50 ms on,
    50 ms off), whose OpenMP threads spin between products as torch's do.
Prints a table (tok/s, ratio to the same thread count quiet, ratio to 1-thread quiet) and writes JSON
with --json. Competitors are started per condition and always killed: on return, on an exception,
on Ctrl-C, SIGTERM or SIGHUP, and (Linux) by the kernel if this process dies (PR_SET_PDEATHSIG).
The machine must otherwise be quiet: the load average is recorded and a warning printed if it is high,
and each quiet row records the CPU time other processes (and, in a VM, the hypervisor's steal) took
during it (`others_cpu_pct`, bench.cpuload).
"""
import functools
import os
import signal
import statistics
import subprocess
import sys
import time

COMPETITORS = {
    "cpu": "while True:\n    pass\n",
    "torch-matmul": (
        "import time, torch\n"
        "torch.set_num_threads(2)\n"
        "a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)\n"
        "while True:\n"
        "    t = time.perf_counter()\n"
        "    while time.perf_counter() - t < 0.05:\n"
        "        a @ b\n"
        "    time.sleep(0.05)\n"),
}
SETTLE_S = 1.0                      # competitor start-up (imports) before measuring
PROMPT = list(range(1, 17))         # token ids of a short prompt


def competitor_env():
    """The environment as the user gave it: a competing torch program keeps libgomp's default spin
    (the engine's GOMP_SPINCOUNT, set at import, would make it a gentler neighbour than it is)."""
    import rwkv_kernels
    env = dict(os.environ)
    if rwkv_kernels.SPIN_SET_HERE:
        env.pop("GOMP_SPINCOUNT", None)
    return env


def start_competitor(name):
    """A competitor process, SIGKILLed by the kernel if this process dies (however it dies)."""
    from rwkv_engine.process import die_with_parent
    return subprocess.Popen([sys.executable, "-c", COMPETITORS[name]], stdin=subprocess.DEVNULL, env=competitor_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=functools.partial(die_with_parent, signal.SIGKILL))


def stop(procs):
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait()


def decode_tokens_per_s(model, threads, tokens, repeats):
    import torch
    torch.set_num_threads(threads)
    model.generate(PROMPT, max_new_tokens=8, temperature=0)            # warm-up
    runs = [model.generate(PROMPT, max_new_tokens=tokens, temperature=0).decode_tokens_per_s
            for _ in range(repeats)]
    return statistics.median(runs), runs


def measure(model, threads, conditions, tokens, repeats):
    """[{threads, condition, tok_s, runs}] for each condition ("quiet" or a competitor name); quiet
    rows also carry others_cpu_pct (CPU time of other processes and steal during the runs)."""
    from bench.cpuload import OthersMeter
    rows = []
    for cond in conditions:
        procs = [] if cond == "quiet" else [start_competitor(cond)]
        try:
            time.sleep(SETTLE_S if procs else 0)
            if any(p.poll() is not None for p in procs):
                raise RuntimeError(f"competitor {cond!r} exited early")
            meter = OthersMeter().start()
            tok_s, runs = decode_tokens_per_s(model, threads, tokens, repeats)
            others = meter.stop()["others_cpu_pct"]
        finally:
            stop(procs)
        rows.append({"threads": threads, "condition": cond, "tok_s": round(tok_s, 2),
                     "runs": [round(r, 2) for r in runs]})
        if cond == "quiet":
            rows[-1]["others_cpu_pct"] = None if others is None else round(others, 1)
        print(f"  threads {threads}  {cond:13} {tok_s:7.1f} tok/s", file=sys.stderr, flush=True)
    return rows


def add_ratios(rows):
    quiet = {r["threads"]: r["tok_s"] for r in rows if r["condition"] == "quiet"}
    one = quiet.get(1)
    for r in rows:
        r["vs_quiet"] = round(r["tok_s"] / quiet[r["threads"]], 3)
        r["vs_1thread_quiet"] = round(r["tok_s"] / one, 3) if one else None
    return rows


def weights_line(model, weights, facts):
    """The line above the table: the model, its weight format, where the weights come from (synthetic
    weights say so) and the CPU by name."""
    src = "synthetic weights (the release's shapes)" if facts["synthetic"] else f"weights from {facts['provenance']}"
    return f"{model}, {weights}, {src}; cpu: {facts['device_name']}"


def table(rows):
    lines = [f"{'threads':>7}  {'next to':13} {'tok/s':>8} {'x quiet':>8} {'x 1-thread quiet':>17}"]
    for r in rows:
        one = "" if r["vs_1thread_quiet"] is None else f"{r['vs_1thread_quiet']:.2f}"
        lines.append(f"{r['threads']:>7}  {r['condition']:13} {r['tok_s']:8.1f} {r['vs_quiet']:8.2f} {one:>17}")
    return "\n".join(lines)


def parse_args(argv):
    from bench.cli import WEIGHT_FORMATS
    from bench.generate import OneLineParser
    p = OneLineParser(prog="python -m bench.contention", description=__doc__)
    p.add_argument("--model", default="rwkv-4-pile-169m")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--weights", default=None, help=f"weight format (as load(weights=)): {', '.join(WEIGHT_FORMATS)}")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    p.add_argument("--competitor", default=",".join(COMPETITORS),
                   help=f"comma-separated, of {', '.join(COMPETITORS)} (default all)")
    p.add_argument("--tokens", type=int, default=128, help="decode tokens per run (default 128)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None, help="write the rows and the machine's load here")
    args = p.parse_args(argv)
    try:
        args.threads = [int(t) for t in args.threads.split(",")]
    except ValueError:
        p.error(f"--threads must be comma-separated integers, got {args.threads!r}")
    if any(t < 1 for t in args.threads):
        p.error(f"--threads must be >= 1, got {args.threads}")
    args.competitor = [c for c in args.competitor.split(",") if c]
    unknown = [c for c in args.competitor if c not in COMPETITORS]
    if unknown:
        p.error(f"unknown --competitor {unknown[0]!r}: use {', '.join(COMPETITORS)}")
    if args.tokens < 2 or args.repeats < 1:
        p.error("--tokens must be >= 2 and --repeats >= 1")
    if args.weights is not None and args.weights not in WEIGHT_FORMATS:
        p.error(f"unknown --weights {args.weights!r}: use one of {', '.join(WEIGHT_FORMATS)}")
    if args.json:
        from bench.cli import check_writable_file
        try:
            check_writable_file(args.json, "--json")
        except ValueError as e:
            p.error(str(e))
    return args


def _exit_on(signum, _frame):
    raise SystemExit(128 + signum)         # unwinds through the `finally` that kills competitors


def main(argv=None):
    from bench.cli import run_command
    return run_command("bench.contention", _main, argv)


def _main(argv=None):
    args = parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit_on)
    import rwkv_engine
    model = rwkv_engine.load(args.model, checkpoint=args.checkpoint, weights=args.weights)
    load_before = os.getloadavg()[0]
    if load_before > 0.5:
        print(f"warning: load average {load_before:.1f} before the runs: the machine is not quiet, "
              "the figures include other processes' noise", file=sys.stderr)
    rows = []
    for threads in args.threads:
        rows += measure(model, threads, ["quiet", *args.competitor], args.tokens, args.repeats)
    rows = add_ratios(rows)
    from bench.machine import cpu_model
    facts = {"synthetic": bool(model.synthetic), "provenance": "synthetic" if model.synthetic else str(model.source),
             "device_name": cpu_model()}
    print(weights_line(args.model, model.weights, facts))
    print(table(rows))
    if args.json:
        from bench.cli import write_json_atomic
        write_json_atomic(args.json, {"model": args.model, "weights": model.weights, **facts, "tokens": args.tokens,
                                      "repeats": args.repeats, "cpus": os.cpu_count(), "load_avg_before": load_before,
                                      "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
