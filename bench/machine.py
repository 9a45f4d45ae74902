"""This machine's limits: memory read bandwidth and fp32 GEMM throughput, measured once and cached.

    python -m bench.machine [--threads N] [--device cpu|cuda] [--refresh]

Decode of one token reads every weight once, so "read bandwidth" is the roofline for tokens/s:
tokens/s <= bandwidth / weight_bytes_per_token. The bandwidth is the best of a few read-only
kernels over arrays far larger than the caches (CPU: torch sum and matrix-vector product on the
requested threads, numpy sum on one; GPU: torch sum and matvec). GEMM is a square fp32 matmul
(TF32 off on GPU). Results are cached as JSON in $RWKV_ENGINE_CACHE/machine/ keyed by hostname, CPU
(or GPU) model and thread count ($BENCH_MACHINE_CACHE overrides the folder); --refresh measures again.
"""
import argparse
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

REPO = Path(__file__).resolve().parent.parent
CPU_ARRAY_BYTES = 1 << 30      # 1 GiB: far beyond any last-level cache
GPU_ARRAY_BYTES = 4 << 30      # 4 GiB: far beyond the 50-60 MB L2 of an A100/H100/H200


def cache_dir():
    """$BENCH_MACHINE_CACHE, else $RWKV_ENGINE_CACHE/machine, else ~/.cache/rwkv_engine/machine."""
    if os.environ.get("BENCH_MACHINE_CACHE"):
        return Path(os.environ["BENCH_MACHINE_CACHE"])
    return Path(os.environ.get("RWKV_ENGINE_CACHE") or Path.home() / ".cache" / "rwkv_engine") / "machine"


def default_threads():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


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


def device_name(device):
    return torch.cuda.get_device_name() if device == "cuda" else cpu_model()


def _best(fn, repeats):
    """Best wall time of fn() over `repeats` runs after one warm-up (syncs CUDA)."""
    fn()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_bandwidth(device="cpu", nbytes=None, repeats=5):
    """GB/s (1e9 bytes/s) read by each method; the best one is the machine's read bandwidth."""
    nbytes = nbytes or (GPU_ARRAY_BYTES if device == "cuda" else CPU_ARRAY_BYTES)
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
    out = {name: nb / _best(fn, repeats) / 1e9 for name, (fn, nb) in methods.items()}
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


def measure(device="cpu", threads=None):
    threads = threads or default_threads()
    set_threads(threads)
    bw = measure_bandwidth(device)
    best = max(bw, key=bw.get)
    return {"hostname": socket.gethostname(), "device": device, "device_name": device_name(device),
            "threads": threads, "read_bandwidth_GBps": bw[best], "read_bandwidth_method": best,
            "bandwidth_by_method_GBps": bw, "gemm_fp32_GFLOPs": measure_gemm(device),
            "memory_total_bytes": (torch.cuda.get_device_properties(0).total_memory if device == "cuda"
                                   else _ram_total()),
            "torch": torch.__version__, "numpy": np.__version__, "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}


def _ram_total():
    import psutil
    return psutil.virtual_memory().total


def cache_path(device="cpu", threads=None):
    return cache_dir() / f"{device}-{_key(device, threads or default_threads())}.json"


def get(device="cpu", threads=None, refresh=False):
    """The cached measurement for this machine, device and thread count. On a miss it is measured
    in a child process, so the caller never holds the 1-4 GB test arrays or a CUDA context."""
    threads = threads or default_threads()
    path = cache_path(device, threads)
    if not refresh and path.exists():
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            pass
    cmd = [sys.executable, "-m", "bench.machine", "--device", device, "--threads", str(threads), "--refresh", "--quiet"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    subprocess.run(cmd, check=True, env=env)
    return json.loads(path.read_text())


def measure_and_cache(device="cpu", threads=None):
    result = measure(device, threads)
    path = cache_path(device, result["threads"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, path)
    return result


def describe(m):
    lines = [f"{m['device']}: {m['device_name']} ({m['hostname']}), {m['threads']} threads" if m["device"] == "cpu"
             else f"{m['device']}: {m['device_name']} ({m['hostname']})",
             f"  read bandwidth  {m['read_bandwidth_GBps']:8.1f} GB/s   (best of: "
             + ", ".join(f"{k} {v:.1f}" for k, v in m["bandwidth_by_method_GBps"].items()) + ")",
             f"  fp32 GEMM       {m['gemm_fp32_GFLOPs']:8.1f} GFLOP/s",
             f"  memory          {m['memory_total_bytes'] / 2**30:8.1f} GiB"]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.machine", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all usable cores)")
    p.add_argument("--refresh", action="store_true", help="measure again instead of using the cache")
    p.add_argument("--json", help="also write the measurement to this file")
    p.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.exit(2, "bench.machine: error: --device cuda but no CUDA GPU is available\n")
    cached = cache_path(args.device, args.threads)
    if args.refresh or not cached.exists():
        m = measure_and_cache(args.device, args.threads)
    else:
        m = json.loads(cached.read_text())
    if not args.quiet:
        print(describe(m))
    if args.json:
        Path(args.json).write_text(json.dumps(m, indent=2))


if __name__ == "__main__":
    main()
