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
`--chunks 2,4,8,16,32,48` times one sequence-mode forward of a chunk of T tokens (from a state) with
the products on the decode kernels ("short" in kernels.dispatch) and on the GEMM, alternating in one
process: where the two cross is where `kernels.dispatch.SHORT_ROWS` belongs.
"""
import os
import statistics
import sys
import time

import torch

from bench.cli import WEIGHT_FORMATS, OneLineParser, command, first_line, positive_int, positive_int_list
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
    """ms per forward of a T-token chunk, products on the decode kernels vs the GEMM, alternating."""
    from kernels import dispatch
    gemm = "torch" if (args.weights or "float32") == "float32" else "quant_gemm"
    short = "c" if gemm == "torch" else "quant_c"
    print(f"{args.model}, {args.weights or 'float32'} weights, {args.threads} threads: one sequence-mode forward "
          f"of a T-token chunk, median of {args.repeats} (alternating); SHORT_ROWS = {dispatch.SHORT_ROWS}")
    print(f"{'T':>5}{'decode kernels (ms)':>22}{'GEMM (ms)':>12}{'GEMM / kernels':>16}")
    for T in args.chunks:
        ids = torch.randint(0, model.vocab_size, (1, T), generator=torch.Generator().manual_seed(T))
        times = {short: [], gemm: []}
        for _ in range(args.repeats + 1):
            for name in (short, gemm):
                with dispatch.force(linear=name):
                    state = model.new_state(1)
                    t0 = time.perf_counter()
                    model.forward(ids, state)
                    times[name].append(time.perf_counter() - t0)
        a, b = (statistics.median(times[n][1:]) * 1e3 for n in (short, gemm))   # first round: warm-up
        print(f"{T:>5}{a:>22.1f}{b:>12.1f}{b / a:>16.2f}")


@command("bench.modes")
def main(argv=None):
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
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from threadpoolctl import threadpool_limits
    threadpool_limits(args.threads)
    from bench import models
    try:
        if models.family_of(args.model) != models.RWKV:
            raise ValueError(f"--model {args.model}: bench.modes times RWKV models")
        model = models.load(args.model, checkpoint=args.checkpoint, weights=args.weights)
    except ValueError as e:
        ap.exit(2, f"bench.modes: error: {first_line(e)}\n")
    ids = torch.randint(0, model.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))

    def sequence():
        model.forward(ids, model.new_state(1))

    def token():
        state = model.new_state(1)
        for t in range(ids.shape[1]):
            model.forward(ids[:, t:t + 1], state)

    others = OthersMeter().start()
    if args.chunks:
        chunk_table(model, args)
        return 0
    if args.against:
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
        print(f"{args.model}, {n}-token prompt, sequence mode, {args.threads} threads, runs alternating, "
              f"median of {args.repeats}")
        print(f"{args.weights or 'float32'} weights: {n / a:.1f} tok/s; {args.against} weights: {n / b:.1f} tok/s; "
              f"ratio {b / a:.3f}")
        load = others.stop()
        if load["others_cpu_pct"] is not None:
            print(f"other processes used {load['others_cpu_pct']:.1f}% of the CPU meanwhile")
        return 0
    seq_s = _median_time(sequence, args.repeats)
    tok_s = _median_time(token, max(1, args.repeats // 3))
    load = others.stop()
    n = args.prompt_tokens
    rows = [("ours, sequence mode", seq_s), ("ours, token mode", tok_s)]
    if args.peer:
        os.environ.setdefault("RWKV_JIT_ON", "1")
        os.environ.setdefault("RWKV_CUDA_ON", "0")
        try:
            from rwkv.model import RWKV as Official
        except ImportError:
            print("peer skipped: the `rwkv` package is not installed", file=sys.stderr)
        else:
            off = Official(model=str(model.source)[:-len(".pth")], strategy="cpu fp32", verbose=False)
            ids_list = ids[0].tolist()
            rows.append(("rwkv package, sequence", _median_time(lambda: off.forward(ids_list, None), args.repeats)))
    weights = "synthetic weights" if model.synthetic else model.source
    print(f"{args.model} ({weights}, {args.weights or 'float32'} weights), {n}-token prompt, {args.threads} threads, "
          f"median of {args.repeats}")
    print(f"{'mode':<26}{'time (s)':>10}{'tokens/s':>11}")
    for name, s in rows:
        print(f"{name:<26}{s:>10.3f}{n / s:>11.1f}")
    print(f"sequence / token mode throughput: {tok_s / seq_s:.1f}x")
    if load["others_cpu_pct"] is not None:
        print(f"other processes used {load['others_cpu_pct']:.1f}% of the CPU meanwhile "
              f"(load average {load['loadavg_1m']:.2f})")
    warning = busy_warning(load["others_cpu_pct"])
    if warning:
        print(warning, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
