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

With --pipeline (RWKV only) the layers are split among the ranks of a torchrun and this process is
one rank; rank 0 generates once, in this process, and prints the table:

    torchrun --standalone --nproc-per-node 2 -m bench.generate --model rwkv-4-pile-169m --pipeline --json p.json

--json writes one schema (`bench.generate/1`) with or without --pipeline:
    args           the command's arguments
    machine        the bandwidth baseline divided by (null with --pipeline)
    summary        the run's facts (model, family, n_params, synthetic, weights, source, device, dtype,
                   weight_format, threads, batch, protocol, prompt_tokens, new_tokens ...) and the median
                   over the repeats of each timing and memory field (prefill_s, decode_s, total_s,
                   tokens_per_s and decode_tokens_per_s per stream, aggregate_tokens_per_s for all
                   streams, weight_GBps, peak_bytes ...); never the per-run lists
    runs           one record per repeat, with everything, including token_ids [stream][token], step_s
    probe_overhead --probe-overhead's ratios, else null
With --pipeline there is one run; what it does not measure is null (peak_bytes, weight_GBps,
others_cpu_pct) and ranks, layers and rank0_peak_rss are added.
"""
import os
import statistics
import sys
from pathlib import Path

from bench import DRAGON_PROMPT
from bench.cli import (WEIGHT_FORMATS, OneLineParser, check_writable_file, command, fail, fmt_bytes, fmt_params,
                       positive_float, positive_int, write_json_atomic)
from bench.cpuload import busy_warning
from bench.pipeline import add_pipeline_arguments
from bench.runner import run_child

SUMMARY_FIELDS = ("prefill_s", "decode_s", "total_s", "tokens_per_s", "decode_tokens_per_s", "aggregate_tokens_per_s",
                  "weight_GBps", "peak_bytes", "load_s", "others_cpu_pct", "others_cpu_s", "loadavg_1m")
PER_RUN_FIELDS = ("step_s", "mem_trace", "token_ids")


def median_summary(runs):
    """Median of each timing/memory field over the repeats (all of which succeeded)."""
    out = {k: v for k, v in runs[0].items() if k not in SUMMARY_FIELDS and k not in PER_RUN_FIELDS}
    for key in SUMMARY_FIELDS:
        vals = [r[key] for r in runs if r.get(key) is not None]
        out[key] = statistics.median(vals) if vals else None
    out["repeats"] = len(runs)
    return out


def add_machine_share(summary, machine):
    """The achieved bandwidth as a share of the measured one, with what qualifies that share
    (bandwidth_note: a suspect baseline, or why it is above 100%) and the baseline's problem."""
    from bench.machine import baseline_problem, share_caveats
    if machine and summary.get("weight_GBps") is not None:
        summary["machine_read_GBps"] = machine["read_bandwidth_GBps"]
        summary["bandwidth_pct"] = 100 * summary["weight_GBps"] / machine["read_bandwidth_GBps"]
        summary["bandwidth_note"] = "; ".join(share_caveats(summary["bandwidth_pct"], machine,
                                                            summary.get("weight_bytes_per_token")))
        summary["baseline_problem"] = baseline_problem(machine)
    return summary


def _fmt_load(s):
    if s.get("others_cpu_pct") is None:
        return "-"
    return f"{s['others_cpu_pct']:.1f}% of the CPU time used by other processes (load average {s['loadavg_1m']:.2f})"


def table(s):
    """Two-column table of one model's median results."""
    bw = "-"
    if s.get("bandwidth_pct") is not None:
        note = f"; {s['bandwidth_note']}" if s.get("bandwidth_note") else ""
        bw = f"{s['weight_GBps']:.1f} GB/s ({s['bandwidth_pct']:.0f}% of {s['machine_read_GBps']:.1f} GB/s measured{note})"
    per_stream = f"{s['tokens_per_s']:.2f} (decode only: " + (
        f"{s['decode_tokens_per_s']:.2f})" if s["decode_tokens_per_s"] else "-)")
    rows = [
        ("model", f"{s['model']} ({s['family']}, {s['protocol']})"),
        ("parameters", f"{fmt_params(s['n_params'])} ({s['n_params']:,})"),
        ("weights", f"synthetic, the release's shapes ({s['source']})" if s["synthetic"] else s["weights"]),
        ("device / dtype / weights / threads",
         f"{s['device']} / {s['dtype']} / {s['weight_format']} / {s['threads']}"),
        ("prompt tokens", f"{s['prompt_tokens']} ({s['prompt_note']})"),
        ("prefill", f"{s['prefill_s']:.3f} s"),
        ("decode", f"{s['decode_s']:.3f} s ({s['new_tokens'] - 1} steps)"),
        (f"total, {s['new_tokens']} tokens", f"{s['total_s']:.3f} s"),
        ("tokens/s" + (" per stream" if s["batch"] > 1 else ""), per_stream),
    ]
    if s["batch"] > 1:
        rows.append((f"tokens/s, {s['batch']} streams", f"{s['aggregate_tokens_per_s']:.2f}"))
    rows += [
        ("weight bandwidth", bw),
        *([("bandwidth baseline", f"suspect: {s['baseline_problem']} (not cached; measure again on a quiet machine: "
                                  "python -m bench.machine --refresh)")] if s.get("baseline_problem") else []),
        ("peak memory excl. params", f"{fmt_bytes(s['peak_bytes'])} ({s['mem_method']}; state/KV alone "
                                     f"{fmt_bytes(s.get('expected_runtime_bytes'))})"),
        ("machine load", _fmt_load(s)),
        ("repeats", f"{s['repeats']} (median)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def check_checkpoint(path):
    """One-line ValueError for a --checkpoint that cannot be a checkpoint (before any child starts)."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"--checkpoint {p}: no such file or directory")
    if not os.access(p, os.R_OK):
        raise ValueError(f"--checkpoint {p}: not readable")
    if p.is_dir() and not any(p.iterdir()):
        raise ValueError(f"--checkpoint {p}: empty directory (expected a .pth/.safetensors file or a HF directory)")
    if p.is_file() and p.stat().st_size == 0:
        raise ValueError(f"--checkpoint {p}: empty file")
    if not p.is_dir() and not p.is_file():
        raise ValueError(f"--checkpoint {p}: not a regular file or directory")


def check_paths(args, prog):
    """--checkpoint readable and --json writable, before any work (one line and exit 2 if not)."""
    try:
        if args.checkpoint is not None:
            check_checkpoint(args.checkpoint)
        if args.json:
            check_writable_file(args.json, "--json")
    except ValueError as e:
        fail(prog, str(e))


def validate(args, prog):
    """Problems found before any child starts (the child reports load failures itself)."""
    from bench import models
    try:
        models.family_of(args.model)
    except ValueError as e:
        fail(prog, str(e))
    check_paths(args, prog)
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            fail(prog, "--device cuda but no CUDA GPU is available")
    ok, why = models.fits(args.model, args.device, args.tokens, protocol=args.protocol, dtype=args.dtype,
                          weights=args.weights)
    if not ok:
        print(f"{prog}: warning: {args.model} may not fit: {why}", file=sys.stderr)


def add_run_arguments(p, device_help=None, timeout_help="kill a run after this many seconds"):
    """What every command that runs a model takes, with the same names and checks. device_help:
    the device is a free-form list (bench.sweep: "cpu,cuda"), checked by the command."""
    if device_help:
        p.add_argument("--device", default="cpu", help=device_help)
    else:
        p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="compute dtype (default float32, as the paper)")
    p.add_argument("--weights", default=None, choices=WEIGHT_FORMATS,
                   help="weight format (default: the same as --dtype)")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: all usable cores)")
    p.add_argument("--timeout", type=positive_float, default=None, help=timeout_help)


def build_parser(prog="python -m bench.generate"):
    p = OneLineParser(prog=prog, description=__doc__)
    p.add_argument("--model", required=True, help="rwkv-4-pile-169m ... -14b, pythia-*, opt-*, gpt-neo-*, bloom-*")
    add_run_arguments(p)
    p.add_argument("--tokens", type=positive_int, default=512, help="tokens to generate (default 512)")
    p.add_argument("--batch", type=positive_int, default=1,
                   help="streams decoded together (default 1); tokens/s is shown per stream and in all")
    p.add_argument("--prompt", default=DRAGON_PROMPT, help="prompt text (default: the paper's dragon prompt)")
    p.add_argument("--checkpoint", help="real weights (else synthetic weights of the same shapes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--protocol", default="kv-cache", choices=["kv-cache", "paper"],
                   help="transformers: KV cache (default) or the paper's full recompute per step")
    p.add_argument("--repeats", type=positive_int, default=1, help="fresh-process runs; the median is shown")
    p.add_argument("--probe-overhead", action="store_true",
                   help="also time decode with and without the RSS sampler thread and print the ratio")
    p.add_argument("--json", help="write all runs and the median here (atomically, only on success)")
    add_pipeline_arguments(p)
    return p


def first_use_note(model, weights=None):
    """A line saying what a first run must write (the synthetic checkpoint the run's weight format
    is made from: its format, size and the memory writing it takes), or ''."""
    from bench import models
    kind, key = models.classify(model)
    if kind == "rwkv":
        from rwkv_engine.checkpoint import synthetic_notice
        return "" if Path(key).exists() else synthetic_notice(key, weights)
    need = models.synthetic_checkpoint_missing(model)            # baselines.write_synthetic
    if not need:
        return ""
    return (f"first use of {key}: writing its synthetic checkpoint to the cache once: a {fmt_bytes(need)} float16 "
            f"Hugging Face directory, written block by block (little RAM)")


def run_repeats(spec, args, prog):
    runs = []
    for i in range(args.repeats):
        r = run_child(spec, args.timeout, progress=True)
        if r["status"] != "ok":
            fail(prog, f"{args.model}: {r['error']}")
        print(f"run {i + 1}/{args.repeats}: {r['total_s']:.3f} s for {args.tokens} tokens, "
              f"peak {fmt_bytes(r['peak_bytes'])} excl. params", file=sys.stderr)
        warning = busy_warning(r.get("others_cpu_pct"))
        if warning:
            print(warning, file=sys.stderr)
        runs.append(r)
    return runs


def probe_overhead(spec, args, prog):
    overhead = run_child({**spec, "mode": "overhead"}, args.timeout)
    if overhead["status"] != "ok":
        fail(prog, f"--probe-overhead: {overhead['error']}")
    print(f"probe overhead: RSS sampler thread x{overhead['sampler_ratio']:.3f} generation time "
          f"({overhead['plain_s']:.3f} s -> {overhead['sampled_s']:.3f} s); per-step peak read "
          f"x{overhead['trace_ratio']:.4f}; clear_refs: none during generation")
    return overhead


def main_pipelined(args, prog):
    """--pipeline: this process is one rank of a torchrun; rank 0 measures, prints and writes."""
    from bench.pipeline import generate_pipelined, pipelined_table
    if args.repeats != 1 or args.probe_overhead:
        fail(prog, "--pipeline generates once, in the ranks torchrun started: drop --repeats/--probe-overhead")
    if args.weights not in (None, args.dtype):
        fail(prog, f"--weights {args.weights} is not supported with --pipeline (the stages hold --dtype weights)")
    check_paths(args, prog)
    run = generate_pipelined(args, lambda message: fail(prog, message))      # workers exit inside
    summary = median_summary([run])
    print(pipelined_table(summary))
    if args.json:
        write_json_atomic(args.json, {"schema": "bench.generate/1", "args": vars(args), "machine": None,
                                      "summary": summary, "runs": [run], "probe_overhead": None})


@command("bench.generate")
def main(argv=None):
    prog = "bench.generate"
    args = build_parser().parse_args(argv)
    if args.pipeline:
        return main_pipelined(args, prog)
    validate(args, prog)
    from bench.machine import get as machine_get
    from rwkv_engine.process import usable_cores
    threads = args.threads or usable_cores()
    spec = dict(model=args.model, device=args.device, dtype=args.dtype, weights=args.weights, tokens=args.tokens,
                batch=args.batch, prompt=args.prompt, checkpoint=args.checkpoint, threads=threads, seed=args.seed,
                protocol=args.protocol)
    machine = machine_get(args.device, threads)
    note = first_use_note(args.model, args.weights) if args.checkpoint is None else ""
    if note:
        print(note, file=sys.stderr)
    runs = run_repeats(spec, args, prog)
    summary = add_machine_share(median_summary(runs), machine)
    print(table(summary))
    overhead = probe_overhead(spec, args, prog) if args.probe_overhead else None
    if args.json:
        write_json_atomic(args.json, {"schema": "bench.generate/1", "args": vars(args), "machine": machine,
                                      "summary": summary, "runs": runs, "probe_overhead": overhead})


if __name__ == "__main__":
    main()
