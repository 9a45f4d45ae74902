"""A decode step's matrix products alone, in C, and the same products of another kernel source alternating.

    python -m bench.products --model rwkv-4-pile-169m --formats float32,bfloat16 --batch 1,4,16
    python -m bench.products ... --against-src /tmp/old/rwkv_kernels/csrc     # A/B two kernel sources
    python -m bench.products --formats float32,int8 --batch 16 --per-shape     # cache against memory

One round runs every product of one decode step of the model's shapes (per layer: key, value and
receptance as one group, output, the FFN's key and receptance, its value; then the head), through
`qmatvec_group` on random weights of each format (float32, float16, bfloat16, int8): the kernels
alone, no element-wise work, no Python between them. The time is the median of --repeats rounds
after one warm-up. With --against-src the cpu_ops.c of that folder (e.g. a `git worktree` of an
older commit's rwkv_kernels/csrc) is built for the same instruction set and the two builds
alternate round by round (in one process, the same minutes), which is how a kernel change is
measured on a machine whose speed drifts between runs; the ratio is against/current, and the rows
say whether the two gave the same bits. Beside the ratio of the two medians, "paired" is the median
of the rounds' own ratios (the two builds run back to back within a round) with its quartiles: a
spell of a slower machine moves both halves of a pair, so it is the steadier of the two on a VM
whose speed moves over minutes (more rounds narrow it: --repeats 61). Weights are random (not a
checkpoint): the output says so.
With --per-shape each distinct shape is timed alone, twice: its weights resident in cache (one copy
called repeatedly) and streamed from memory (distinct copies past twice the L3), in ms per product
and G multiply-adds per second; the gap between the two rows is what memory costs that kernel, and
`bench.ceiling` gives the instruction mix's bound for the resident row.
"""
import ctypes
import os
import statistics
import time
from pathlib import Path

import torch

from bench.cli import OneLineParser, command, fmt_paired, paired_ratio, positive_int, positive_int_list
from bench.cpuload import OthersMeter

FORMATS = ("float32", "float16", "bfloat16", "int8")


def format_list(text):
    import argparse
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in names if v not in FORMATS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown format {bad[0] if bad else text!r}; choose from {', '.join(FORMATS)}")
    return names


def build_parser():
    ap = OneLineParser(prog="python -m bench.products", description=__doc__)
    ap.add_argument("--model", default="rwkv-4-pile-169m")
    ap.add_argument("--formats", type=format_list, default=["float32", "bfloat16", "int8"],
                    help=f"comma-separated, of {', '.join(FORMATS)} (default float32,bfloat16,int8)")
    ap.add_argument("--batch", type=positive_int_list, default=[1, 4, 16], help="stream counts (default 1,4,16)")
    ap.add_argument("--repeats", type=positive_int, default=15, help="timed rounds (default 15)")
    ap.add_argument("--threads", type=positive_int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--layers", type=positive_int, default=None, help="only this many layers (default: all)")
    ap.add_argument("--isa", choices=("avx2", "avx512"), default=None, help="build (default: this CPU's best)")
    ap.add_argument("--against-src", default=None, help="a folder with another cpu_ops.c to alternate with")
    ap.add_argument("--per-shape", action="store_true",
                    help="time each distinct product shape alone, its weights resident in cache and streamed "
                         "from memory (copies past twice the L3)")
    return ap


def l3_bytes():
    """This CPU's last-level cache (the largest a core sees), from sysfs; 64 MB if it cannot be read."""
    units = {"K": 1 << 10, "M": 1 << 20}
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip().upper()                    # e.g. "32768K"
        number, unit = (text[:-1], units[text[-1]]) if text[-1:] in units else (text, 1)
        if number.isdigit():
            sizes.append(int(number) * unit)
    return max(sizes) if sizes else 64 << 20


def shape_calls(shape, fmt, B, g, where):
    """(calls, products per round) for one product shape alone: `resident`, one weight copy called
    repeatedly (about 8 MB of weights' reads per round, so the call's fixed cost is small); `streamed`,
    enough distinct copies that together they exceed twice the L3, each called once per round."""
    from rwkv_kernels import formats
    nbytes = shape[0] * shape[1] * formats.get(fmt).bytes_per_weight
    if where == "resident":
        reps = max(1, int((8 << 20) // nbytes))
        calls = prepared_calls([[shape]], fmt, B, g)
        return calls * reps, reps
    from rwkv_kernels import cpu_c
    copies = max(2, -(-2 * l3_bytes() // int(nbytes)))
    (n, dims, ptrs, keep, ys), = prepared_calls([[shape]], fmt, B, g)
    values, scales = formats.of(keep[0]).c_parts(keep[0])          # keep[0]: the weight of the one product
    calls = []
    for _ in range(copies):         # the same weights at other addresses: clones, not new random ones
        v, sc = values.clone(), None if scales is None else scales.clone()
        p = (cpu_c.VP * 4)(v.data_ptr(), None if sc is None else sc.data_ptr(), ptrs[2], ptrs[3])
        calls.append((n, dims, p, keep + [v, sc], ys))
    return calls, copies


def per_shape(args, libs, groups, g):
    """--per-shape: one row per (format, streams, shape, where): ms per product and G multiply-adds/s."""
    head = f"{'format':10s} {'streams':>7s} {'shape':>12s} {'weights':>9s} {'current ms':>11s} {'G MAC/s':>8s}"
    if args.against_src:
        head += f" {'against ms':>11s} {'against/current':>16s} {'same bits':>9s}"
    print(head)
    # one meter over the whole table: a row lasts milliseconds, and /proc/stat counts 10 ms jiffies
    meter = OthersMeter()
    meter.start()
    shapes = list(dict.fromkeys(shape for grp in groups for shape in grp))
    for fmt in args.formats:
        for B in args.batch:
            for shape in shapes:
                for where in ("resident", "streamed"):
                    calls, n = shape_calls(shape, fmt, B, g, where)
                    times, outs = time_rounds(libs, calls, B, args.threads, args.repeats)
                    cur = statistics.median(times["current"]) / n
                    line = (f"{fmt:10s} {B:7d} {f'{shape[0]}x{shape[1]}':>12s} {where:>9s} {cur * 1e3:11.3f} "
                            f"{shape[0] * shape[1] * B / cur / 1e9:8.1f}")
                    if args.against_src:
                        ag = statistics.median(times["against"]) / n
                        same = all(torch.equal(a, b) for a, b in zip(outs["current"], outs["against"]))
                        line += f" {ag * 1e3:11.3f} {ag / cur:16.2f} {'yes' if same else 'no':>9s}"
                    print(line, flush=True)
                    del calls
    others = meter.stop()["others_cpu_pct"]
    print("others' CPU over the whole table: " + (f"{others:.1f}%" if others is not None else "unknown (no /proc/stat)"))


def _library(source, isa):
    """The build of `source` for `isa`, with the loop settings of this code's own build of `isa`
    (cpu_c.copy_loop_settings: an older source may lack some)."""
    from rwkv_kernels import cpu_c
    lib = cpu_c.build(str(source), isa)
    lib.qmatvec_group.argtypes = [cpu_c.I64, ctypes.POINTER(cpu_c.I64), ctypes.POINTER(cpu_c.VP)] + [cpu_c.I64] * 3
    lib.qmatvec_group.restype = cpu_c.I64
    lib.isa_level.restype = ctypes.c_int
    cpu_c.copy_loop_settings(cpu_c.ops(isa).lib, lib)
    return lib


def step_shapes(cfg, layers=None):
    """[[(out, in), ...] per group] of one decode step's products."""
    C, F = cfg.n_embd, cfg.ffn_dim
    groups = []
    for _ in range(layers or cfg.n_layer):
        groups += [[(C, C)] * 3, [(C, C)], [(F, C), (C, C)], [(C, F)]]
    return groups + [[(cfg.vocab_size, C)]]


def prepared_calls(groups, fmt, B, g):
    """The ctypes arguments of each group's qmatvec_group call, with the tensors they point into."""
    from rwkv_kernels import cpu_c, formats, quant
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(fmt, torch.float32)
    calls = []
    for grp in groups:
        dims, ptrs, keep, ys = [], [], [], []
        for o, i in grp:
            w = torch.randn(o, i, generator=g) / i ** 0.5
            w = quant.pack(w, "int8") if fmt == "int8" else w.to(dtype)
            x, y = torch.randn(B, i, generator=g), torch.empty(B, o)
            record = formats.of(w)
            code, (values, scales) = record.code, record.c_parts(w)
            keep += [w, x, values] + ([scales] if scales is not None else [])
            ys.append(y)
            dims += (code, o, i)
            ptrs += (values.data_ptr(), None if scales is None else scales.data_ptr(), x.data_ptr(), y.data_ptr())
        calls.append((len(grp), (cpu_c.I64 * len(dims))(*dims), (cpu_c.VP * len(ptrs))(*ptrs), keep, ys))
    return calls


def time_rounds(libs, calls, B, threads, repeats):
    """{name: [seconds per round]}, the libraries alternating (order flipped every round), and
    {name: outputs of its last round}."""
    times, outs = {k: [] for k in libs}, {}
    for rep in range(repeats + 1):
        order = list(libs.items()) if rep % 2 == 0 else list(reversed(libs.items()))
        for name, lib in order:
            t0 = time.perf_counter()
            for n, dims, ptrs, _, _ in calls:
                lib.qmatvec_group(n, dims, ptrs, B, threads, 0)
            dt = time.perf_counter() - t0
            if rep:
                times[name].append(dt)
            outs[name] = [y.clone() for *_, ys in calls for y in ys]
    return times, outs


def paired(times):
    """The median of the rounds' against/current ratios and their quartiles, "1.031 (1.012-1.049)"."""
    return fmt_paired(paired_ratio(times["against"], times["current"]))


@command("bench.products")
def main(argv=None):
    args = build_parser().parse_args(argv)
    from bench import models
    from bench.machine import cpu_id
    from rwkv_kernels import cpu_c
    kind, _ = models.classify(args.model)
    if kind != "rwkv":
        raise ValueError(f"--model {args.model!r}: bench.products times RWKV-4 decode products; give an RWKV model")
    isa = args.isa or cpu_c.ops().isa
    libs = {"current": _library(cpu_c.SOURCE, isa)}
    if args.against_src:
        src = Path(args.against_src) / "cpu_ops.c"
        if not src.is_file():
            raise ValueError(f"--against-src {args.against_src}: no cpu_ops.c there")
        libs["against"] = _library(src, isa)
    torch.set_num_threads(args.threads)
    groups = step_shapes(models.config(args.model), args.layers)
    n = sum(len(grp) for grp in groups)
    print(f"{args.model}: {n} products of one decode step, random weights (not a checkpoint); {cpu_id()}, "
          f"{isa} kernels, {args.threads} threads; median of {args.repeats} rounds"
          + ("; builds alternating (current, --against-src)" if args.against_src else "")
          + (f"; each shape alone, resident in cache or streamed past 2 x L3 ({l3_bytes() >> 20} MB)"
             if args.per_shape else ""))
    g = torch.Generator().manual_seed(0)
    if args.per_shape:
        per_shape(args, libs, groups, g)
        return
    head = f"{'format':10s} {'streams':>7s} {'current ms':>11s}"
    if args.against_src:
        head += f" {'against ms':>11s} {'against/current':>16s} {'same bits':>9s} {'paired (q1-q3)':>21s}"
    print(head + f" {'others CPU':>10s}")
    for fmt in args.formats:
        for B in args.batch:
            calls = prepared_calls(groups, fmt, B, g)
            meter = OthersMeter()
            meter.start()
            times, outs = time_rounds(libs, calls, B, args.threads, args.repeats)
            others = meter.stop()["others_cpu_pct"]
            cur = statistics.median(times["current"]) * 1e3
            line = f"{fmt:10s} {B:7d} {cur:11.2f}"
            if args.against_src:
                ag = statistics.median(times["against"]) * 1e3
                same = all(torch.equal(a, b) for a, b in zip(outs["current"], outs["against"]))
                line += f" {ag:11.2f} {ag / cur:16.2f} {'yes' if same else 'no':>9s} {paired(times):>21s}"
            print(line + (f" {others:9.1f}%" if others is not None else f" {'-':>10s}"), flush=True)
            del calls


if __name__ == "__main__":
    main()
