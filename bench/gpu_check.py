"""One-shot GPU check of the Triton WKV kernel and the engine's CUDA path.

    PYTHONPATH=. python -m bench.gpu_check [--out PATH] [--quick]

Prepared to run once on a lent GPU machine, in under 8 minutes on an H200:
  1. tests/test_wkv_triton.py with the compiled kernel (TRITON_INTERPRET=0), slow cases included;
  2. engine parity: the tiny synthetic model, CUDA fp32 against CPU fp32 (sequence + decode steps);
  3. WKV kernel time (triton.testing.do_bench, median) for B=8, T in {512, 2048, 16384},
     C in {2560, 5120}, as GB/s of k, v read + y written (+ state) against ~4.3 TB/s, plus a
     sweep of launch configs and a single-token step;
  4. decode time per token for the rwkv-4-pile sizes, synthetic weights made directly on the GPU.
Each section is wrapped: a failure is recorded and the next section runs. Only "not applicable"
(`Skip`) counts as skipped; anything else, an ImportError or AttributeError from a renamed kernel
function included, is an error and makes the exit status 1. Results are written to
$OUT/gpu_check.json (or --out) after every section, and one table is printed last.
Without CUDA it prints one line and exits with status 2.
Needs only what the GPU machine has: Python 3.10+, torch 2.x with CUDA, triton 3.x.
"""
import argparse
import inspect
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Achievable H200 HBM bandwidth: a device-to-device tensor copy measured about 4.3 TB/s on an H200
# (NVIDIA's figure for HBM3e is 4.8 TB/s). Only the "% of peak" columns depend on it.
PEAK_GBPS = 4300.0
TIME_BUDGET_S = 450                      # stop starting new decode models after this (8 min total)


class Skip(Exception):
    """A section or case that does not apply here (the only thing counted as skipped)."""


def section(results, name, fn, *args):
    """Run one section; record ok / skipped / failed / error with its payload; never raise."""
    t0 = time.perf_counter()
    print(f"== {name}", flush=True)
    try:
        entry = fn(*args)
    except Skip as exc:
        entry = {"status": f"skipped: {exc}"}
    except Exception as exc:
        entry = {"status": f"error: {type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
    entry["seconds"] = round(time.perf_counter() - t0, 1)
    results["sections"][name] = entry
    print(f"   {entry['status']} ({entry['seconds']} s)", flush=True)
    return entry


# ----------------------------------------------------------------------------------------------
# 1. Kernel tests, compiled
# ----------------------------------------------------------------------------------------------

def run_kernel_tests(timeout_s=300):
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    cmd = [sys.executable, "-m", "pytest", "tests/test_wkv_triton.py", "-q", "-m", "not slow or slow",
           "-p", "no:cacheprovider"]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return {"status": f"failed: timed out after {timeout_s} s", "output_tail": out[-3000:]}
    out = proc.stdout + proc.stderr
    counts = {key: int(n) for n, key in re.findall(r"(\d+) (passed|failed|errors?|skipped)", out)}
    summary = ", ".join(f"{n} {key}" for key, n in counts.items()) or "no summary"
    status = ("ok: " if proc.returncode == 0 else f"failed (rc {proc.returncode}): ") + summary
    return {"status": status, "counts": counts, "output_tail": out[-3000:]}


# ----------------------------------------------------------------------------------------------
# 2. Engine parity, CUDA fp32 vs CPU fp32
# ----------------------------------------------------------------------------------------------

def engine_parity(name="rwkv-4-tiny", batch=2, prompt_len=24, decode_steps=4):
    import torch
    import rwkv_engine

    if name not in rwkv_engine.MODELS:
        raise ValueError(f"no {name!r} in rwkv_engine.MODELS")
    os.environ.setdefault("RWKV_ENGINE_CACHE", tempfile.mkdtemp(prefix="rwkv_engine_cache_"))
    cpu = rwkv_engine.load(name, device="cpu", dtype="float32")
    gpu = rwkv_engine.load(name, device="cuda", dtype="float32")
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cpu.vocab_size, (batch, prompt_len), generator=g)
    torch.backends.cuda.matmul.allow_tf32 = False                # fp32 against fp32: no TF32 matmuls
    lc, sc = cpu.forward(tokens, all_logits=True)                # (B, T, V)
    lg, sg = gpu.forward(tokens.cuda(), all_logits=True)
    diffs = [(lg.cpu() - lc).abs().max().item()]
    scale = lc.abs().max().item()
    nxt = lc[:, -1].argmax(-1, keepdim=True)                     # (B, 1)
    for _ in range(decode_steps):                                # token mode, state carried
        lc, sc = cpu.forward(nxt, sc)                            # (B, V)
        lg, sg = gpu.forward(nxt.cuda(), sg)
        diffs.append((lg.cpu() - lc).abs().max().item())
        nxt = lc.argmax(-1, keepdim=True)
    tol = 1e-3 * max(1.0, scale)
    ok = max(diffs) <= tol
    status = ("ok" if ok else "failed") + f": max |logit diff| {max(diffs):.2e} (tol {tol:.1e}, |logit| <= {scale:.1f})"
    return {"status": status, "max_abs_diff_per_call": diffs, "tolerance": tol,
            "calls": f"sequence B={batch} T={prompt_len}, then {decode_steps} decode steps"}


# ----------------------------------------------------------------------------------------------
# 3. WKV kernel timing
# ----------------------------------------------------------------------------------------------

def median_ms(fn, warmup=25, rep=200):
    """triton.testing.do_bench median in ms (checks the keyword rather than the triton version)."""
    from triton.testing import do_bench
    if "return_mode" in inspect.signature(do_bench).parameters:
        return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    return do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5])


def triton_wkv_api():
    """The Triton WKV functions this check times, imported in this one place:
    -> (launch_config(C) -> (block_c, num_warps), wkv_triton(w, u, k, v, state, block_c=, num_warps=),
    is_interpreted()), all public names. A missing name raises (ImportError/AttributeError): the check
    then fails."""
    from rwkv_kernels.wkv_triton import is_interpreted, launch_config, wkv_triton
    return launch_config, wkv_triton, is_interpreted


def wkv_timing(rows, quick=False):
    import torch
    from rwkv_kernels.wkv_reference import new_wkv_state
    launch_config, wkv_forward, is_interpreted = triton_wkv_api()

    if is_interpreted():
        raise RuntimeError("rwkv_kernels.wkv_triton was built for the interpreter (TRITON_INTERPRET=1)")
    B = 8
    entries = []

    def measure(T, C, dtype=torch.float32, block_c=None, num_warps=None, batch=B, label=""):
        k = torch.randn(batch, T, C, device="cuda").to(dtype)
        v = torch.randn(batch, T, C, device="cuda").to(dtype)
        w = -torch.exp(torch.linspace(-6, 7, C, device="cuda"))
        u = torch.full((C,), math.log(0.3), device="cuda")
        state = new_wkv_state(batch, C, "cuda")
        ms = median_ms(lambda: wkv_forward(w, u, k, v, state, block_c=block_c, num_warps=num_warps))
        nbytes = batch * T * C * (k.element_size() + v.element_size() + 4) + 6 * batch * C * 4
        gbps = nbytes / ms / 1e6
        cfg = (block_c, num_warps) if block_c else launch_config(C)
        e = {"B": batch, "T": T, "C": C, "dtype": str(dtype)[6:], "block_c": cfg[0], "num_warps": cfg[1],
             "ms": round(ms, 4), "GBps": round(gbps, 1), "pct_peak": round(100 * gbps / PEAK_GBPS, 1)}
        entries.append(e)
        rows.append(("wkv", f"{label}B{batch} T{T} C{C} {e['dtype']} blk{cfg[0]}/w{cfg[1]}",
                     f"{ms:.3f} ms  {gbps:.0f} GB/s  {e['pct_peak']}% of {PEAK_GBPS / 1000} TB/s"))
        print(f"   {rows[-1][1]}: {rows[-1][2]}", flush=True)
        del k, v
        torch.cuda.empty_cache()

    for T in (512, 2048) if quick else (512, 2048, 16384):
        for C in (2560, 5120):
            measure(T, C)
    measure(2048, 5120, torch.bfloat16)
    for block_c, num_warps in ((32, 1), (64, 1), (64, 2), (128, 1), (256, 2), (256, 8)):
        measure(2048, 5120, block_c=block_c, num_warps=num_warps, label="sweep ")
    measure(1, 5120, batch=1, label="step ")                  # launch-bound: one decode token
    best = min((e for e in entries if e["T"] == 2048 and e["C"] == 5120 and e["dtype"] == "float32"),
               key=lambda e: e["ms"])
    return {"status": f"ok: best at T2048 C5120: blk{best['block_c']}/w{best['num_warps']} {best['GBps']} GB/s",
            "results": entries}


# ----------------------------------------------------------------------------------------------
# 4. Decode timing on synthetic weights made on the GPU
# ----------------------------------------------------------------------------------------------

def engine_synthetic_state_dict():
    """The engine's own synthetic-weight generator (imported in this one place)."""
    from rwkv_engine.checkpoint import synthetic_state_dict
    return synthetic_state_dict


def synthetic_model_on_gpu(name, dtype, cpu_weights):
    """An RWKV of a registered size with the engine's synthetic weights (`cpu_weights`, made once
    per size by `engine_synthetic_state_dict()` in float16), moved to the GPU in `dtype`. Writing a
    56 GB checkpoint to disk would take the whole GPU allowance; making the values on the CPU
    takes seconds per billion parameters."""
    import rwkv_engine
    cfg = rwkv_engine.get_config(name)
    return rwkv_engine.RWKV(cfg, {k: v.to("cuda") for k, v in cpu_weights.items()}, device="cuda", dtype=dtype,
                            synthetic=True)


def decode_timing(rows, deadline, steps=20, warmup=3):
    import torch
    import rwkv_engine

    import torch as _torch
    names = [n for n in rwkv_engine.MODELS if n.startswith("rwkv-4-pile-")]
    make = engine_synthetic_state_dict()
    entries = []
    for name in names:
        weights = None
        for dtype in ("float16", "float32"):
            label = f"{name} {dtype} B1"
            cfg = rwkv_engine.get_config(name)
            need = cfg.n_params * (2 if dtype == "float16" else 4) * 1.15
            free = torch.cuda.mem_get_info()[0]
            if time.perf_counter() > deadline:
                entries.append({"model": name, "dtype": dtype, "status": "skipped: time budget"})
            elif need > free:
                entries.append({"model": name, "dtype": dtype, "status": f"skipped: needs {need / 1e9:.0f} GB"})
            else:
                try:
                    if weights is None:
                        weights = make(rwkv_engine.get_config(name), 0, _torch.float16)
                    entries.append({"model": name, "dtype": dtype,
                                    **_time_decode(name, dtype, weights, steps, warmup)})
                except Exception as exc:
                    entries.append({"model": name, "dtype": dtype, "status": f"error: {type(exc).__name__}: {exc}"})
                torch.cuda.empty_cache()
            e = entries[-1]
            result = e["status"] if "ms_per_token" not in e else \
                f"{e['ms_per_token']:.2f} ms/tok  {e['tokens_per_s']:.0f} tok/s  {e['GBps']:.0f} GB/s ({e['pct_peak']}%)"
            rows.append(("decode", label, result))
            print(f"   {label}: {result}", flush=True)
    n_ok = sum("ms_per_token" in e for e in entries)
    status = "ok" if n_ok == len(entries) else ("error" if n_ok == 0 else "partial")
    return {"status": f"{status}: {n_ok}/{len(entries)} timed", "results": entries}


def _time_decode(name, dtype, cpu_weights, steps, warmup):
    import torch
    torch.cuda.reset_peak_memory_stats()
    model = synthetic_model_on_gpu(name, dtype, cpu_weights)
    state = model.new_state(1)
    token = torch.zeros(1, 1, dtype=torch.long, device="cuda")
    for _ in range(warmup):
        model.forward(token, state)
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model.forward(token, state)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    ms = sorted(times)[len(times) // 2]
    nbytes = model.weight_bytes_per_token
    gbps = nbytes / ms / 1e6
    del model, state
    return {"status": "ok", "ms_per_token": round(ms, 3), "tokens_per_s": round(1000 / ms, 1),
            "weight_bytes_per_token": nbytes, "GBps": round(gbps, 1), "pct_peak": round(100 * gbps / PEAK_GBPS, 1),
            "peak_mem_GB": round(torch.cuda.max_memory_allocated() / 1e9, 2)}


# ----------------------------------------------------------------------------------------------

def print_table(rows):
    widths = [max(len(str(r[i])) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="JSON path (default $OUT/gpu_check.json)")
    parser.add_argument("--quick", action="store_true", help="skip the slowest timing sizes")
    args = parser.parse_args(argv)

    os.environ["TRITON_INTERPRET"] = "0"         # before rwkv_kernels.wkv_triton is imported: compiled kernel
    import torch
    if not torch.cuda.is_available():
        print("gpu_check: CUDA is not available (torch.cuda.is_available() is False); run it on a GPU machine",
              file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO))
    start = time.perf_counter()
    out = Path(args.out or Path(os.environ.get("OUT", ".")) / "gpu_check.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        import triton
        triton_version = triton.__version__
    except Exception as exc:
        triton_version = f"unavailable: {exc}"
    results = {"device": torch.cuda.get_device_name(), "python": platform.python_version(),
               "torch": torch.__version__, "triton": triton_version, "peak_GBps_assumed": PEAK_GBPS,
               "sections": {}}
    rows = [("section", "case", "result")]

    def save():
        results["seconds_total"] = round(time.perf_counter() - start, 1)
        out.write_text(json.dumps(results, indent=1))

    for name, fn, fn_args in (("tests", run_kernel_tests, ()),
                              ("parity", engine_parity, ()),
                              ("wkv", wkv_timing, (rows, args.quick)),
                              ("decode", decode_timing, (rows, start + TIME_BUDGET_S))):
        entry = section(results, name, fn, *fn_args)
        if name in ("tests", "parity") or not entry["status"].startswith("ok"):
            rows.append((name, "(section)", entry["status"]))
        save()

    print(f"\ngpu_check on {results['device']} (torch {results['torch']}, triton {results['triton']}), "
          f"{results['seconds_total']} s; JSON: {out}")
    print_table(rows)
    failed = [n for n, e in results["sections"].items() if e["status"].startswith(("failed", "error"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
