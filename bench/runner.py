"""One measurement in a fresh process, and the parent side that starts it.

    run_child(spec, timeout)             parent: start `python -m bench.runner SPEC_JSON`, collect its result
    python -m bench.runner SPEC_JSON     child: load, warm up, reset the meters, generate, report

SPEC keys (DEFAULTS): model, device, dtype, weights (the weight format, as `--weights` and
`load(weights=)` spell it; only passed on when given; the result records the model's own as
"weight_format"),
tokens, batch (streams decoded together), prompt (or prompt_ids), checkpoint, threads, seed,
protocol, peer (the runner: "ours", "blinkdl", "transformers"), mem_method, progress_every_s, and
mode: "generate" (default), "trace" (the peak so far after every step, for bench.seqlen) or
"overhead" (generation time with and without the RSS sampler thread, and the cost of one peak read).

Process lifetime: the child dies with its parent, whatever kills the parent: it asks the kernel for
SIGKILL when its parent exits (PR_SET_PDEATHSIG, Linux), and the parent kills the child's process
group on SIGTERM/SIGHUP, Ctrl-C, a timeout or any exception. The result travels back on the child's
original stdout (anything the model code prints goes to stderr), so no temporary file exists that a
kill could leave behind. On failure the child prints one line to stderr and exits with status 2.
"""
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List

from bench.runners import RUNNERS

REPO = Path(__file__).resolve().parent.parent
WARMUP_TOKENS = 4
PROGRESS_PREFIX = "progress: "
PARENT_PID_ENV = "BENCH_PARENT_PID"
DEFAULTS = dict(device="cpu", dtype="float32", weights=None, tokens=512, batch=1, prompt=None, checkpoint=None,
                threads=None, seed=0, protocol="kv-cache", mode="generate", mem_method=None, prompt_ids=None,
                peer=None, progress_every_s=5.0)


# ---------------------------------------------------------------------------------------------
# Parent side

def child_env(threads):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env[PARENT_PID_ENV] = str(os.getpid())
    if threads:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(threads)
    return env


class _Terminated(BaseException):
    """SIGTERM/SIGHUP reached the parent while a child ran."""


@contextlib.contextmanager
def _child_dies_with_us(proc):
    """Kill the child's process group if this block ends by any exception or by SIGTERM/SIGHUP;
    a signal then ends this process with the usual status (128 + signal)."""
    def on_signal(signum, frame):
        raise _Terminated(signum)

    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    except BaseException as exc:
        _kill_group(proc)
        if isinstance(exc, _Terminated):
            sys.exit(128 + exc.args[0])
        raise
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def _kill_group(proc):
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _read_streams(proc, forward_progress):
    """Start threads that read the child's stdout (the result) and stderr (lines; progress lines
    are echoed to our stderr when asked). -> (threads, stdout chunks, stderr lines)."""
    out, err = [], []

    def read_out():
        out.append(proc.stdout.read())

    def read_err():
        for line in proc.stderr:
            if line.startswith(PROGRESS_PREFIX):
                if forward_progress:
                    print(line.rstrip(), file=sys.stderr, flush=True)
            else:
                err.append(line)

    threads = [threading.Thread(target=f, daemon=True) for f in (read_out, read_err)]
    for t in threads:
        t.start()
    return threads, out, err


def _failure(proc, err_lines):
    lines = [ln for ln in err_lines if ln.strip()]
    if proc.returncode < 0:
        return f"killed by signal {-proc.returncode}" + (" (out of memory?)" if proc.returncode == -9 else "")
    return lines[-1].strip() if lines else f"exit code {proc.returncode}"


def run_child(spec, timeout=None, progress=False):
    """Run one measurement in a fresh process. Returns its result dict with status "ok", or
    {"status": "error"|"timeout", "error": one line}. The child (its whole process group) is killed
    after `timeout` seconds, and whenever this process ends first. progress: echo the child's
    progress lines to stderr."""
    spec = {**DEFAULTS, **spec}
    cmd = [sys.executable, "-m", "bench.runner", json.dumps(spec)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=child_env(spec["threads"]), start_new_session=True)
    with _child_dies_with_us(proc):
        readers, out, err = _read_streams(proc, progress)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            for t in readers:
                t.join()
            return {"status": "timeout", "error": f"killed after {timeout:.0f} s", "wall_s": time.perf_counter() - t0}
        for t in readers:
            t.join()
    if proc.returncode != 0 or not "".join(out).strip():
        return {"status": "error", "error": _failure(proc, err), "wall_s": time.perf_counter() - t0}
    return {**json.loads("".join(out)), "status": "ok"}


# ---------------------------------------------------------------------------------------------
# Child side: the result

@dataclass
class RunResult:
    model: str
    peer: str
    device: str
    dtype: str
    weight_format: str
    threads: int
    batch: int
    protocol: str
    seed: int
    prompt_tokens: int
    prompt_note: str
    new_tokens: int
    load_s: float
    warmup_s: float
    prefill_s: float
    step_s: List[float]
    token_ids: List[List[int]]
    peak_bytes: int
    mem_method: str
    machine_load: dict
    info: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def to_dict(self):
        d = asdict(self)
        info, extra, load = d.pop("info"), d.pop("extra"), d.pop("machine_load")
        decode_s = sum(self.step_s)
        total_s = self.prefill_s + decode_s
        decode_tps = len(self.step_s) / decode_s if decode_s > 0 else None
        wbpt = info.get("weight_bytes_per_token")
        return {**d, **info, **load, **extra, "decode_s": decode_s, "total_s": total_s,
                "tokens_per_s": self.new_tokens / total_s, "decode_tokens_per_s": decode_tps,
                "aggregate_tokens_per_s": self.batch * self.new_tokens / total_s,
                "weight_GBps": wbpt * decode_tps / 1e9 if (wbpt and decode_tps) else None}


# ---------------------------------------------------------------------------------------------
# Child side: the measurement

class Progress:
    """Prints `progress: decoding i/n tokens` to stderr at most every `every_s` seconds."""

    def __init__(self, n, every_s):
        self.n, self.every_s = n, every_s
        self.t0 = self.last = time.perf_counter()

    def __call__(self, i):
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            print(f"{PROGRESS_PREFIX}decoding {i}/{self.n} tokens, {now - self.t0:.1f} s", file=sys.stderr, flush=True)


def _run_plain(loaded, spec, meter):
    return loaded.generate(spec["tokens"], Progress(spec["tokens"], spec["progress_every_s"])), {}


def _run_traced(loaded, spec, meter):
    """Also the peak so far after every step (bench.seqlen)."""
    trace = []
    gen = loaded.generate(spec["tokens"], lambda i: trace.append(meter.current()))
    return gen, {"mem_trace": trace}


def _overhead(loaded, spec):
    """Generation time with and without the RSS sampler thread, and the cost of one peak read."""
    from bench.memory import hwm_bytes, sampler_overhead
    n = spec["tokens"]
    ratio, plain, sampled = sampler_overhead(lambda: loaded.generate(n))
    t0 = time.perf_counter()
    for _ in range(1000):
        hwm_bytes()
    per_read = (time.perf_counter() - t0) / 1000
    return {"sampler_ratio": ratio, "plain_s": plain, "sampled_s": sampled, "trace_read_s": per_read,
            "trace_ratio": 1 + per_read * n / plain}


MODES = {"generate": _run_plain, "overhead": _run_plain, "trace": _run_traced}


def measure(spec):
    """spec -> RunResult: load, warm up, reset the memory and machine-load meters, generate."""
    import torch
    from bench.cpuload import OthersMeter
    from bench.machine import set_threads
    from rwkv_engine.process import usable_cores
    from bench.memory import PeakMemory
    spec = check_spec(spec)
    spec["threads"] = spec["threads"] or usable_cores()
    set_threads(spec["threads"])
    loaded = RUNNERS[spec["peer"] or "ours"](spec)
    with torch.inference_mode():
        t0 = time.perf_counter()
        loaded.generate(min(WARMUP_TOKENS, spec["tokens"]))     # touches every weight, compiles kernels
        warmup_s = time.perf_counter() - t0
        extra = _overhead(loaded, spec) if spec["mode"] == "overhead" else {}
        meter = PeakMemory(spec["device"], spec["mem_method"])
        meter.reset()
        others = OthersMeter().start()
        gen, more = MODES[spec["mode"]](loaded, spec, meter)
        machine_load = others.stop()
        mem = meter.read()
    dtype = loaded.info.pop("dtype", spec["dtype"])
    return RunResult(
        model=spec["model"], peer=spec["peer"] or "ours", device=spec["device"],
        dtype=dtype, weight_format=weight_format_of(loaded, spec, dtype),
        threads=spec["threads"], batch=spec["batch"], protocol=loaded.info.pop("protocol", spec["protocol"]),
        seed=spec["seed"], prompt_tokens=loaded.prompt_tokens, prompt_note=loaded.prompt_note,
        new_tokens=spec["tokens"], load_s=loaded.load_s, warmup_s=warmup_s, prefill_s=gen.prefill_s,
        step_s=gen.step_s, token_ids=gen.token_ids, peak_bytes=mem["peak_bytes"], mem_method=mem["method"],
        machine_load=machine_load, info={**loaded.info, "baseline_bytes": mem["baseline_bytes"]},
        extra={**extra, **more})


def weight_format_of(loaded, spec, dtype):
    """The format the run's matrices were in: the model's own (a packed file run without --weights is
    in its file's format), else the requested one (spec "weights"), else the compute dtype."""
    own = getattr(loaded.model, "weight_format", None)
    return own if isinstance(own, str) else (spec["weights"] or dtype)


def check_spec(spec):
    spec = {**DEFAULTS, **spec}
    if spec["mode"] not in MODES:
        raise ValueError(f"unknown mode {spec['mode']!r}; use one of {', '.join(MODES)}")
    if (spec["peer"] or "ours") not in RUNNERS:
        raise ValueError(f"unknown peer {spec['peer']!r}; use one of {', '.join(RUNNERS)}")
    if spec["mode"] != "generate" and spec["peer"] not in (None, "ours"):
        raise ValueError(f"mode {spec['mode']!r} needs our engine, not peer {spec['peer']!r}")
    if spec["device"] == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise ValueError("--device cuda but no CUDA GPU is available")
    return spec


def exit_with_parent():
    """Ask Linux to SIGKILL this process when its parent exits; exit now if it already has."""
    from rwkv_engine.process import die_with_parent
    parent = os.environ.get(PARENT_PID_ENV)
    die_with_parent(signal.SIGKILL)
    if parent and os.getppid() != int(parent):           # the parent died before prctl took effect
        os._exit(1)


INTERNAL = ("bench.runner: error: an internal entry point, not a command: the benchmarks (e.g. python -m "
            "bench.generate --help) start it with one JSON spec argument")


def spec_argument(argv):
    """The one JSON object argument the parent passes, or None (a person ran this by hand)."""
    if len(argv) != 1:
        return None
    try:
        spec = json.loads(argv[0])
    except ValueError:
        return None
    return spec if isinstance(spec, dict) else None


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    spec = spec_argument(argv)
    if spec is None:
        print(INTERNAL, file=sys.stderr)
        return 2
    result_fd = os.dup(1)                                 # the result goes here; stray prints to stderr
    os.dup2(2, 1)
    exit_with_parent()
    try:
        result = measure(spec).to_dict()
    except KeyboardInterrupt:
        print("bench.runner: interrupted", file=sys.stderr)
        return 130
    except Exception as e:                                  # one line, whatever went wrong
        from bench.cli import first_line
        msg = first_line(e)
        print(msg if isinstance(e, ValueError) else f"{type(e).__name__}: {msg}", file=sys.stderr)
        return 2
    with os.fdopen(result_fd, "w") as f:
        f.write(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
