"""Every weight format against float32 on this machine: decode tokens/s and the ratio, per stream count.

    python -m bench.formats --model rwkv-4-pile-169m                  # every registered format, 1 and 16 streams
    python -m bench.formats --model rwkv-4-pile-1b5 --formats int8,q4_k --batch 1 --repeats 3 --steps 16
    python -m bench.formats ... --json formats.json --md formats.md

Decode reads every weight once per token, so which format is fastest depends on the machine (its
memory bandwidth, AVX-512 and VNNI or only AVX2) and on how many streams decode together. For each
format and each stream count in --batch, the format and float32 decode in one process with their rounds
alternating (`bench.modes --profile`'s rounds: a warm-up round, then --repeats rounds of --steps decode
steps each), so both see the same machine in the same minutes; the ratio is float32's step time over
the format's. "round by round" is the median of the rounds' own ratios with their quartiles (the two
formats run back to back within a round): the steadier figure where the machine's speed drifts.
Absolute rates move between runs on a shared or virtual machine; the ratios within a row are what to
compare. float32 stays loaded; each other format is loaded (quantised at load, or from a
packed --checkpoint of its own format) in turn and dropped after its rows.

Each row records the CPU share other processes took meanwhile (flagged above 5%). The table names the
CPU, the kernels' instruction set and the thread count, and says when the weights are synthetic.
Outputs: a table on stdout, --json (every number), --md (the table in Markdown).
"""
import gc
import os
import sys

import torch

from bench.cli import (WEIGHT_FORMATS, OneLineParser, check_writable_file, command, fmt_paired, paired_ratio,
                       positive_int, positive_int_list, write_json_atomic)
from bench.cpuload import BUSY_PCT, OthersMeter, busy_warning

BASE = "float32"


def format_list(text):
    """"int8,q4_k" -> ["int8", "q4_k"] (argparse type): registered formats other than float32."""
    import argparse
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in names if v not in WEIGHT_FORMATS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown weight format {bad[0] if bad else text!r}; "
                                         f"choose from {', '.join(WEIGHT_FORMATS)}")
    return [v for v in names if v != BASE]


def build_parser():
    ap = OneLineParser(prog="python -m bench.formats", description=__doc__)
    ap.add_argument("--model", default="rwkv-4-pile-169m")
    ap.add_argument("--checkpoint", default=None, help="real weights (else synthetic weights of the model's shapes)")
    ap.add_argument("--formats", type=format_list, default=None,
                    help="comma-separated weight formats (default: every registered one but float32)")
    ap.add_argument("--batch", type=positive_int_list, default=[1, 16],
                    help="comma-separated stream counts (default 1,16)")
    ap.add_argument("--repeats", type=positive_int, default=5, help="timed rounds per format pair (default 5)")
    ap.add_argument("--steps", type=positive_int, default=32, help="decode steps per round (default 32)")
    ap.add_argument("--threads", type=positive_int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--json", default=None, help="also write every number here (JSON)")
    ap.add_argument("--md", default=None, help="also write the table here (Markdown)")
    return ap


def measure(models_by_name, batch, steps, repeats):
    """{format: model} (float32 and one other) -> ({format: tokens/s}, {format: weight bytes/step}, load,
    the other format's speed over float32's round by round: (median, q1, q3))."""
    from bench.modes import profile_parts, profile_rounds
    others = OthersMeter().start()
    walls = {}
    results, _ = profile_rounds(models_by_name, batch, steps, repeats, round_walls=walls)
    load = others.stop()
    rates, nbytes = {}, {}
    for fmt, (counts, wall_s, n) in results.items():
        _, step_ms, weight_bytes = profile_parts(counts, wall_s, n)
        rates[fmt], nbytes[fmt] = 1e3 * batch / step_ms, weight_bytes
    other = next(f for f in models_by_name if f != BASE)
    return rates, nbytes, load, paired_ratio(walls[BASE], walls[other])


def run(args):
    from bench import models
    from bench.machine import cpu_id
    from rwkv_kernels import cpu_c
    base = models.load(args.model, checkpoint=args.checkpoint, weights=BASE)
    fmts = args.formats or [f for f in WEIGHT_FORMATS if f != BASE]
    out = {"model": args.model, "synthetic": bool(base.synthetic), "checkpoint": args.checkpoint,
           "cpu": cpu_id(), "isa": cpu_c.ops().isa, "threads": args.threads, "steps": args.steps,
           "repeats": args.repeats, "rows": []}
    print(title(out))
    print(header())
    for fmt in fmts:
        model = models.load(args.model, checkpoint=args.checkpoint, weights=fmt)
        for B in args.batch:
            rates, nbytes, load, pair = measure({fmt: model, BASE: base}, B, args.steps, args.repeats)
            row = {"format": fmt, "streams": B, "tokens_per_s": rates[fmt], "float32_tokens_per_s": rates[BASE],
                   "ratio": rates[fmt] / rates[BASE],
                   "ratio_rounds": {"median": pair[0], "q1": pair[1], "q3": pair[2]},
                   "weight_mb_per_step": nbytes[fmt] / 1e6,
                   "others_cpu_pct": load["others_cpu_pct"], "busy": bool(busy_warning(load["others_cpu_pct"]))}
            out["rows"].append(row)
            print(line(row), flush=True)
        del model
        gc.collect()
    if any(r["busy"] for r in out["rows"]):
        print(f"WARNING: rows marked * ran while other processes took over {BUSY_PCT:.0f}% of the CPU: "
              "not quiet-machine numbers", file=sys.stderr)
    return out


def title(out):
    weights = "synthetic weights" if out["synthetic"] else f"weights from {out['checkpoint']}"
    return (f"{out['model']}, {weights}; {out['cpu']}, {out['isa']} kernels, {out['threads']} threads; "
            f"each format alternating with float32 ({out['repeats']} rounds of {out['steps']} steps)")


COLUMNS = ("format", "streams", "tok/s", "float32 tok/s", "x float32", "round by round (q1-q3)", "weights MB/step",
           "others' CPU")


def header():
    return (f"{COLUMNS[0]:<12}{COLUMNS[1]:>8}{COLUMNS[2]:>10}{COLUMNS[3]:>15}{COLUMNS[4]:>11}{COLUMNS[5]:>24}"
            f"{COLUMNS[6]:>17}{COLUMNS[7]:>13}")


def _rounds(row):
    r = row["ratio_rounds"]
    return fmt_paired((r["median"], r["q1"], r["q3"]))


def _others(row):
    pct = row["others_cpu_pct"]
    return ("-" if pct is None else f"{pct:.1f}%") + ("*" if row["busy"] else "")


def line(row):
    return (f"{row['format']:<12}{row['streams']:>8}{row['tokens_per_s']:>10.1f}{row['float32_tokens_per_s']:>15.1f}"
            f"{row['ratio']:>11.2f}{_rounds(row):>24}{row['weight_mb_per_step']:>17.1f}{_others(row):>13}")


def markdown(out):
    lines = [title(out), "", "| " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * (len(COLUMNS) - 1)]
    for r in out["rows"]:
        lines.append(f"| {r['format']} | {r['streams']} | {r['tokens_per_s']:.1f} | {r['float32_tokens_per_s']:.1f} | "
                     f"{r['ratio']:.2f} | {_rounds(r)} | {r['weight_mb_per_step']:.1f} | {_others(r)} |")
    return "\n".join(lines) + "\n"


@command("bench.formats")
def main(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    for path, flag in ((args.json, "--json"), (args.md, "--md")):
        if path:
            check_writable_file(path, flag)
    torch.set_num_threads(args.threads)
    from threadpoolctl import threadpool_limits
    threadpool_limits(args.threads)
    from bench import models
    from rwkv_kernels import cpu_c
    if models.family_of(args.model) != models.RWKV:
        raise ValueError(f"--model {args.model}: bench.formats times RWKV models")
    if not cpu_c.available():
        raise ValueError(f"bench.formats times the C decode kernels, which cannot run here: {cpu_c.unavailable_reason()}")
    out = run(args)
    if args.json:
        write_json_atomic(args.json, out)
    if args.md:
        from bench.cli import write_text_atomic
        write_text_atomic(args.md, markdown(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
