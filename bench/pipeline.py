"""The pipeline on localhost: 1, 2, 3 ranks over gloo, each run launched with torchrun by this command.

    python -m bench.pipeline --model rwkv-4-pile-169m --ranks 1,2,3 --batch 1,4,8 --tokens 64 --json pipe.json

Per rank count: single-stream decode tokens/s (against the 1-rank run: the same code without any
boundary), the added latency per token per stage boundary, aggregate decode tokens/s for each batch
size B > 1 (a) with generate(), all streams stepping together in micro-batches (one per stage),
and (b) interleaved: one group of streams per stage, each group resubmitted as soon as its logits
are back (`pipeline.decode_interleaved`), and each rank's peak RSS against its share of the weights
+ its state + 100 MB (the table subtracts the RSS the process had after importing python, torch and
the engine, ~260 MB here, most of it torch's shared libraries; the JSON has both). Threads: each rank gets its share of the cores (`--threads-per-rank share`,
default) or all of them with idle OpenMP threads asleep (`all`: OMP_WAIT_POLICY=PASSIVE; for one
stream only one rank works at a time). Every torchrun is killed (its whole process group) on
timeout or Ctrl-C.
"""
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.cli import OneLineParser, check_writable_file, command, fail, positive_float, positive_int, positive_int_list, write_json_atomic

REPO = Path(__file__).resolve().parent.parent


PROG = "bench.pipeline"


def build_parser():
    p = OneLineParser(prog="python -m bench.pipeline", description=__doc__)
    p.add_argument("--model", required=True, help="a registered RWKV-4 name (synthetic weights) or a checkpoint path")
    p.add_argument("--checkpoint", help="real weights for a registered name")
    p.add_argument("--ranks", type=positive_int_list, default=[1, 2, 3], help="rank counts to run (default 1,2,3)")
    p.add_argument("--batch", type=positive_int_list, default=[1, 4, 8], help="batch sizes (default 1,4,8)")
    p.add_argument("--tokens", type=int, default=64, help="tokens generated per run (default 64)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--threads-per-rank", default="share", choices=["share", "all"])
    p.add_argument("--threads", type=int, help="torch threads of every rank (overrides --threads-per-rank's count)")
    p.add_argument("--layers-per-rank", help="e.g. 5,7: the split of the runs with that many ranks (others: even)")
    p.add_argument("--timeout", type=positive_float, default=900, help="kill a torchrun after this many seconds")
    p.add_argument("--json", help="write every result here")
    return p


# ---------------------------------------------------------------------------------------------
# Parent: one torchrun per rank count

def run_torchrun(ranks, spec, timeout):
    from rwkv_engine.process import usable_cores
    cores = usable_cores()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    threads = spec["threads"] or (max(1, cores // ranks) if spec["threads_per_rank"] == "share" else cores)
    env.update(OMP_NUM_THREADS=str(threads))
    if spec["threads_per_rank"] == "all":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    with tempfile.TemporaryDirectory(prefix="bench_pipe_") as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
               "-m", "bench.pipeline", "--child", json.dumps({**spec, "threads": threads}), out]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            _, err = proc.communicate(timeout=timeout)
        except BaseException:                   # timeout or Ctrl-C: take every rank down
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)      # stragglers of a finished run, if any
            except ProcessLookupError:
                pass
        result = Path(out) / "rank0.json"
        if proc.returncode != 0 or not result.exists():
            raise RuntimeError(f"{ranks} ranks: torchrun exited with {proc.returncode}: {first_error(err)}")
        return [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(ranks)]


def first_error(stderr):
    """The pipeline's own one-line error from the ranks' output, else the last line saying error."""
    lines = stderr.splitlines()
    ours = [ln.split("PipelineError: ", 1)[1] for ln in lines if "PipelineError: " in ln]
    ours += [ln.split(": error: ", 1)[1] for ln in lines if "rwkv_engine.pipeline: rank" in ln]
    if ours:
        return ours[0].strip()
    rest = [ln for ln in lines if "error" in ln.lower()] or lines or ["no output"]
    return rest[-1].strip()


def summarise(per_ranks, batches):
    """Rows of the table; speeds relative to the 1-rank run when there is one."""
    base = per_ranks.get(1)
    rows = []
    for ranks, ranks_info in sorted(per_ranks.items()):
        r0 = ranks_info[0]
        row = {"ranks": ranks, "split": [i["layers"] for i in ranks_info], "threads": r0["threads"]}
        one = r0["runs"].get("1")
        if one:
            row["decode_tok_s"] = one["sync_tok_s"]
            row["step_ms"] = one["step_ms"]
            if base and ranks > 1 and base[0]["runs"].get("1"):
                b = base[0]["runs"]["1"]
                row["vs_1_rank_pct"] = 100 * one["sync_tok_s"] / b["sync_tok_s"]
                row["added_ms_per_boundary"] = (one["step_ms"] - b["step_ms"]) / (ranks - 1)
        for B in batches:
            run = r0["runs"].get(str(B))
            if run and B > 1:
                row[f"B{B}_sync_tok_s"] = run["sync_tok_s"]
                row[f"B{B}_interleaved_tok_s"] = run["interleaved_tok_s"]
        row["rss"] = [{"peak_MB": i["peak_rss"] / 1e6, "import_MB": i["import_rss"] / 1e6,
                       "expected_MB": i["expected_rss"] / 1e6} for i in ranks_info]
        rows.append(row)
    return rows


def weights_line(per_ranks):
    """What the table's runs ran on: synthetic weights (said so) or the checkpoint."""
    r0 = next(iter(per_ranks.values()))[0]
    if r0.get("synthetic"):
        return f"weights: synthetic, the release's shapes ({r0['source']}): speeds and memory are real, text is not"
    return f"weights: {r0.get('source', '?')}"


def table(rows, batches):
    head = ["ranks", "layers", "thr", "B=1 tok/s", "vs 1 rank", "+ms/boundary"]
    for B in batches:
        if B > 1:
            head += [f"B={B} sync", f"B={B} interl."]
    head += ["per rank: peak RSS - RSS after imports / weights+state+100 MB"]
    lines = [head]
    for r in rows:
        fmt = lambda v, f="{:.1f}": "-" if v is None else f.format(v)
        cells = [str(r["ranks"]), " ".join(f"{a}-{b - 1}" for a, b in r["split"]), str(r["threads"]),
                 fmt(r.get("decode_tok_s")), fmt(r.get("vs_1_rank_pct"), "{:.0f}%"), fmt(r.get("added_ms_per_boundary"), "{:.2f}")]
        for B in batches:
            if B > 1:
                cells += [fmt(r.get(f"B{B}_sync_tok_s")), fmt(r.get(f"B{B}_interleaved_tok_s"))]
        cells.append(", ".join(f"{x['peak_MB'] - x['import_MB']:.0f}/{x['expected_MB']:.0f}" for x in r["rss"]))
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines)


@command("bench.pipeline")
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        return child(json.loads(argv[1]), Path(argv[2]))
    args = build_parser().parse_args(argv)
    if args.tokens < 2:
        fail(PROG, f"--tokens must be >= 2, got {args.tokens}")
    if args.json:
        check_writable_file(args.json, "--json")          # before any run (the top level makes it one line)
    from rwkv_engine import write_synthetic
    from rwkv_engine.config import get_config
    try:
        if "/" in args.model or Path(args.model).exists():
            if not Path(args.model).exists():
                raise ValueError(f"{args.model}: no such checkpoint")
        else:
            get_config(args.model)                       # unknown names fail here, with the list
            if args.checkpoint is None:
                from rwkv_engine.checkpoint import synthetic_notice
                if synthetic_notice(args.model):
                    print(synthetic_notice(args.model), file=sys.stderr, flush=True)
                write_synthetic(args.model)              # once, here, not by every rank at once
    except ValueError as e:
        fail(PROG, f"{e}")
    if args.threads is not None and args.threads < 1:
        fail(PROG, f"--threads must be >= 1, got {args.threads}")
    from rwkv_engine.pipeline import parse_layers_per_rank
    try:
        per_rank = parse_layers_per_rank(args.layers_per_rank) if args.layers_per_rank else None
    except ValueError as e:
        fail(PROG, str(e))
    spec = {k: getattr(args, k) for k in ("model", "checkpoint", "batch", "tokens", "dtype", "threads_per_rank", "threads")}
    spec["layers_per_rank"] = per_rank
    per_ranks = {}
    for ranks in args.ranks:
        t0 = time.time()
        try:
            per_ranks[ranks] = run_torchrun(ranks, spec, args.timeout)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            fail(PROG, f"{e}")
        print(f"{ranks} rank(s): done in {time.time() - t0:.0f} s", file=sys.stderr)
    rows = summarise(per_ranks, args.batch)
    print(weights_line(per_ranks))
    print(table(rows, args.batch))
    if args.json:
        write_json_atomic(args.json, {"schema": "bench.pipeline/1", "args": vars(args), "rows": rows,
                                      "raw": {str(k): v for k, v in per_ranks.items()}})


# ---------------------------------------------------------------------------------------------
# Child: every rank of one torchrun

def stage_weight_bytes(model):
    tensors = [model.emb, model.head, model.ln_out_w, model.ln_out_b]
    tensors += [t for blk in model.blocks for t in vars(blk).values()]
    return sum(t.nbytes for t in tensors if t is not None)


def status_bytes(field):
    """A field of /proc/self/status (VmRSS, VmHWM, RssAnon, RssFile) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None


def child(spec, out):
    import torch
    from bench import DRAGON_PROMPT
    from rwkv_engine import pipeline
    rank = int(os.environ["RANK"])
    import_rss = status_bytes("VmRSS")            # python + torch + the engine, before any weight
    per_rank = spec["layers_per_rank"]
    per_rank = per_rank if per_rank and len(per_rank) == int(os.environ["WORLD_SIZE"]) else None
    model = pipeline.load(spec["model"], checkpoint=spec["checkpoint"], dtype=spec["dtype"], layers_per_rank=per_rank,
                          threads=spec["threads"], exit_workers=False, timeout_s=300)
    stage = model.stage.model
    info = {"rank": rank, "layers": [stage.layers.start, stage.layers.stop], "threads": torch.get_num_threads(),
            "synthetic": bool(stage.synthetic), "source": str(stage.source)}
    if rank == 0:
        info["runs"] = measure(model, spec, DRAGON_PROMPT)
        model.close()
    info["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    info.update(import_rss=import_rss, rss_anon=status_bytes("RssAnon"), rss_file=status_bytes("RssFile"))
    info["expected_rss"] = stage_weight_bytes(stage) + stage.state_bytes(max(spec["batch"])) + 100e6
    (out / f"rank{rank}.json").write_text(json.dumps(info))


def measure(model, spec, prompt_text):
    import torch
    from rwkv_engine import pipeline
    tok = model.tokenizer
    ids = tok.encode(prompt_text) if tok else [int(i) % model.vocab_size for i in range(7, 7 + 41 * 97, 97)]
    runs = {}
    model.generate(ids, 4, temperature=0)                                # warm-up
    for B in spec["batch"]:
        prompt = torch.tensor([ids] * B)
        res = model.generate(prompt, spec["tokens"], temperature=0)      # all streams step together
        steps = res.step_s
        run = {"sync_tok_s": B * len(steps) / sum(steps), "step_ms": 1e3 * statistics.median(steps),
               "prefill_s": res.prefill_s}
        if B > 1:
            inter = pipeline.decode_interleaved(model, prompt, spec["tokens"])
            run["interleaved_tok_s"] = B * (spec["tokens"] - 1) / inter["decode_s"]
            run["same_tokens"] = inter["tokens"] == res.tokens
        runs[str(B)] = run
    return runs


# ---------------------------------------------------------------------------------------------
# bench.generate --pipeline: this process is one rank of a torchrun

def add_pipeline_arguments(p):
    p.add_argument("--pipeline", action="store_true",
                   help="split the layers among the ranks of a torchrun (RWKV only; see bench.pipeline)")
    p.add_argument("--layers-per-rank", help="with --pipeline: e.g. 13,14,13 (default: even)")
    p.add_argument("--micro-batches", type=positive_int,
                   help="with --pipeline: groups of streams in flight (default: ranks)")
    p.add_argument("--prompt-chunk", type=positive_int, help="with --pipeline: prompt tokens per chunk (default: whole)")
    p.add_argument("--pipeline-timeout", type=positive_float, default=60.0,
                   help="with --pipeline: seconds before a silent rank is declared dead or hung (default 60)")


def generate_pipelined(args, fail):
    """Load this rank's layers, and on rank 0 generate as bench.generate does (the paper's sampling,
    seeded) and return the run's record, in the shape of a single-process run's (bench.runner's
    RunResult; what the pipeline does not measure is None, and ranks/layers/rank0_peak_rss are
    added); other ranks serve until rank 0 is done, then exit."""
    if "RANK" not in os.environ:
        fail("--pipeline runs under torchrun, e.g. torchrun --standalone --nproc-per-node 2 -m bench.generate "
             f"--model {args.model} --pipeline")
    from bench import models
    try:
        kind, _ = models.classify(args.model)        # a name, an alias or a checkpoint path, as without --pipeline
    except ValueError as e:
        fail(str(e))
    if kind != models.RWKV:
        fail(f"--pipeline splits RWKV models only, not {args.model}")
    import torch
    from rwkv_engine import SamplingParams, pipeline
    from rwkv_engine.pipeline import parse_layers_per_rank
    if int(os.environ["RANK"]) == 0:
        pipeline.stop_on_signals()               # SIGTERM/SIGINT: shut the pipeline down, exit 0
    t0 = time.perf_counter()
    try:
        per_rank = parse_layers_per_rank(args.layers_per_rank) if args.layers_per_rank else None
        model = pipeline.load(args.model, checkpoint=args.checkpoint, dtype=args.dtype, layers_per_rank=per_rank,
                              micro_batches=args.micro_batches, prompt_chunk=args.prompt_chunk,
                              timeout_s=args.pipeline_timeout, threads=args.threads,
                              backend="nccl" if args.device == "cuda" else "gloo")
    except (ValueError, pipeline.PipelineError) as e:
        fail(str(e))
    load_s = time.perf_counter() - t0
    tok = model.tokenizer
    ids = tok.encode(args.prompt) if tok else [i % model.vocab_size for i in range(7, 7 + 41 * 97, 97)]
    prompt = torch.tensor([ids] * args.batch)
    paper = SamplingParams(temperature=1.0, top_k=0, top_p=1.0)
    try:
        t0 = time.perf_counter()
        model.generate(prompt, min(4, args.tokens), sampling=paper, seed=args.seed)       # warm-up
        warmup_s = time.perf_counter() - t0
        res = model.generate(prompt, args.tokens, sampling=paper, seed=args.seed)
    except pipeline.PipelineError as e:
        fail(str(e))
    except pipeline.Stopped as e:
        model.close()
        print(f"bench.generate: {e}: the pipeline is shut down, nothing measured", file=sys.stderr)
        sys.exit(0)
    run = pipelined_run(args, model, ids, "own tokenizer" if tok else "no tokenizer: fixed ids", res, load_s, warmup_s)
    model.close()
    return run


def pipelined_run(args, model, ids, prompt_note, res, load_s, warmup_s):
    """The record of one pipelined generation: bench.runner's RunResult, as a single-process run
    gives it, plus the pipeline's own fields."""
    import torch
    from bench.runner import RunResult
    not_measured = {"others_cpu_s": None, "others_cpu_pct": None, "loadavg_1m": None}     # the other ranks are "others"
    info = {"family": "rwkv", "n_params": int(model.config.n_params), "synthetic": bool(model.synthetic),
            "provenance": "synthetic" if model.synthetic else str(model.source),
            "weights": "synthetic" if model.synthetic else str(model.source), "source": str(model.source),
            "weight_bytes_per_token": None, "expected_runtime_bytes": None, "version": None,
            "torch": torch.__version__, "baseline_bytes": None}
    extra = {"ranks": len(model.split), "layers": [[r.start, r.stop] for r in model.split],
             "rank0_peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    result = RunResult(model=args.model, peer="ours", device=args.device, dtype=args.dtype, weight_format=model.weight_format,
                       threads=torch.get_num_threads(), batch=args.batch, protocol="recurrent", seed=args.seed,
                       prompt_tokens=len(ids), prompt_note=prompt_note, new_tokens=args.tokens, load_s=load_s,
                       warmup_s=warmup_s, prefill_s=res.prefill_s, step_s=list(res.step_s), token_ids=res.tokens,
                       peak_bytes=None, mem_method=None, machine_load=not_measured, info=info, extra=extra)
    return {**result.to_dict(), "status": "ok"}


def pipelined_table(s):
    """Two-column table of a pipelined run's summary (bench.generate's summary shape)."""
    decode = s["decode_tokens_per_s"]
    rows = [("model", f"{s['model']} over {s['ranks']} ranks, layers "
                      + ", ".join(f"{a}-{b - 1}" for a, b in s["layers"])),
            ("weights", f"synthetic, the release's shapes ({s['source']})" if s["synthetic"] else s["weights"]),
            ("device / dtype / threads per rank", f"{s['device']} / {s['dtype']} / {s['threads']}"),
            ("streams x prompt tokens", f"{s['batch']} x {s['prompt_tokens']}"),
            ("prefill", f"{s['prefill_s']:.3f} s"),
            (f"decode ({s['new_tokens'] - 1} steps)", f"{s['decode_s']:.3f} s"),
            ("tokens/s per stream", f"{s['tokens_per_s']:.2f} (decode only: " + (f"{decode:.2f})" if decode else "-)")),
            ("tokens/s (all streams)", f"{s['aggregate_tokens_per_s']:.2f} (decode only: "
                                       + (f"{s['batch'] * decode:.2f})" if decode else "-)")),
            ("rank 0 peak RSS", f"{s['rank0_peak_rss'] / 1e6:.0f} MB")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


if __name__ == "__main__":
    main()
