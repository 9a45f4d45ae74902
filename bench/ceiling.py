"""The multiply-add ceiling of the decode tiles' instruction mixes on this CPU, one core, in L1.

    python -m bench.ceiling                 # every build this CPU runs
    python -m bench.ceiling --isa avx2 --seconds 0.5

Each row times the inner loop of one multi-stream tile with nothing else (bench/ceiling.c): float32
FMAs (4 rows x 3 streams on AVX2, 4 x 4 on AVX-512) and the exact int8 dot (AVX2: sign + maddubs +
madd + add per 32 weights, 4 x 2, the form the kernels used before the XOR; XOR + maddubs + madd + add,
the form every int8 loop uses now; and without the sign step where x >= 0, as in the FFN's value product;
AVX-512 VNNI: one vpdpbusd per 64, 4 x 4), operands resident in L1, no block scales, conversions or
sums. So it is the most weight-streams per second a kernel of that form can reach on one core: the
compute bound on what a compressed format can gain over float32 at many streams (e.g. the server at 16
clients), where compute, not only memory, sets the speed. One AVX2 row adds to the XOR loop the int8
format's own work per 8 blocks of each row and stream (convert, scale product, FMA into float
accumulators in memory, as the AVX2 tile does): the bound of an exact int8 kernel with the format's
float order. The real kernels add reductions and the activations' traffic; `bench.products` times
those. Rows give G multiply-adds per second and the ratio to the same build's float32.
"""
import ctypes
from pathlib import Path

import numpy as np

from bench.cli import OneLineParser, command, positive_float, positive_int
from bench.cpuload import OthersMeter

SOURCE = Path(__file__).with_name("ceiling.c")
N = 1024                        # weights per row: 4 rows of int8 (4 KB) or float32 (16 KB) stay in L1
# (build, kernel, label, rows, streams, weight kind)
KERNELS = (("avx2", "f32_avx2", "float32 FMA, 4 rows x 3 streams", 4, 3, "f32"),
           ("avx2", "i8_avx2", "int8 sign+maddubs+madd, 4 x 2", 4, 2, "i8"),
           ("avx2", "i8xor_avx2", "int8 xor+maddubs+madd, 4 x 2", 4, 2, "i8xor"),
           ("avx2", "i8xor_scaled_avx2", "int8 xor, with the format's scales", 4, 2, "i8xors"),
           ("avx2", "i8pos_avx2", "int8, x >= 0: maddubs+madd, 4 x 2", 4, 2, "i8pos"),
           ("avx512", "f32_avx512", "float32 FMA (512-bit), 4 x 4", 4, 4, "f32"),
           ("avx512", "i8_vnni", "int8 vpdpbusd (VNNI), 4 x 4", 4, 4, "vnni"))


def build_parser():
    ap = OneLineParser(prog="python -m bench.ceiling", description=__doc__)
    ap.add_argument("--isa", choices=("avx2", "avx512"), default=None, help="one build (default: every one this CPU runs)")
    ap.add_argument("--seconds", type=positive_float, default=2.0, help="time per kernel, all rounds (default 2)")
    ap.add_argument("--rounds", type=positive_int, default=20, help="rounds, kernels alternating; the best is kept (default 20)")
    return ap


def _lib(isa):
    from rwkv_kernels import cpu_c
    lib = cpu_c.build(str(SOURCE), isa)
    d, i64, p = ctypes.c_double, ctypes.c_int64, ctypes.c_void_p
    for name, kind in ((k[1], k[5]) for k in KERNELS if k[0] == isa):
        fn = getattr(lib, name)
        fn.restype = d
        fn.argtypes = ([p, p] + ([p] if kind in ("i8", "i8xor", "i8xors") else []) + [i64, i64]
                       + ([d] if kind == "i8xors" else []) + [ctypes.POINTER(d)])
    return lib


def aligned(a, to=64):
    """A copy of `a` that starts on a `to`-byte boundary. numpy only promises 16: a 32-byte load from an
    array 16 bytes into a cache line splits every other line, which moved the x >= 0 row from 114 to 87
    G/s between runs on a Zen 4."""
    buf = np.empty(a.nbytes + to, dtype=np.uint8)
    off = (-buf.ctypes.data) % to
    out = buf[off:off + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def operands(kind, rows, streams, n=N, seed=0):
    """Weights [rows, n] and activations [streams, n] (int8 in [-127, 127], x in [0, 127] for "i8pos",
    or float32 in [-1, 1)), 64-byte aligned."""
    g = np.random.default_rng(seed)
    if kind == "f32":
        w, x = g.uniform(-1, 1, (rows, n)).astype(np.float32), g.uniform(-1, 1, (streams, n)).astype(np.float32)
    elif kind == "i8pos":
        w, x = g.integers(-127, 128, (rows, n), dtype=np.int8), g.integers(0, 128, (streams, n), dtype=np.int8)
    else:
        w, x = g.integers(-127, 128, (rows, n), dtype=np.int8), g.integers(-127, 128, (streams, n), dtype=np.int8)
    return aligned(w), aligned(x)


def run_kernel(lib, name, kind, w, x, reps):
    """(the kernel's sum of its accumulators, seconds) for `reps` passes over n = w.shape[1] weights."""
    sec = ctypes.c_double()
    args = [w.ctypes.data, x.ctypes.data]
    if kind in ("i8", "i8xor", "i8xors"):
        if kind in ("i8xor", "i8xors"):            # x's sign masks in place of x
            mask = aligned(np.where(x < 0, -1, 0).astype(np.int8))
            args[1] = mask.ctypes.data
        xa = aligned(np.abs(x.astype(np.int16)).astype(np.uint8))
        args.append(xa.ctypes.data)
    extra = [1.0] if kind == "i8xors" else []      # the block scales: 1, so the sum stays checkable
    total = getattr(lib, name)(*args, w.shape[1], reps, *extra, ctypes.byref(sec))
    return total, sec.value


def expected_sum(kind, w, x, reps):
    """What the kernel's accumulators add up to: reps x sum over rows and streams of w . x."""
    if kind == "f32":
        return reps * float(np.sum(w.astype(np.float64) @ x.astype(np.float64).T))
    exact = int(np.sum(w.astype(np.int64) @ x.astype(np.int64).T))
    if kind in ("i8xor", "i8xors"):                # the loop leaves out each negative x's |x| once per row
        exact -= w.shape[0] * int(np.sum(np.where(x < 0, -x.astype(np.int64), 0)))
    return reps * exact


def rates(lib, kernels, seconds, rounds):
    """{name: G multiply-adds per second} (rows x streams x n per pass) of each kernel: `rounds` rounds of
    about seconds / rounds each, the kernels alternating round by round (so a slower spell of a shared
    machine falls on all of them), the best round of each kept."""
    prepared = {}
    for name, kind, rows, streams in kernels:
        w, x = operands(kind, rows, streams)
        _, dt = run_kernel(lib, name, kind, w, x, 64)
        reps = max(16, int(64 * seconds / rounds / max(dt, 1e-9)))
        prepared[name] = (kind, w, x, reps, rows * streams * N * reps)
    best = dict.fromkeys(prepared, 0.0)
    for _ in range(rounds):
        for name, (kind, w, x, reps, macs) in prepared.items():
            _, dt = run_kernel(lib, name, kind, w, x, reps)
            best[name] = max(best[name], macs / dt / 1e9)
    return best


@command("bench.ceiling")
def main(argv=None):
    args = build_parser().parse_args(argv)
    from bench.machine import cpu_id
    from rwkv_kernels import cpu_c
    have = cpu_c.supported_isas()
    isas = [args.isa] if args.isa else [i for i in ("avx2", "avx512") if i in have]
    if args.isa and args.isa not in have:
        raise ValueError(f"--isa {args.isa}: this CPU lacks it (it runs {', '.join(have) or 'neither'})")
    print(f"{cpu_id()}: one core, operands in L1, {N} weights per row; the best of {args.rounds} rounds, "
          f"kernels alternating, ~{args.seconds:g} s each (G multiply-adds per second = weight-streams per second)")
    print(f"{'build':7s} {'kernel':34s} {'G MAC/s':>8s} {'x float32':>10s} {'others CPU':>10s}")
    for isa in isas:
        lib = _lib(isa)
        rows = [k for k in KERNELS if k[0] == isa]
        meter = OthersMeter()
        meter.start()
        got = rates(lib, [(name, kind, r, s) for _, name, _, r, s, kind in rows], args.seconds, args.rounds)
        others = meter.stop()["others_cpu_pct"]
        f32 = next(got[name] for _, name, _, _, _, kind in rows if kind == "f32")
        for _, name, label, _, _, _ in rows:
            print(f"{isa:7s} {label:34s} {got[name]:8.1f} {got[name] / f32:10.2f}"
                  + (f" {others:9.1f}%" if others is not None else f" {'-':>10s}"), flush=True)


if __name__ == "__main__":
    main()
