"""Time and peak memory (excluding parameters) to generate N tokens with one model.

    python -m bench.generate --model rwkv-4-pile-169m --device cpu
    python -m bench.generate --model pythia-160m --protocol paper --tokens 512 --repeats 3 --json out.json

Protocol: the paper's prompt (41 tokens with the 20B tokenizer), fed in one call, then one token per
call through the engine's own generation loop, sampling multinomially at temperature 1 (no top-p),
seeded. Each repeat runs in a fresh process that loads the model, warms up (prefill + a few decode
steps: every weight touched, kernels compiled), resets the memory meter, then generates; the table
shows the median of the repeats. `--protocol paper` runs the transformers without a KV cache
(the whole sequence again at every step, as the paper's code did); RWKV is recurrent either way.

Peak memory excluding parameters = peak during generation - footprint after load + warm-up; see
`bench.memory` for how (RSS high-water mark reset via /proc/self/clear_refs on CPU, the CUDA
allocator's peak on GPU) and for why memory-mapped weights do not leak into the number.

Time: prefill = prompt forward + first sample; decode = the other N-1 steps; total = both (the time
to produce N tokens). Achieved bandwidth = weight bytes read per decode step x decode tokens/s, as a
share of this machine's measured read bandwidth (`python -m bench.machine`).
"""
import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from bench import DRAGON_PROMPT
from bench._run_one import run_child

SUMMARY_FIELDS = ("prefill_s", "decode_s", "total_s", "tokens_per_s", "decode_tokens_per_s", "weight_GBps",
                  "peak_bytes", "load_s")


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line on stderr (exit code 2) and shows the
    module docstring, as written, in --help."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def fail(prog, message):
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(2)


def write_json_atomic(path, obj):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, allow_nan=False, default=str))
    os.replace(tmp, path)


def median_summary(runs):
    """Median of each timing/memory field over the repeats (all of which succeeded)."""
    out = {k: v for k, v in runs[0].items() if k not in SUMMARY_FIELDS and k not in ("step_s", "mem_trace")}
    for key in SUMMARY_FIELDS:
        vals = [r[key] for r in runs if r.get(key) is not None]
        out[key] = statistics.median(vals) if vals else None
    out["repeats"] = len(runs)
    return out


def add_machine_share(summary, machine):
    if machine and summary.get("weight_GBps") is not None:
        summary["machine_read_GBps"] = machine["read_bandwidth_GBps"]
        summary["bandwidth_pct"] = 100 * summary["weight_GBps"] / machine["read_bandwidth_GBps"]
    return summary


def fmt_bytes(n):
    if n is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def fmt_params(n):
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e7 else f"{n / 1e6:.2f}M"


def table(s):
    """Two-column table of one model's median results."""
    bw = (f"{s['weight_GBps']:.1f} GB/s ({s['bandwidth_pct']:.0f}% of {s['machine_read_GBps']:.1f} GB/s measured)"
          if s.get("bandwidth_pct") is not None else "-")
    rows = [
        ("model", f"{s['model']} ({s['family']}, {s['protocol']})"),
        ("parameters", f"{fmt_params(s['n_params'])} ({s['n_params']:,})"),
        ("weights", f"synthetic, the release's shapes ({s['source']})" if s["synthetic"] else s["weights"]),
        ("device / dtype / threads", f"{s['device']} / {s['dtype']} / {s['threads']}"),
        ("prompt tokens", f"{s['prompt_tokens']} ({s['prompt_note']})"),
        ("prefill", f"{s['prefill_s']:.3f} s"),
        ("decode", f"{s['decode_s']:.3f} s ({s['new_tokens'] - 1} steps)"),
        (f"total, {s['new_tokens']} tokens", f"{s['total_s']:.3f} s"),
        ("tokens/s", f"{s['tokens_per_s']:.2f} (decode only: "
                     + (f"{s['decode_tokens_per_s']:.2f})" if s["decode_tokens_per_s"] else "-)")),
        ("weight bandwidth", bw),
        ("peak memory excl. params", f"{fmt_bytes(s['peak_bytes'])} ({s['mem_method']}; state/KV alone "
                                     f"{fmt_bytes(s.get('expected_runtime_bytes'))})"),
        ("repeats", f"{s['repeats']} (median)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def validate(args, prog):
    """Problems found before any child starts (the child reports load failures itself)."""
    from bench import models
    try:
        models.family_of(args.model)
    except ValueError as e:
        fail(prog, str(e))
    if args.tokens <= 0:
        fail(prog, f"--tokens must be >= 1, got {args.tokens}")
    if args.repeats < 1:
        fail(prog, f"--repeats must be >= 1, got {args.repeats}")
    if args.threads is not None and args.threads < 1:
        fail(prog, f"--threads must be >= 1, got {args.threads}")
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            fail(prog, "--device cuda but no CUDA GPU is available")
    if args.checkpoint is not None:
        p = Path(args.checkpoint)
        if not p.exists():
            fail(prog, f"--checkpoint {p}: no such file or directory")
        if not os.access(p, os.R_OK):
            fail(prog, f"--checkpoint {p}: not readable")
    ok, why = models.fits(args.model, args.device, args.tokens, protocol=args.protocol, dtype=args.dtype)
    if not ok:
        print(f"{prog}: warning: {args.model} may not fit: {why}", file=sys.stderr)


def build_parser(prog="python -m bench.generate"):
    p = OneLineParser(prog=prog, description=__doc__)
    p.add_argument("--model", required=True, help="rwkv-4-pile-169m ... -14b, pythia-*, opt-*, gpt-neo-*, bloom-*")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--tokens", type=int, default=512, help="tokens to generate (default 512)")
    p.add_argument("--prompt", default=DRAGON_PROMPT, help="prompt text (default: the paper's dragon prompt)")
    p.add_argument("--checkpoint", help="real weights (else synthetic weights of the same shapes)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all usable cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--protocol", default="kv-cache", choices=["kv-cache", "paper"],
                   help="transformers: KV cache (default) or the paper's full recompute per step")
    p.add_argument("--repeats", type=int, default=1, help="fresh-process runs; the median is shown")
    p.add_argument("--timeout", type=float, default=None, help="kill a run after this many seconds")
    p.add_argument("--probe-overhead", action="store_true",
                   help="also time decode with and without the RSS sampler thread and print the ratio")
    p.add_argument("--json", help="write all runs and the median here (atomically, only on success)")
    return p


def main(argv=None):
    prog = "bench.generate"
    args = build_parser().parse_args(argv)
    validate(args, prog)
    from bench.machine import default_threads, get as machine_get
    threads = args.threads or default_threads()
    spec = dict(model=args.model, device=args.device, dtype=args.dtype, tokens=args.tokens, prompt=args.prompt,
                checkpoint=args.checkpoint, threads=threads, seed=args.seed, protocol=args.protocol)
    machine = machine_get(args.device, threads)
    runs = []
    for i in range(args.repeats):
        r = run_child(spec, args.timeout)
        if r["status"] != "ok":
            fail(prog, f"{args.model}: {r['error']}")
        print(f"run {i + 1}/{args.repeats}: {r['total_s']:.3f} s for {args.tokens} tokens, "
              f"peak {fmt_bytes(r['peak_bytes'])} excl. params", file=sys.stderr)
        runs.append(r)
    summary = add_machine_share(median_summary(runs), machine)
    print(table(summary))
    overhead = None
    if args.probe_overhead:
        overhead = run_child({**spec, "mode": "overhead"}, args.timeout)
        if overhead["status"] != "ok":
            fail(prog, f"--probe-overhead: {overhead['error']}")
        print(f"probe overhead: RSS sampler thread x{overhead['sampler_ratio']:.3f} generation time "
              f"({overhead['plain_s']:.3f} s -> {overhead['sampled_s']:.3f} s); per-step peak read "
              f"x{overhead['trace_ratio']:.4f}; clear_refs: none during generation")
    if args.json:
        write_json_atomic(args.json, {"schema": "bench.generate/1", "args": vars(args), "machine": machine,
                                      "summary": summary, "runs": runs, "probe_overhead": overhead})


if __name__ == "__main__":
    main()
