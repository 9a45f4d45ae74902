"""This machine's limits: memory read bandwidth and fp32 GEMM throughput, measured once and cached.

    python -m bench.machine [--threads N] [--device cpu|cuda] [--refresh]

Decode of one token reads every weight once, so "read bandwidth" is the roofline for tokens/s:
tokens/s <= bandwidth / weight_bytes_per_token. The bandwidth is the *median* of a few read-only
kernels (CPU: torch sum and matrix-vector product on the requested threads, numpy sum on one; GPU:
torch sum and matvec) over an array at least 8x the last-level cache (1 GiB at least): one method
that reads from cache or overlaps cannot inflate it. When the methods disagree by more than
DISAGREE_RATIO the result says so (`bandwidth_disagree`) and `describe` prints a warning. The CPU time
other processes used during the measurement is recorded too (`measured_others_cpu_pct`); above
bench.cpuload.BUSY_PCT the baseline is suspect. A suspect baseline (busy or disagreeing) is measured
once more, and if it stays suspect it is used for this run only, never cached, and every table that
divides by it says so (`baseline_problem`). GEMM is a square fp32 matmul (TF32 off on GPU). Clean
results are cached as JSON in $RWKV_ENGINE_CACHE/machine/ keyed by hostname, CPU (or GPU) model and
thread count ($BENCH_MACHINE_CACHE overrides the folder); --refresh measures again. A cache that
cannot be written (disk full) is reported in one line naming the folder, and the run goes on.
"""
import argparse
import errno
import hashlib
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from bench.cli import OneLineParser, check_writable_file, first_line, positive_int, write_json_atomic
from bench.cpuload import BUSY_PCT, OthersMeter
from rwkv_engine import files
from rwkv_engine.files import WriteError
from rwkv_engine.process import usable_cores

REPO = Path(__file__).resolve().parent.parent
CPU_ARRAY_BYTES = 1 << 30      # at least 1 GiB, and at least LLC_FACTOR x the last-level cache
LLC_FACTOR = 8
GPU_ARRAY_BYTES = 4 << 30      # 4 GiB: far beyond the 50-60 MB L2 of an A100/H100/H200
DISAGREE_RATIO = 1.25          # fastest / slowest method above this: the figure is suspect
ATTEMPTS = 2                   # a suspect bandwidth is measured once more before it is used uncached


class MachineError(ValueError):
    """The measurement could not be made (one line, for the command to print)."""


def machine_cache_dir():
    """$BENCH_MACHINE_CACHE, else `machine/` in the engine's cache ($RWKV_ENGINE_CACHE or
    ~/.cache/rwkv_engine)."""
    if os.environ.get("BENCH_MACHINE_CACHE"):
        return Path(os.environ["BENCH_MACHINE_CACHE"])
    return files.cache_dir() / "machine"


def set_threads(n):
    """torch intra-op threads and every BLAS/OpenMP pool numpy uses (threadpoolctl)."""
    torch.set_num_threads(n)
    threadpool_limits(n)


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_id():
    """The CPU's model name with its family and model numbers (AMD's Zen 3 and Zen 4 share a name:
    "AMD EPYC (family 25 model 1)" is a Zen 3, model 17 a Zen 4)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("cpu family", "model") and key not in fields:
                    fields[key] = value.strip()
                if not line.strip() and fields:
                    break
    except OSError:
        pass
    if "cpu family" in fields and "model" in fields:
        return f"{cpu_model()} (family {fields['cpu family']} model {fields['model']})"
    return cpu_model()


def device_name(device):
    return torch.cuda.get_device_name() if device == "cuda" else cpu_model()


def last_level_cache_bytes(root="/sys/devices/system/cpu/cpu0/cache"):
    """Size of the largest cache of CPU 0 (sysfs, Linux), or None."""
    sizes = []
    for size_file in Path(root).glob("index*/size"):
        text = size_file.read_text().strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes) if sizes else None


def cpu_array_bytes(llc=None, ram=None):
    """The CPU test array: >= 1 GiB and >= LLC_FACTOR x the last-level cache, <= 1/4 of RAM."""
    want = max(CPU_ARRAY_BYTES, LLC_FACTOR * (llc or 0))
    return int(min(want, ram // 4)) if ram else want


def _best(fn, repeats, clock=time.perf_counter):
    """Best wall time of fn() over `repeats` runs after one warm-up (syncs CUDA)."""
    fn()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = clock()
        fn()
        sync()
        best = min(best, clock() - t0)
    return best


def summarize_bandwidth(by_method):
    """{method: GB/s} -> the machine's read bandwidth: the median of the methods, and whether
    they disagree (fastest / slowest > DISAGREE_RATIO)."""
    values = sorted(by_method.values())
    spread = values[-1] / values[0] if values[0] > 0 else float("inf")
    return {"read_bandwidth_GBps": statistics.median(values),
            "read_bandwidth_method": f"median of {', '.join(by_method)}",
            "bandwidth_spread": spread, "bandwidth_disagree": spread > DISAGREE_RATIO}


def measure_bandwidth(device="cpu", nbytes=None, repeats=5, clock=time.perf_counter):
    """GB/s (1e9 bytes/s) read by each method (best of `repeats` timings each)."""
    nbytes = nbytes or (GPU_ARRAY_BYTES if device == "cuda" else cpu_array_bytes(last_level_cache_bytes(), _ram_total()))
    n = nbytes // 4
    side = int(n ** 0.5)
    x = torch.ones(n, dtype=torch.float32, device=device)
    mat = x[: side * side].view(side, side)
    vec = torch.ones(side, dtype=torch.float32, device=device)
    methods = {
        "torch_sum": (lambda: x.sum(), n * 4),
        "torch_matvec": (lambda: torch.mv(mat, vec), side * side * 4),
    }
    if device == "cpu":
        arr = x.numpy()
        methods["numpy_sum_1thread"] = (lambda: arr.sum(), n * 4)
    out = {name: nb / _best(fn, repeats, clock) / 1e9 for name, (fn, nb) in methods.items()}
    del x, mat, vec
    return out


def measure_gemm(device="cpu", size=None, repeats=3):
    """fp32 GEMM GFLOP/s of a square matmul (TF32 disabled on GPU)."""
    size = size or (8192 if device == "cuda" else 2048)
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    if device == "cuda":
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
    try:
        t = _best(lambda: a @ b, repeats)
    finally:
        if device == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = prev
    return 2 * size ** 3 / t / 1e9


def _key(device, threads):
    raw = f"{socket.gethostname()}|{device_name(device)}|{threads if device == 'cpu' else 'gpu'}"
    return hashlib.sha1(raw.encode()).hexdigest()[:16]


def baseline_problem(m):
    """Why a measurement's bandwidth is not a trustworthy baseline, or '' (also for records from
    before the busy meter, which cannot say)."""
    why = []
    pct = m.get("measured_others_cpu_pct")
    if pct is not None and pct > BUSY_PCT:
        why.append(f"measured while other processes used {pct:.0f}% of the CPU")
    if m.get("bandwidth_disagree"):
        why.append(f"its methods disagreed {m['bandwidth_spread']:.2f}x")
    return "; ".join(why)


def share_caveats(pct, machine, weight_bytes=None):
    """What a reader must know about "pct% of the measured bandwidth": short phrases, [] when it can
    be taken at face value. Above 100% always says why (a decode cannot outrun memory unless its
    weights sit in the cache or the baseline is too low)."""
    notes = ["suspect baseline"] if baseline_problem(machine) else []
    if pct is not None and pct > 100:
        llc = machine.get("last_level_cache_bytes")
        if weight_bytes and llc and weight_bytes <= llc:
            notes.append("above 100%: the weights fit in the last-level cache")
        else:
            notes.append("above 100%: faster than the measured baseline, so the baseline is too low")
    return notes


def measure_bandwidth_quietly(device, attempts=ATTEMPTS, meter=None):
    """The bandwidth and the share of the CPU other processes took meanwhile; a suspect result
    (busy or disagreeing) is measured again, up to `attempts` times in all; the last one counts."""
    for _ in range(attempts):
        others = (meter or OthersMeter)().start()
        bw = measure_bandwidth(device)
        result = {**summarize_bandwidth(bw), "bandwidth_by_method_GBps": bw,
                  "measured_others_cpu_pct": others.stop()["others_cpu_pct"]}
        if not baseline_problem(result):
            break
    return result


def measure(device="cpu", threads=None):
    threads = threads or usable_cores()
    set_threads(threads)
    bw = measure_bandwidth_quietly(device)
    result = {"hostname": socket.gethostname(), "device": device, "device_name": device_name(device),
              "threads": threads, **bw,
              "last_level_cache_bytes": last_level_cache_bytes() if device == "cpu" else None,
              "gemm_fp32_GFLOPs": measure_gemm(device),
              "memory_total_bytes": (torch.cuda.get_device_properties(0).total_memory if device == "cuda"
                                     else _ram_total()),
              "torch": torch.__version__, "numpy": np.__version__,
              "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    result["baseline_problem"] = baseline_problem(result)
    return result


def _ram_total():
    import psutil
    return psutil.virtual_memory().total


def cache_path(device="cpu", threads=None):
    return machine_cache_dir() / f"{device}-{_key(device, threads or usable_cores())}.json"


def read_cached(path):
    """A cached measurement, or None if missing, unreadable, from before the busy meter, or suspect
    (such a file was written by an older version: measure again)."""
    try:
        m = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(m, dict) or "bandwidth_spread" not in m or "measured_others_cpu_pct" not in m:
        return None
    return None if baseline_problem(m) else m


def get(device="cpu", threads=None, refresh=False):
    """The cached measurement for this machine, device and thread count. On a miss it is measured
    in a child process, so the caller never holds the 1-4 GB test arrays or a CUDA context; the
    child's warnings (suspect baseline, cache not writable) go to stderr. MachineError (one line)
    when the measurement itself fails."""
    threads = threads or usable_cores()
    path = cache_path(device, threads)
    if not refresh:
        cached = read_cached(path)
        if cached is not None:
            return cached
    cmd = [sys.executable, "-m", "bench.machine", "--device", device, "--threads", str(threads), "--refresh", "--quiet",
           "--emit-json"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    if proc.returncode != 0:
        last = lines[-1].removeprefix("bench.machine: error: ") if lines else f"exit status {proc.returncode}"
        raise MachineError(f"measuring the {device} bandwidth failed: {last}")
    for line in lines:
        print(line, file=sys.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def store(result, path):
    """Cache a clean measurement atomically; '' when stored, else the one-line reason it was not
    (a suspect baseline, or a cache folder that cannot be written: nothing is left behind)."""
    if result["baseline_problem"]:
        return (f"the {result['device']} bandwidth baseline is suspect ({result['baseline_problem']}): not cached; "
                f"it is used for this run only and flagged; measure again on a quiet machine")
    try:
        write_json_atomic(path, result)
    except (WriteError, OSError) as e:
        full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "disk full" in str(e)
        return (f"cache folder {path.parent} " + ("is full" if full else "cannot be written")
                + f" ({first_line(e)}): the machine measurement is not cached")
    return ""


def measure_and_cache(device="cpu", threads=None):
    result = measure(device, threads)
    why = store(result, cache_path(device, result["threads"]))
    if why:
        print(f"bench.machine: warning: {why}", file=sys.stderr)
    return result


def describe(m):
    lines = [f"{m['device']}: {m['device_name']} ({m['hostname']}), {m['threads']} threads" if m["device"] == "cpu"
             else f"{m['device']}: {m['device_name']} ({m['hostname']})",
             f"  read bandwidth  {m['read_bandwidth_GBps']:8.1f} GB/s   (median of: "
             + ", ".join(f"{k} {v:.1f}" for k, v in m["bandwidth_by_method_GBps"].items()) + ")",
             f"  fp32 GEMM       {m['gemm_fp32_GFLOPs']:8.1f} GFLOP/s",
             f"  memory          {m['memory_total_bytes'] / 2**30:8.1f} GiB"]
    if baseline_problem(m):
        lines.append(f"  WARNING: the bandwidth baseline is suspect ({baseline_problem(m)}); "
                     f"measure again on a quiet machine (--refresh)")
    return "\n".join(lines)


def main(argv=None):
    p = OneLineParser(prog="python -m bench.machine", description=__doc__)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: all usable cores)")
    p.add_argument("--refresh", action="store_true", help="measure again instead of using the cache")
    p.add_argument("--json", help="also write the measurement to this file")
    p.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--emit-json", action="store_true", help=argparse.SUPPRESS)     # get(): the result on stdout
    args = p.parse_args(argv)
    if args.json:
        try:
            check_writable_file(args.json, "--json")
        except ValueError as e:
            p.exit(2, f"bench.machine: error: {e}\n")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.exit(2, "bench.machine: error: --device cuda but no CUDA GPU is available\n")
    cached = cache_path(args.device, args.threads)
    m = None if args.refresh else read_cached(cached)
    if m is None:
        m = measure_and_cache(args.device, args.threads)
    if not args.quiet:
        print(describe(m))
    if args.emit_json:
        print(json.dumps(m))
    if args.json:
        write_json_atomic(args.json, m)


if __name__ == "__main__":
    main()
