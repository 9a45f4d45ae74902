"""Load test of `rwkv_engine.serve`: N concurrent clients on 127.0.0.1 against one server process.

    python -m bench.serve --model rwkv-4-pile-169m
    python -m bench.serve --model rwkv-4-pile-169m --clients 1,2,4 --requests-per-client 2 --max-tokens 32
    python -m bench.serve --model rwkv-4-pile-169m --clients 1,16 --weights int8 --against float32

For each N in --clients, N clients each send K streaming completion requests one after another
(distinct prompts: the paper's prompt plus a request number; temperature 1, seeded, `ignore_eos`, so
each request generates exactly M tokens) and the benchmark reports:
  * aggregate tokens/s: all generated tokens / wall time of the phase;
  * per-stream tokens/s: median over requests of (tokens - 1) / (last token - first token);
  * time to first token (request sent -> first text chunk received), p50 and p99;
  * the server's peak RSS during the phase (VmHWM after a reset via /proc/PID/clear_refs, or RSS
    sampled every 10 ms where that is not allowed), and idle RSS after one warm-up request;
  * the bytes in the server's prefix-state cache after the phase (its `rwkv_prefix_cache_bytes`
    metric: part of the RSS, bounded by --prefix-cache-mb), and, in the JSON, the CPU seconds the
    server and the clients used during the phase;
  * "others %": CPU time taken during the phase by anything but the server and the clients (other
    processes, and in a VM the hypervisor's steal) as a share of the machine; above 5% the phase is
    flagged, as its numbers are not quiet-machine numbers. --wait-quiet S waits (at most S seconds)
    before each phase for the machine to be quiet.
  * what the server's scheduler thread did in the phase, from its own /metrics counters: decode steps,
    mean streams per step, mean ms per decode forward (to set beside the library's step at that batch:
    `bench.modes --profile --batch N`), and the shares of the phase's wall time in decode forwards,
    prompt-chunk forwards and the output step (sampling, stop checks, text, events); the rest is the
    thread waiting for work (between a client's requests, the phase's ramp and tail) and its bookkeeping.
  * "clients %": the load-generating clients' own CPU time (this process) as a share of the machine.
    They run on the server's cores, so on a small machine they take time the server would have: a
    client on another machine would not.
Beside them, in the same run: the library's single-stream decode tokens/s (`bench.generate`'s
measurement in a fresh process, same prompt, sampling and thread count) -- the server's overhead at N=1.
The server is started on a free port and always stopped (also on an error or Ctrl-C).
Outputs: a table, JSON (--json) and a PNG plot (--plot).
With --against W2 a second server with weights W2 runs beside the first (both loaded at once: the
memory of both), the phases alternating between them at each N (so a slower spell of the machine falls
on both), and the run prints W2's table too and, per N, the aggregate of --weights over W2's: the
comparison of two formats' servers in the same minutes. The JSON holds W2's result under "against" and
the ratios under "aggregate_ratio"; the plot is --weights'.
--rounds R runs the whole sequence of phases R times (both servers alternating within each round; each
round's requests have new numbers, so its prompts are new to the prefix cache, as the first round's). A
machine whose speed drifts by 20-30% over minutes (a VM beside other tenants) moves one round's ratio
by as much: R rounds give each N's median and range. The tables then show, per N, the round with the
median aggregate; the ratios and the N=16 / N=1 scaling are medians of the rounds' own ratios, printed
with their range; the JSON holds every round's phases under "rounds" and the ratios per round under
"aggregate_ratio_rounds".

    python -m bench.serve --model rwkv-4-pile-169m --clients 1,16 --weights int8 --against float32 --rounds 3
"""
import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

from bench import DRAGON_PROMPT
from bench.cli import (OneLineParser, check_writable_file, command, fail, nonnegative_float, save_figure_atomic,
                       write_json_atomic)
from bench.cpuload import busy_warning, n_cpus, others_share, read_proc_stat, wait_quiet
from bench.runner import child_env, run_child
from bench.machine import device_name

START_TIMEOUT = 600


# -- the server process ---------------------------------------------------------------------------
class ServerProcess:
    def __init__(self, args, max_batch):
        cmd = [sys.executable, "-m", "rwkv_engine.serve", "--model", args.model, "--device", args.device,
               "--dtype", args.dtype, "--port", "0", "--max-batch", str(max_batch),
               "--max-queue", str(4 * max_batch), "--max-tokens", str(args.max_tokens),
               "--prefix-cache-mb", str(args.prefix_cache_mb), "--shutdown-timeout", "2"]
        if args.checkpoint:
            cmd += ["--checkpoint", args.checkpoint]
        if args.weights:
            cmd += ["--weights", args.weights]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=child_env(args.threads))
        self.lines, self.url, ready = [], None, threading.Event()
        threading.Thread(target=self._drain, args=(ready,), daemon=True).start()
        if not ready.wait(START_TIMEOUT) or self.url is None:
            self.stop()
            raise RuntimeError("the server did not start: " + "".join(self.lines[-5:]).strip())

    def _drain(self, ready):
        for line in self.proc.stdout:
            self.lines.append(line)
            m = re.search(r"ready at (http://\S+)", line)
            if m:
                self.url = m.group(1)
                ready.set()
        ready.set()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class PeakRss:
    """Peak RSS of another process between reset() and read()."""

    def __init__(self, pid):
        self.pid, self._peak, self._stop = pid, 0, threading.Event()
        self.method = "clear_refs" if self._clear_refs() else "sampler"
        self._sampler = None

    def rss(self):
        with open(f"/proc/{self.pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _clear_refs(self):
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def reset(self):
        if self.method == "clear_refs":
            self._clear_refs()
            return
        self._peak, self._stop = self.rss(), threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self):
        while not self._stop.wait(0.01):
            self._peak = max(self._peak, self.rss())

    def read(self):
        if self.method == "clear_refs":
            with open(f"/proc/{self.pid}/status") as f:
                return int(re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024
        self._stop.set()
        self._sampler.join()
        return max(self._peak, self.rss())


# -- the clients ----------------------------------------------------------------------------------
async def one_request(session, url, model, prompt, max_tokens, seed):
    """One streaming completion: (tokens, ttft_s, per-stream tokens/s)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0, "seed": seed,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    async with session.post(f"{url}/v1/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {(await r.read()).decode(errors='replace')[:200]}")
        async for line in r.content:                    # the SSE stream, line by line
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"]:
                last = time.perf_counter()
                first = first or last
    per_stream = (tokens - 1) / (last - first) if tokens > 1 and last > first else float("nan")
    return tokens, first - t0, per_stream


async def phase(url, model, n_clients, requests_per_client, max_tokens, first_request=0):
    """n_clients clients, each sending requests first_request .. first_request + requests_per_client - 1
    one after another (a later round starts past the earlier rounds' numbers: its prompts are new to
    the prefix cache, as round 1's were).

    The clients are aiohttp's (its HTTP parser is in C): they share the server's cores, and each token
    they read costs them ~50 us of CPU, against ~140 us with httpx's pure-Python parser (Intel Xeon,
    16 clients): CPU the server would otherwise have had."""
    import aiohttp
    connector = aiohttp.TCPConnector(limit=n_clients + 4)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        async def client_loop(c):
            return [await one_request(session, url, model, f"{DRAGON_PROMPT} ({c}.{k})", max_tokens, 1000 * c + k)
                    for k in range(first_request, first_request + requests_per_client)]
        t0 = time.perf_counter()
        per_client = await asyncio.gather(*(client_loop(c) for c in range(n_clients)))
        wall = time.perf_counter() - t0
    results = [r for rs in per_client for r in rs]
    ttft = sorted(r[1] for r in results)
    return {"clients": n_clients, "requests": len(results), "tokens": sum(r[0] for r in results),
            "wall_s": wall, "aggregate_tok_s": sum(r[0] for r in results) / wall,
            "per_stream_tok_s": statistics.median(r[2] for r in results),
            "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99)}


def percentile(sorted_values, q):
    """Nearest-rank percentile of an ascending list."""
    k = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[k]


def cpu_seconds(server_pid):
    """(server process, this process) user + system CPU seconds so far: the server's in clock ticks
    (/proc), this process's to the nanosecond (its clients can use less than a tick in a short phase)."""
    import psutil
    server = psutil.Process(server_pid).cpu_times()
    return server.user + server.system, time.process_time()


SERVER_COUNTERS = {"prefix_cache_bytes": "rwkv_prefix_cache_bytes",
                   "decode_s": "rwkv_decode_forward_seconds_total",
                   "prefill_s": "rwkv_prefill_forward_seconds_total",
                   "output_s": "rwkv_output_seconds_total",
                   "decode_steps": "rwkv_decode_batch_size_count",
                   "decode_rows": "rwkv_decode_batch_size_sum"}


def server_counters(url):
    """The server's own counts from its /metrics: the bytes in its prefix-state cache, and the wall
    seconds its scheduler thread spent so far in decode forwards, prompt-chunk forwards and the output
    step (sampling, the streams' loops), with its decode steps and the streams they stepped."""
    values = {}
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as r:
        text = r.read().decode()
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        values[name] = value
    missing = [m for m in SERVER_COUNTERS.values() if m not in values]
    if missing:
        raise RuntimeError(f"the server's /metrics has no {', '.join(missing)}")
    return {k: float(values[m]) for k, m in SERVER_COUNTERS.items()}


def prefix_cache_bytes(url):
    """The server's own count of bytes in its prefix-state cache (`rwkv_prefix_cache_bytes` of /metrics)."""
    return int(server_counters(url)["prefix_cache_bytes"])


def server_time(before, after, wall_s):
    """What the server's scheduler did over a phase, from its counters before and after: decode steps,
    mean streams per step, mean ms per decode forward, and the shares of the phase's wall time spent in
    decode forwards, prompt-chunk forwards and the output step (the rest: waiting for requests, HTTP)."""
    d = {k: after[k] - before[k] for k in SERVER_COUNTERS if k != "prefix_cache_bytes"}
    steps = d["decode_steps"]
    return {"decode_steps": int(steps), "streams_per_step": d["decode_rows"] / steps if steps else None,
            "step_ms": 1000 * d["decode_s"] / steps if steps else None,
            **{f"{k[:-2]}_pct": 100 * d[k] / wall_s for k in ("decode_s", "prefill_s", "output_s")}}


# -- report ---------------------------------------------------------------------------------------
def table(result):
    lib = result["library_decode_tok_s"]
    rows = [f"library single-stream decode: {lib:.1f} tok/s   (state {result['state_bytes'] / 1024:.0f} KiB "
            f"per stream, idle server RSS {result['idle_rss_bytes'] / 2**20:.0f} MiB, RSS via {result['rss_method']})",
            f"{'N':>4} {'aggregate tok/s':>16} {'per-stream tok/s':>17} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12} "
            f"{'peak RSS MiB':>13} {'- idle MiB':>11} {'prefix cache MiB':>17} {'others %':>9} {'clients %':>10}"]
    for p in result["phases"]:
        rows.append(f"{p['clients']:>4} {p['aggregate_tok_s']:>16.1f} {p['per_stream_tok_s']:>17.1f} "
                    f"{1000 * p['ttft_p50_s']:>12.0f} {1000 * p['ttft_p99_s']:>12.0f} "
                    f"{p['peak_rss_bytes'] / 2**20:>13.0f} {(p['peak_rss_bytes'] - result['idle_rss_bytes']) / 2**20:>11.1f} "
                    f"{p['prefix_cache_bytes'] / 2**20:>17.1f} {_pct(p.get('others_cpu_pct')):>9} "
                    f"{_pct(p.get('clients_cpu_pct')):>10}")
    timed = [p for p in result["phases"] if p.get("server_time")]
    if timed:
        rows.append(f"the server's scheduler thread, per phase (its /metrics): {'N':>4} {'decode steps':>13} "
                    f"{'streams/step':>13} {'ms/step':>8} {'decode %':>9} {'prompts %':>10} {'output %':>9} "
                    f"{'rest %':>7}")
        pad = " " * len("the server's scheduler thread, per phase (its /metrics): ")
        for p in timed:
            t = p["server_time"]
            rest = 100 - t["decode_pct"] - t["prefill_pct"] - t["output_pct"]
            rows.append(f"{pad}{p['clients']:>4} {t['decode_steps']:>13} {_num(t['streams_per_step'], 1):>13} "
                        f"{_num(t['step_ms'], 2):>8} {t['decode_pct']:>9.1f} {t['prefill_pct']:>10.1f} "
                        f"{t['output_pct']:>9.1f} {rest:>7.1f}")
    return "\n".join(rows)


def _num(x, digits):
    return "-" if x is None else f"{x:.{digits}f}"


def _pct(x):
    return "-" if x is None else f"{x:.1f}"


def rounds_of(result):
    """Every round's phases (a result without "rounds": its phases, one round)."""
    return result.get("rounds") or [result["phases"]]


def spread(values, fmt):
    """" (median of R rounds: lo-hi)" for several values, "" for one."""
    if len(values) < 2:
        return ""
    return f" (median of {len(values)} rounds: {fmt.format(min(values))}-{fmt.format(max(values))})"


def scaling_rounds(result, n=16, base=1):
    """Aggregate at N=n over N=base, per round where both ran."""
    out = []
    for phases in rounds_of(result):
        by_n = {p["clients"]: p["aggregate_tok_s"] for p in phases}
        if n in by_n and base in by_n:
            out.append(by_n[n] / by_n[base])
    return out


def target_checks(result):
    """The issue's targets, each as (description, value, ok) where the data allows (over several rounds:
    the median round's phase, and the median of the rounds' own N=16 / N=1 ratios)."""
    by_n = {p["clients"]: p for p in result["phases"]}
    lib, checks = result["library_decode_tok_s"], []
    if 1 in by_n:
        share = by_n[1]["per_stream_tok_s"] / lib
        checks.append(("server N=1 per-stream / library decode >= 90%", f"{100 * share:.0f}%", share >= 0.9))
    xs = scaling_rounds(result)
    if xs:
        x = statistics.median(xs)
        checks.append(("aggregate N=16 >= 8x N=1", f"{x:.1f}x{spread(xs, '{:.1f}')}", x >= 8))
    if 16 in by_n and 32 in by_n:
        ok = by_n[32]["aggregate_tok_s"] >= by_n[16]["aggregate_tok_s"]
        checks.append(("aggregate N=32 >= N=16", f"{by_n[32]['aggregate_tok_s']:.0f} vs "
                       f"{by_n[16]['aggregate_tok_s']:.0f} tok/s", ok))
    if 32 in by_n:
        extra = by_n[32]["peak_rss_bytes"] - result["idle_rss_bytes"]
        limit = 32 * result["state_bytes"] + 64 * 2**20
        cache = by_n[32]["prefix_cache_bytes"] - result["idle_prefix_cache_bytes"]
        checks.append(("peak RSS N=32 - idle <= 32 x state + 64 MiB",
                       f"{extra / 2**20:.1f} MiB (limit {limit / 2**20:.1f}; of it, the prefix cache grew by "
                       f"{cache / 2**20:.1f} MiB since idle, bounded by --prefix-cache-mb)", extra <= limit))
    return checks


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter
    ns = [p["clients"] for p in result["phases"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.plot(ns, [p["aggregate_tok_s"] for p in result["phases"]], "o-", color="tab:red", label="aggregate")
    ax1.plot(ns, [p["per_stream_tok_s"] for p in result["phases"]], "s-", color="tab:blue", label="per stream")
    ax1.axhline(result["library_decode_tok_s"], color="gray", ls="--", label="library, 1 stream")
    ax1.set(xlabel="concurrent clients N", ylabel="generated tokens/s",
            title=f"{result['model']} ({result['device']}, {result['weights'] or result['dtype']}"
                  f"{', synthetic weights' if result['synthetic'] else ''}): throughput")
    ax2.plot(ns, [1000 * p["ttft_p50_s"] for p in result["phases"]], "o-", label="p50")
    ax2.plot(ns, [1000 * p["ttft_p99_s"] for p in result["phases"]], "s-", label="p99")
    ax2.set(xlabel="concurrent clients N", ylabel="ms", title="time to first token")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    try:
        save_figure_atomic(fig, path)
    finally:
        plt.close(fig)


def kernel_isa(device):
    """The instruction set the C kernels run at on this CPU ("avx512", "avx2"), None on a GPU or without them."""
    if device != "cpu":
        return None
    from rwkv_kernels import cpu_c
    return cpu_c.best_isa()


# -- main -----------------------------------------------------------------------------------------
def parse_args(argv, prog):
    p = OneLineParser(prog=prog, description=__doc__)
    p.add_argument("--model", default="rwkv-4-pile-169m")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--weights", default=None, help="weight format for server and library run (as load(weights=))")
    p.add_argument("--against", default=None, metavar="WEIGHTS",
                   help="also a server with these weights, phases alternating; prints the aggregate ratio per N")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of server and library run (default: all)")
    p.add_argument("--clients", default="1,2,4,8,16,32", help="comma-separated N (default 1,2,4,8,16,32)")
    p.add_argument("--requests-per-client", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=128, help="tokens generated per request (default 128)")
    p.add_argument("--prefix-cache-mb", type=nonnegative_float, default=32,
                   help="server's prefix-state cache (default 32; it fills during the run and counts in RSS)")
    p.add_argument("--library-repeats", type=int, default=3, help="library decode runs (median; default 3)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every phase this many times, the servers alternating within each round; tables show "
                        "each N's median round, ratios the median of the rounds' ratios with their range (default 1)")
    p.add_argument("--wait-quiet", type=nonnegative_float, default=0, metavar="SECONDS",
                   help="before each phase, wait up to this long for other processes to go quiet (default 0)")
    p.add_argument("--json", default="results/serve.json")
    p.add_argument("--plot", default="results/serve.png")
    args = p.parse_args(argv)
    try:
        args.client_counts = sorted({int(n) for n in args.clients.split(",")})
    except ValueError:
        fail(prog, f"--clients must be comma-separated integers, got {args.clients!r}")
    if not args.client_counts or args.client_counts[0] < 1:
        fail(prog, f"--clients must all be >= 1, got {args.clients!r}")
    for name in ("requests_per_client", "max_tokens", "library_repeats", "rounds"):
        if getattr(args, name) < 1:
            fail(prog, f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.threads is not None and args.threads < 1:
        fail(prog, f"--threads must be >= 1, got {args.threads}")
    if args.against is not None and args.against == (args.weights or args.dtype):
        fail(prog, f"--against {args.against}: the same weights as the run itself (use another format)")
    check_writable_file(args.json, "--json")          # before any work (the top level makes it one line)
    check_writable_file(args.plot, "--plot")
    return args


def library_decode(args):
    """Single-stream decode tokens/s of the library in a fresh process (bench.generate's measurement), and
    what that run says of the weights: {"synthetic": bool, "provenance": "synthetic" or the checkpoint}."""
    spec = dict(model=args.model, device=args.device, dtype=args.dtype, weights=args.weights, tokens=args.max_tokens,
                prompt=DRAGON_PROMPT, checkpoint=args.checkpoint, threads=args.threads)
    runs = [run_child(spec, timeout=1800) for _ in range(args.library_repeats)]
    bad = next((r for r in runs if r["status"] != "ok"), None)
    if bad:
        raise RuntimeError(f"library decode run failed: {bad.get('error')}")
    return (statistics.median(r["decode_tokens_per_s"] for r in runs),
            {"synthetic": bool(runs[0].get("synthetic")), "provenance": str(runs[0].get("provenance", ""))})


def weights_line(result):
    """The line above the table: model, weight format, where the weights come from (synthetic weights say
    so), the device by name and the kernels' instruction set."""
    fmt = result["weights"] or result["dtype"]
    src = "synthetic weights (the release's shapes)" if result["synthetic"] else f"weights from {result['provenance']}"
    isa = f", {result['kernels']} kernels" if result.get("kernels") else ""
    return f"{result['model']}, {fmt}, {src}; {result['device']}: {result['device_name']}{isa}"


def state_bytes(args):
    from rwkv_engine import get_config
    from rwkv_engine.checkpoint import read_checkpoint
    from rwkv_engine.state import State
    cfg = get_config(args.model) if not args.checkpoint and "/" not in args.model else None
    if cfg is None:
        _, cfg = read_checkpoint(args.checkpoint or args.model)
    from rwkv_engine.model import as_dtype
    return State.zeros(cfg.n_layer, 1, cfg.n_embd, "meta", as_dtype(args.dtype)).nbytes


def new_result(args):
    return {"model": args.model, "device": args.device, "device_name": device_name(args.device),
            "kernels": kernel_isa(args.device), "dtype": args.dtype, "weights": args.weights,
            "threads": args.threads,
            "requests_per_client": args.requests_per_client, "max_tokens": args.max_tokens,
            "prefix_cache_mb": args.prefix_cache_mb, "phases": [], "rounds": []}


def measure_phase(server, rss, args, n, first_request=0):
    """One phase of n clients against `server`, with its memory and CPU accounting."""
    if args.wait_quiet:
        quiet, pct = wait_quiet(args.wait_quiet)
        if not quiet:
            print(f"  machine still busy after --wait-quiet {args.wait_quiet:.0f} s ({pct:.0f}% others): "
                  "running", flush=True)
    rss.reset()
    counters0 = server_counters(server.url)
    cpu0, busy0 = cpu_seconds(server.proc.pid), read_proc_stat()
    p = asyncio.run(phase(server.url, args.model, n, args.requests_per_client, args.max_tokens, first_request))
    p["peak_rss_bytes"] = rss.read()
    # CPU seconds over the phase: the server, and this process (the clients share the cores)
    p["server_cpu_s"], p["client_cpu_s"] = (b - a for a, b in zip(cpu0, cpu_seconds(server.proc.pid)))
    busy1 = read_proc_stat()
    p["others_cpu_pct"] = None if busy0 is None or busy1 is None else others_share(
        busy0, busy1, 0.0, p["server_cpu_s"] + p["client_cpu_s"], p["wall_s"], n_cpus())["others_cpu_pct"]
    p["clients_cpu_pct"] = 100 * p["client_cpu_s"] / (p["wall_s"] * n_cpus())
    if busy_warning(p["others_cpu_pct"]):
        print(f"  N={n}: {busy_warning(p['others_cpu_pct'])}", flush=True)
    counters1 = server_counters(server.url)
    p["prefix_cache_bytes"] = int(counters1["prefix_cache_bytes"])
    p["server_time"] = server_time(counters0, counters1, p["wall_s"])
    return p


def report(result):
    result["targets"] = [{"target": t, "value": v, "ok": ok} for t, v, ok in target_checks(result)]
    print(weights_line(result))
    print(table(result))
    for t in result["targets"]:
        print(f"  {'ok ' if t['ok'] else 'MISS'} {t['target']}: {t['value']}")


def round_ratios(result, other):
    """{N: [aggregate of result's server / other's, one per round]} for the N both measured, each
    ratio of two phases of the same round (run back to back)."""
    out = {}
    for mine, theirs in zip(rounds_of(result), rounds_of(other)):
        rate = {p["clients"]: p["aggregate_tok_s"] for p in theirs}
        for p in mine:
            if p["clients"] in rate:
                out.setdefault(p["clients"], []).append(p["aggregate_tok_s"] / rate[p["clients"]])
    return out


def aggregate_ratios(result, other):
    """{N: the median over rounds of the aggregate of result's server / other's} for the N both measured."""
    return {n: statistics.median(xs) for n, xs in round_ratios(result, other).items()}


def median_round(phases_per_round):
    """Per N (in order), the phase of the round whose aggregate is the median (the lower one of an even
    count): a phase that was measured, not an average of several."""
    return [sorted(ps, key=lambda p: p["aggregate_tok_s"])[(len(ps) - 1) // 2] for ps in zip(*phases_per_round)]


def against_checks(result, other):
    """The targets that compare two servers, as (description, value, ok): the int8 server's aggregate at
    N=16 against the float32 server's (issue 20: >= 1.5x)."""
    xs = round_ratios(result, other).get(16)
    if result["weights"] == "int8" and (other["weights"] or other["dtype"]) == "float32" and xs:
        x16 = statistics.median(xs)
        return [("int8 aggregate N=16 >= 1.5x float32's", f"{x16:.2f}x{spread(xs, '{:.2f}')}", x16 >= 1.5)]
    return []


@command("bench.serve")
def main(argv=None, prog="python -m bench.serve"):
    args = parse_args(argv, prog)
    runs = [args] + ([argparse.Namespace(**{**vars(args), "weights": args.against})] if args.against else [])
    results = [new_result(a) for a in runs]
    try:
        for a, result in zip(runs, results):
            result["state_bytes"] = state_bytes(a)
            print(f"library single-stream decode{f' ({a.weights or a.dtype})' if args.against else ''} ({args.max_tokens} "
                  f"tokens, median of {args.library_repeats} fresh processes)...", flush=True)
            result["library_decode_tok_s"], facts = library_decode(a)
            result.update(facts)
    except (ValueError, RuntimeError, OSError) as e:
        fail(prog, str(e).splitlines()[0])
    servers = []
    try:
        rsss = []
        for a, result in zip(runs, results):
            server = ServerProcess(a, max(args.client_counts))
            servers.append(server)
            asyncio.run(phase(server.url, args.model, 1, 1, min(8, args.max_tokens)))     # warm-up
            rss = PeakRss(server.proc.pid)
            rsss.append(rss)
            result["idle_rss_bytes"], result["rss_method"] = rss.rss(), rss.method
            result["idle_prefix_cache_bytes"] = prefix_cache_bytes(server.url)
        for k in range(args.rounds):
            for result in results:
                result["rounds"].append([])
            for n in args.client_counts:
                for a, result, server, rss in zip(runs, results, servers, rsss):
                    print(f"N={n}{f' ({a.weights or a.dtype})' if args.against else ''}"
                          f"{f' round {k + 1}/{args.rounds}' if args.rounds > 1 else ''}: {n} clients x "
                          f"{args.requests_per_client} requests x {args.max_tokens} tokens...", flush=True)
                    result["rounds"][k].append(measure_phase(server, rss, a, n, k * args.requests_per_client))
        for result in results:
            result["phases"] = median_round(result["rounds"])
    except Exception as e:                     # noqa: BLE001 - one line, exit 2; the servers are stopped below
        fail(prog, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    finally:
        for server, result in zip(servers, results):
            result["server_exit_code"] = server.stop()
    result = results[0]
    report(result)
    if args.against:
        other = results[1]
        report(other)
        result["against"] = other
        result["aggregate_ratio"] = {str(n): x for n, x in aggregate_ratios(result, other).items()}
        result["aggregate_ratio_rounds"] = {str(n): xs for n, xs in round_ratios(result, other).items()}
        for n, xs in round_ratios(result, other).items():
            print(f"  aggregate at N={n}: {result['weights'] or result['dtype']} / {other['weights'] or other['dtype']} "
                  f"= {statistics.median(xs):.2f}x{spread(xs, '{:.2f}')} (phases alternating)")
        for t, v, ok in against_checks(result, other):
            result["targets"].append({"target": t, "value": v, "ok": ok})
            print(f"  {'ok ' if ok else 'MISS'} {t}: {v}")
    write_json_atomic(args.json, result)
    plot(result, args.plot)
    print(f"JSON: {args.json}   plot: {args.plot}")


if __name__ == "__main__":
    main()
