"""One measurement in a fresh process: load, warm up, reset the memory meter, generate, report.

    python -m bench._run_one SPEC_JSON OUT_JSON        (spawned by `run_child`, not by hand)

SPEC_JSON keys: model, device, dtype, tokens, prompt (or prompt_ids), checkpoint, threads, seed,
protocol, peer (bench.peers: another implementation), and mode: "generate" (default), "trace" (also
record the peak so far after every step, for bench.seqlen) or "overhead" (first time generation with
and without the RSS sampler thread, and the cost of one peak read). The result is written to
OUT_JSON only when everything succeeded; on failure one line goes to stderr and the exit code is 2.
The per-token loop is the engine's own (`rwkv_engine.generation`), for RWKV and baselines alike.
"""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WARMUP_TOKENS = 4
DEFAULTS = dict(device="cpu", dtype="float32", tokens=512, prompt=None, checkpoint=None, threads=None,
                seed=0, protocol="kv-cache", mode="generate", mem_method=None, prompt_ids=None, peer=None)


# ---------------------------------------------------------------------------------------------
# Parent side

def child_env(threads):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if threads:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(threads)
    return env


def run_child(spec, timeout=None):
    """Run one measurement in a fresh process. Returns its result dict with status "ok", or
    {"status": "error"|"timeout", "error": one line}. The child is killed (whole process group)
    after `timeout` seconds."""
    spec = {**DEFAULTS, **spec}
    with tempfile.TemporaryDirectory(prefix="bench_") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "bench._run_one", json.dumps(spec), str(out)]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=child_env(spec["threads"]), start_new_session=True)
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return {"status": "timeout", "error": f"killed after {timeout:.0f} s", "wall_s": time.perf_counter() - t0}
        except BaseException:                   # Ctrl-C in the parent: take the child down too
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
        if proc.returncode != 0 or not out.exists():
            lines = [ln for ln in (err or "").splitlines() if ln.strip()]
            if proc.returncode < 0:
                why = f"killed by signal {-proc.returncode}" + (" (out of memory?)" if proc.returncode == -9 else "")
            else:
                why = lines[-1].strip() if lines else f"exit code {proc.returncode}"
            return {"status": "error", "error": why, "wall_s": time.perf_counter() - t0}
        result = json.loads(out.read_text())
    result["status"] = "ok"
    return result


# ---------------------------------------------------------------------------------------------
# Child side

def prompt_ids(model, prompt):
    """Token ids of the prompt with the model's own tokenizer, else the 20B tokenizer's ids
    clipped to the model's vocabulary (and a note saying so)."""
    if model.tokenizer is not None:
        return model.tokenizer.encode(prompt), "own tokenizer"
    from rwkv_engine import tokenizer
    ids = tokenizer().encode(prompt)
    clipped = sum(i >= model.vocab_size for i in ids)
    note = f"no tokenizer: 20B tokenizer ids, clipped to vocab {model.vocab_size}"
    return [min(i, model.vocab_size - 1) for i in ids], note + (f" ({clipped} clipped)" if clipped else "")


def expected_runtime_bytes(model, total_len):
    """What the state or KV cache alone should take (a sanity check on the measured peak)."""
    if hasattr(model, "kv_cache_bytes"):
        return int(model.kv_cache_bytes(1, total_len))
    if hasattr(model, "state_bytes"):
        return int(model.state_bytes(1))
    return None


def measure(spec):
    import torch
    from bench import DRAGON_PROMPT, models
    from bench.machine import default_threads, set_threads
    from bench.memory import PeakMemory, hwm_bytes, sampler_overhead
    from rwkv_engine.generation import generate, stream, GenerationResult
    from rwkv_engine.sampling import SamplingParams

    threads = spec["threads"] = spec["threads"] or default_threads()
    if spec["peer"] not in (None, "ours"):
        from bench.peers import measure_peer
        return measure_peer(spec)
    set_threads(threads)
    family = models.family_of(spec["model"])
    if spec["device"] == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA GPU is available")
    t0 = time.perf_counter()
    model = models.load(spec["model"], spec["device"], spec["dtype"], spec["checkpoint"], spec["protocol"])
    load_s = time.perf_counter() - t0
    if spec["prompt_ids"] is not None:
        ids, prompt_note = spec["prompt_ids"], "token ids given"
    else:
        ids, prompt_note = prompt_ids(model, spec["prompt"] if spec["prompt"] is not None else DRAGON_PROMPT)
    ids = torch.tensor([ids], dtype=torch.long)
    N, seed = spec["tokens"], spec["seed"]
    paper_sampling = SamplingParams(temperature=1.0, top_k=0, top_p=1.0)    # multinomial, as the paper
    run = lambda n: generate(model, ids, n, sampling=paper_sampling, seed=seed)

    with torch.inference_mode():
        t0 = time.perf_counter()
        run(min(WARMUP_TOKENS, N))                         # touches every weight, compiles kernels
        warmup_s = time.perf_counter() - t0
        extra = {}
        if spec["mode"] == "overhead":
            ratio, plain, sampled = sampler_overhead(lambda: run(N))
            t0 = time.perf_counter()
            for _ in range(1000):
                hwm_bytes()
            per_read = (time.perf_counter() - t0) / 1000
            extra = {"sampler_ratio": ratio, "plain_s": plain, "sampled_s": sampled,
                     "trace_read_s": per_read, "trace_ratio": 1 + per_read * N / plain}
        meter = PeakMemory(spec["device"], spec["mem_method"])
        meter.reset()
        if spec["mode"] == "trace":
            result, trace = GenerationResult([], None, 0, 0.0, 0.0), []
            for _ in stream(model, ids, N, sampling=paper_sampling, seed=seed, result=result):
                trace.append(meter.current())
            extra["mem_trace"] = trace
        else:
            result = run(N)
        mem = meter.read()

    decode_steps = len(result.step_s)
    decode_tps = decode_steps / result.decode_s if result.decode_s > 0 else None
    total_s = result.prefill_s + result.decode_s
    wbpt = int(model.weight_bytes_per_token)
    return {
        "model": spec["model"], "family": family, "device": spec["device"], "dtype": spec["dtype"],
        "threads": threads, "protocol": spec["protocol"] if family != models.RWKV else "recurrent",
        "seed": seed, "n_params": int(model.n_params), "synthetic": bool(model.synthetic),
        "weights": "synthetic" if model.synthetic else str(model.source),
        "source": str(getattr(model, "path", None) or model.source),
        "prompt_tokens": result.prompt_tokens, "prompt_note": prompt_note, "new_tokens": N,
        "load_s": load_s, "warmup_s": warmup_s, "prefill_s": result.prefill_s, "decode_s": result.decode_s,
        "total_s": total_s, "tokens_per_s": N / total_s, "decode_tokens_per_s": decode_tps,
        "weight_bytes_per_token": wbpt, "weight_GBps": wbpt * decode_tps / 1e9 if decode_tps else None,
        "peak_bytes": mem["peak_bytes"], "mem_method": mem["method"], "baseline_bytes": mem["baseline_bytes"],
        "expected_runtime_bytes": expected_runtime_bytes(model, result.prompt_tokens + N),
        "step_s": result.step_s, "torch": torch.__version__, "peer": spec["peer"], **extra,
    }


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        spec = {**DEFAULTS, **json.loads(argv[0])}
        result = measure(spec)
    except KeyboardInterrupt:
        print("bench._run_one: interrupted", file=sys.stderr)
        return 130
    except Exception as e:                                  # one line, whatever went wrong
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"{type(e).__name__}: {msg}" if not isinstance(e, ValueError) else msg, file=sys.stderr)
        return 2
    out = Path(argv[1])
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
