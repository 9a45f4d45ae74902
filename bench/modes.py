"""Sequence mode vs token mode: the same prompt fed in one call and one token per call.

    python -m bench.modes --model rwkv-4-pile-169m --prompt-tokens 512

Sequence mode runs matrix-matrix products and one WKV scan over time; token mode is the decode
step. Both start from a fresh state on the same random prompt ids (seeded); the time is the median
of --repeats runs after one warm-up. With `--peer` also BlinkDL's `rwkv` package (`cpu fp32`,
JIT on) on the same checkpoint and prompt, sequence mode (its whole prompt in one call).
`--weights` picks the weight format; `--against float32` also loads the model in that format and
alternates the two models' sequence-mode runs (same process, same minutes), printing both prompt
rates and their ratio: on a machine whose speed drifts by 10-20% between runs, that ratio is what
a separate run per format cannot give.
`--chunks 2,4,8,16,32,48` times one sequence-mode forward of a chunk of T tokens (from a state): as one C
call (the decode kernels for all its rows, `rwkv_kernels.sequence_layers`), and per op with
the products on the decode kernels ("short" in rwkv_kernels.dispatch) and on the GEMM, alternating in one
process: where the C step and the GEMM cross is where the format record's `short_rows` belongs.
`--step-rows 16,64,100000` adds a column per value: the C step with that many rows a call
(`rwkv_kernels.decode.STEP_ROWS`, 64; the bits do not depend on it), alternating with the rest.
`--profile` splits the decode step (token mode, `--batch` streams, `--steps` tokens per round, `--repeats`
rounds) into its parts, counted inside the C kernels decode runs (`rwkv_kernels.profile`): per matrix the
product time with its weight bytes and GB/s, the activation quantisation (int8), the time pool threads
spent without work (hand-offs, the wait for the last chunk), each element-wise op, the head and the rest
(the embedding and the final LayerNorm, in C, and Python's bookkeeping); with `--against` the two formats alternate round
by round and the step-time ratio is printed; `--json` writes the numbers:

    python -m bench.modes --profile --weights int8 --against float32
    python -m bench.modes --profile --weights int8 --against-step composed

`--against-step composed` alternates instead the same model with its token step run as the model's ops
one by one (`rwkv_kernels.decode_token`'s "composed": the layers' C call, then the final LayerNorm and
the head from Python) against the default one call: what the single call saves, in the same minutes.
`--against-src DIR` alternates instead the same model on the kernels built from DIR/cpu_ops.c (with
DIR's headers; e.g. `git worktree add /tmp/old HEAD~1` and DIR = /tmp/old/rwkv_kernels/csrc), for the
same instruction set: a kernel change measured on the whole step, in one process. Both of these say
whether the last step's logits were identical.

    python -m bench.modes --profile --weights int8 --batch 16 --against-src /tmp/old/rwkv_kernels/csrc
"""
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.cli import (WEIGHT_FORMATS, OneLineParser, check_writable_file, command, fmt_paired, paired_ratio,
                       positive_int, positive_int_list, write_json_atomic)
from bench.cpuload import OthersMeter, busy_warning


def _median_time(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def chunk_table(model, args):
    """ms per forward of a T-token chunk, three ways alternating: the C sequence step (the decode kernels
    for all the chunk's rows, one call: `rwkv_kernels.sequence_layers` "c"), the per-op sequence path with
    its products on the decode kernels, and the per-op path with the GEMM."""
    from rwkv_kernels import cpu_c, decode, dispatch
    fmt = model.weight_format
    limit = dispatch.short_rows(fmt)
    limit = "any number" if limit is None else f"at most {limit}"
    short, gemm = (dispatch.choose("linear", ("cpu", "float32", fmt, shape)) for shape in ("short", "sequence"))
    ways = {"step": dict(sequence_layers="c"), "ops": dict(linear=short), "gemm": dict(linear=gemm)}
    ways.update({rows: dict(sequence_layers="c") for rows in args.step_rows or ()})   # the C step, `rows` a call
    weights = "synthetic weights" if model.synthetic else model.source
    print(f"{args.model} ({weights}, {args.weights or 'float32'} weights), {args.threads} threads: one sequence-mode forward "
          f"of a T-token chunk, median of {args.repeats} (alternating); {fmt}'s short rows for the "
          f"{cpu_c.best_isa()} build: {limit} (the C step's sequences; it runs {decode.STEP_ROWS} rows a call)")
    extra = [f"C step, {rows} a call (ms)" for rows in args.step_rows or ()]
    print(f"{'T':>5}{'C step (ms)':>14}{'per-op, decode kernels (ms)':>30}{'per-op, GEMM (ms)':>20}{'GEMM / C step':>16}"
          + "".join(f"{h:>{len(h) + 3}}" for h in extra))
    for T in args.chunks:
        ids = torch.randint(0, model.vocab_size, (1, T), generator=torch.Generator().manual_seed(T))
        times = {name: [] for name in ways}
        for _ in range(args.repeats + 1):
            for name, forced in ways.items():
                step_rows = decode.STEP_ROWS
                decode.STEP_ROWS = name if isinstance(name, int) else step_rows
                try:
                    with dispatch.force(**forced):
                        state = model.new_state(1)
                        t0 = time.perf_counter()
                        model.forward(ids, state)
                        times[name].append(time.perf_counter() - t0)
                finally:
                    decode.STEP_ROWS = step_rows
        a, b, c, *more = (statistics.median(times[n][1:]) * 1e3 for n in ways)   # first round: warm-up
        print(f"{T:>5}{a:>14.1f}{b:>30.1f}{c:>20.1f}{c / a:>16.2f}"
              + "".join(f"{v:>{len(h) + 3}.1f}" for v, h in zip(more, extra)))


_MATRIX_PARTS = (("att_receptance", "att r"), ("att_key", "att k"), ("att_value", "att v"), ("att_output", "att o"),
                 ("ffn_receptance", "ffn r"), ("ffn_key", "ffn k"), ("ffn_value", "ffn v"), ("other", "head"))


def profile_rounds(models, B, steps, repeats, kernels=None, round_walls=None):
    """models: {name: model}; kernels: {name: CpuOps} for names whose rounds run on another kernel build
    (--against-src). Alternating rounds of `steps` decode steps per model (one warm-up round first);
    -> ({name: (counters summed over the timed rounds, wall seconds, steps)}, {name: last logits}).
    round_walls, a dict, gets {name: [wall seconds of each timed round]}."""
    from rwkv_kernels import cpu_c, profile
    ids = torch.randint(0, min(m.vocab_size for m in models.values()), (B, steps),
                        generator=torch.Generator().manual_seed(0))
    kernels = kernels or {}
    totals = {name: None for name in models}
    wall = {name: 0.0 for name in models}
    logits = {}
    for rnd in range(repeats + 1):
        for name, m in models.items():
            with cpu_c.routed(kernels[name]) if name in kernels else contextlib.nullcontext():
                state = m.new_state(B)
                profile.enable()
                t0 = time.perf_counter()
                for t in range(steps):
                    logits[name], _ = m.forward(ids[:, t:t + 1], state)
                dt = time.perf_counter() - t0
                counts = profile.read()
                profile.enable(False)
            if rnd == 0:
                continue                                           # warm-up
            if round_walls is not None:
                round_walls.setdefault(name, []).append(dt)
            wall[name] += dt
            totals[name] = counts if totals[name] is None else _add_counts(totals[name], counts)
    return {name: (totals[name], wall[name], steps * repeats) for name in models}, logits


def _add_counts(a, b):
    if isinstance(a, dict):
        return {k: _add_counts(a[k], b[k]) for k in a}
    return a + b


def profile_parts(counts, wall_s, steps):
    """Counters of `steps` decode steps -> rows (part, ms per step, bytes per step or None), the step's
    wall ms and the weight bytes per step."""
    per = 1e6 * steps                                           # ns in total -> ms per step
    prod = counts["products"]
    rows = []
    for tag, label in _MATRIX_PARTS:
        c = prod[tag]
        if c["products"]:
            rows.append((f"{label} products", (c["work_ns"]) / per, c["bytes"] / steps))
    quant = sum(c["quant_ns"] for c in prod.values()) / per
    idle = sum(c["idle_ns"] for c in prod.values()) / per
    rows.append(("activation quantisation", quant, None))
    rows.append(("pool idle (hand-offs, last chunk)", idle, None))
    for op, ns in counts["elementwise_ns"].items():
        rows.append((op, ns / per, None))
    inside = sum(prod[t]["wall_ns"] for t, _ in _MATRIX_PARTS if t != "other") + sum(counts["elementwise_ns"].values())
    rows.append(("decode_layers rest (scratch, loops)", max(0, counts["step_ns"] - inside) / per, None))
    step_ms = wall_s * 1e3 / steps
    rows.append(("embedding, final LN and Python", step_ms - counts["step_ns"] / per - prod["other"]["wall_ns"] / per,
                 None))
    weight_bytes = sum(c["bytes"] for c in prod.values()) / steps
    return rows, step_ms, weight_bytes


def print_profile(title, rows, step_ms, weight_bytes, B):
    print(title)
    print(f"{'part':<42}{'ms/step':>9}{'share':>8}{'MB/step':>9}{'GB/s':>7}")
    for name, ms, nbytes in rows:
        mb = f"{nbytes / 1e6:>9.1f}" if nbytes is not None else f"{'':>9}"
        gbs = f"{nbytes / ms / 1e6:>7.1f}" if nbytes is not None and ms > 0 else f"{'':>7}"
        print(f"{name:<42}{ms:>9.3f}{100 * ms / step_ms:>7.1f}%{mb}{gbs}")
    print(f"{'step (wall)':<42}{step_ms:>9.3f}{100.0:>7.1f}%{weight_bytes / 1e6:>9.1f}{weight_bytes / step_ms / 1e6:>7.1f}"
          f"   = {1e3 * B / step_ms:.1f} tok/s over {B} stream(s)")


def against_build(folder):
    """The kernel build of `folder`/cpu_ops.c (with that folder's headers), e.g. a `git worktree` of an older
    commit's rwkv_kernels/csrc, for the default build's instruction set; ValueError if there is none."""
    from rwkv_kernels import cpu_c
    src = Path(folder) / "cpu_ops.c"
    if not src.is_file():
        raise ValueError(f"--against-src {folder}: no cpu_ops.c there")
    try:
        return cpu_c.other_build(src)
    except cpu_c.BuildError as e:
        raise ValueError(f"--against-src {folder}: cannot build it: {str(e).splitlines()[0]}") from None


class _StepForced:
    """A model whose token step runs as `decode_token`'s implementation `impl` (--against-step)."""

    def __init__(self, model, impl):
        self.model, self.impl = model, impl

    def __getattr__(self, name):
        return getattr(self.model, name)

    def forward(self, tokens, state):
        from rwkv_kernels import dispatch
        with dispatch.force(decode_token=self.impl):
            return self.model.forward(tokens, state)


def profile_main(ap, args, model):
    """--profile: the decode step's parts for --weights (and --against, alternating)."""
    from bench import models
    from rwkv_kernels import cpu_c
    if not cpu_c.available():
        ap.exit(2, f"bench.modes: error: --profile counts inside the C kernels, which cannot run here: "
                   f"{cpu_c.unavailable_reason()}\n")
    fmt = args.weights or "float32"
    fmts, kernels = {fmt: model}, {}
    if args.against_step:
        fmts[f"{fmt} ({args.against_step} step)"] = _StepForced(model, args.against_step)
    elif args.against_src:
        name = f"{fmt} ({args.against_src} kernels)"
        fmts[name], kernels[name] = model, against_build(args.against_src)
    elif args.against and args.against != fmt:
        fmts[args.against] = models.load(args.model, checkpoint=args.checkpoint, weights=args.against)
    others = OthersMeter().start()
    walls = {}
    results, logits = profile_rounds(fmts, args.batch, args.steps, args.repeats, kernels, walls)
    load = others.stop()
    weights = "synthetic weights" if model.synthetic else str(model.source)
    out = {"model": args.model, "synthetic": bool(model.synthetic), "batch": args.batch, "threads": args.threads,
           "steps": args.steps, "repeats": args.repeats, "isa": cpu_c.ops().isa, "formats": {},
           "others_cpu_pct": load["others_cpu_pct"], "loadavg_1m": load["loadavg_1m"]}
    for fmt, (counts, wall_s, steps) in results.items():
        rows, step_ms, weight_bytes = profile_parts(counts, wall_s, steps)
        if counts["steps"] == 0:
            print(f"note: {fmt}: no step ran through the C decode step (decode_layers): its parts are not counted",
                  file=sys.stderr)
        print_profile(f"{args.model} ({weights}), {fmt} weights, {args.batch} stream(s), {args.threads} threads, "
                      f"{cpu_c.ops().isa} kernels: decode step parts over {steps} steps ({args.repeats} rounds"
                      f"{', alternating formats' if len(results) > 1 else ''})", rows, step_ms, weight_bytes, args.batch)
        out["formats"][fmt] = {"step_ms": step_ms, "tokens_per_s": 1e3 * args.batch / step_ms,
                               "weight_bytes_per_step": weight_bytes,
                               "parts": [{"part": n, "ms_per_step": ms, "bytes_per_step": b,
                                          "GBps": (b / ms / 1e6 if b is not None and ms > 0 else None)}
                                         for n, ms, b in rows],
                               "counters": counts}
        print()
    if len(results) > 1:
        (a, ra), (b, rb) = list(out["formats"].items())[:2]
        pair = paired_ratio(walls[b], walls[a])
        out["step_ratio_paired"] = {"median": pair[0], "q1": pair[1], "q3": pair[2], "rounds": len(walls[a])}
        print(f"step time {b} / {a}: {rb['step_ms'] / ra['step_ms']:.3f}x ({a} {ra['tokens_per_s']:.1f} tok/s, "
              f"{b} {rb['tokens_per_s']:.1f} tok/s); round by round {fmt_paired(pair)} (median, quartiles)")
        if args.against_step or args.against_src:           # the same model and weights: the same bits expected
            same = torch.equal(logits[a], logits[b])
            out["same_logits"] = same
            print(f"last step's logits: {'identical' if same else 'DIFFERENT'} ({a} vs {b})")
    report_load(load)
    if args.json:
        write_json_atomic(args.json, out)
    return 0


def build_parser():
    ap = OneLineParser(prog="python -m bench.modes", description=__doc__)
    ap.add_argument("--model", default="rwkv-4-pile-169m")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--weights", default=None, choices=WEIGHT_FORMATS, help="weight format (default float32)")
    ap.add_argument("--against", default=None, choices=WEIGHT_FORMATS,
                    help="also time this weight format, alternating with --weights, and print the ratio")
    ap.add_argument("--prompt-tokens", type=positive_int, default=512)
    ap.add_argument("--repeats", type=positive_int, default=3)
    ap.add_argument("--threads", type=positive_int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--peer", action="store_true", help="also time BlinkDL's rwkv package")
    ap.add_argument("--chunks", default=None, type=positive_int_list,
                    help="comma-separated chunk lengths: time the short-chunk products against the GEMM")
    ap.add_argument("--step-rows", default=None, type=positive_int_list,
                    help="--chunks: also time the C step with each of these rows per call (see above)")
    ap.add_argument("--profile", action="store_true", help="split the decode step into its parts (see above)")
    ap.add_argument("--steps", type=positive_int, default=32, help="--profile: decode steps per round (default 32)")
    ap.add_argument("--batch", type=positive_int, default=1, help="--profile: streams decoded together (default 1)")
    ap.add_argument("--json", default=None, help="--profile: also write the numbers here (JSON)")
    ap.add_argument("--against-step", default=None, choices=("composed",),
                    help="--profile: alternate with the same model's token step run op by op (see above)")
    ap.add_argument("--against-src", default=None, metavar="DIR",
                    help="--profile: alternate with the same model on the kernels built from DIR/cpu_ops.c (see above)")
    return ap


def report_load(load):
    """The other processes' CPU share while measuring, and the loud warning when they took too much."""
    if load["others_cpu_pct"] is not None:
        print(f"other processes used {load['others_cpu_pct']:.1f}% of the CPU meanwhile "
              f"(load average {load['loadavg_1m']:.2f})")
    warning = busy_warning(load["others_cpu_pct"])
    if warning:
        print(warning, file=sys.stderr)


def against_main(args, model, ids, others):
    """--against: the two formats' sequence-mode runs alternating, both rates and their ratio."""
    from bench import models
    other = models.load(args.model, checkpoint=args.checkpoint, weights=args.against)
    runs = {"ours": [], "other": []}
    for m in (model, other):
        m.forward(ids, m.new_state(1))                         # warm-up
    for _ in range(args.repeats):
        for key, m in (("ours", model), ("other", other)):
            t0 = time.perf_counter()
            m.forward(ids, m.new_state(1))
            runs[key].append(time.perf_counter() - t0)
    a, b = statistics.median(runs["ours"]), statistics.median(runs["other"])
    n = args.prompt_tokens
    weights = "synthetic weights" if model.synthetic else model.source
    print(f"{args.model} ({weights}), {n}-token prompt, sequence mode, {args.threads} threads, runs alternating, "
          f"median of {args.repeats}")
    print(f"{args.weights or 'float32'} weights: {n / a:.1f} tok/s; {args.against} weights: {n / b:.1f} tok/s; "
          f"ratio {b / a:.3f}")
    report_load(others.stop())
    return 0


def modes_main(args, model, ids, others):
    """The default: sequence mode against token mode on one prompt (and the `rwkv` package with --peer)."""
    def sequence():
        model.forward(ids, model.new_state(1))

    def token():
        state = model.new_state(1)
        for t in range(ids.shape[1]):
            model.forward(ids[:, t:t + 1], state)

    seq_s = _median_time(sequence, args.repeats)
    tok_s = _median_time(token, max(1, args.repeats // 3))
    load = others.stop()
    n = args.prompt_tokens
    rows = [("ours, sequence mode", seq_s), ("ours, token mode", tok_s)]
    if args.peer:
        rows += peer_rows(args, model, ids)
    weights = "synthetic weights" if model.synthetic else model.source
    print(f"{args.model} ({weights}, {args.weights or 'float32'} weights), {n}-token prompt, {args.threads} threads, "
          f"median of {args.repeats}")
    print(f"{'mode':<26}{'time (s)':>10}{'tokens/s':>11}")
    for name, s in rows:
        print(f"{name:<26}{s:>10.3f}{n / s:>11.1f}")
    print(f"sequence / token mode throughput: {tok_s / seq_s:.1f}x")
    report_load(load)
    return 0


def peer_rows(args, model, ids):
    """BlinkDL's `rwkv` package (cpu fp32, JIT on), sequence mode on the same checkpoint and prompt."""
    os.environ.setdefault("RWKV_JIT_ON", "1")
    os.environ.setdefault("RWKV_CUDA_ON", "0")
    try:
        from rwkv.model import RWKV as Official
    except ImportError:
        print("peer skipped: the `rwkv` package is not installed", file=sys.stderr)
        return []
    off = Official(model=str(model.source)[:-len(".pth")], strategy="cpu fp32", verbose=False)
    ids_list = ids[0].tolist()
    return [("rwkv package, sequence", _median_time(lambda: off.forward(ids_list, None), args.repeats))]


@command("bench.modes")
def main(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.against_step and (not args.profile or args.against):
        ap.error("--against-step goes with --profile, and not with --against")
    if args.against_src and (not args.profile or args.against or args.against_step):
        ap.error("--against-src goes with --profile, and not with --against or --against-step")
    if args.step_rows and not args.chunks:
        ap.error("--step-rows goes with --chunks")
    if args.json:
        check_writable_file(args.json, "--json")           # a ValueError: one line, exit 2 (command)
    torch.set_num_threads(args.threads)
    from threadpoolctl import threadpool_limits
    threadpool_limits(args.threads)
    from bench import models
    if models.family_of(args.model) != models.RWKV:
        raise ValueError(f"--model {args.model}: bench.modes times RWKV models")
    model = models.load(args.model, checkpoint=args.checkpoint, weights=args.weights)
    if args.profile:
        return profile_main(ap, args, model)
    ids = torch.randint(0, model.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    others = OthersMeter().start()
    if args.chunks:
        chunk_table(model, args)
        report_load(others.stop())
        return 0
    if args.against:
        return against_main(args, model, ids, others)
    return modes_main(args, model, ids, others)


if __name__ == "__main__":
    sys.exit(main())
