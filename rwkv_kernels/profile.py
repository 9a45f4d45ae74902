"""Profile counters of the C decode kernels (`csrc/quant_ops.h`: `prof`), read by `bench.modes --profile`.

    from rwkv_kernels import profile
    profile.enable()            # zero the counters and start counting
    ...                         # decode steps (the same kernels as always: counting adds two clock reads per chunk)
    counts = profile.read()
    profile.enable(False)

`read()` -> {"products": {tag: {field: int}}, "elementwise_ns": {op: ns}, "steps": n, "step_ns": ns} with the
tags in `TAGS` ("other" is every product outside `decode_layers`: in token mode, the head) and the fields in
`FIELDS`: products run, weight bytes read, wall ns (a group's wall time split by the products' share of
the work), activation quantisation ns, work ns per thread (the summed chunk time / threads used) and idle
ns per thread (in a job but without a chunk: hand-offs, waiting for the last chunk); wall = quant + work +
idle per product. Counters are process-wide (every caller of the library adds to them).
"""
import ctypes

from . import cpu_c

TAGS = ("other", "att_receptance", "att_key", "att_value", "att_output", "ffn_receptance", "ffn_key", "ffn_value")
FIELDS = ("products", "bytes", "wall_ns", "quant_ns", "work_ns", "idle_ns")
ELEMENTWISE = ("ln_shift_mix_att", "wkv_step_gated", "ln_shift_mix_ffn", "relu_square", "add_gated", "rescale")


def _lib():
    lib = cpu_c.ops().lib
    lib.profile_enable.argtypes = [ctypes.c_int64]
    lib.profile_enable.restype = None
    lib.profile_read.argtypes = [ctypes.POINTER(ctypes.c_int64)]
    lib.profile_read.restype = ctypes.c_int64
    return lib


def enable(on=True):
    """Zero the counters; count from now on (or stop counting with on=False)."""
    _lib().profile_enable(int(bool(on)))


def read():
    n = len(TAGS) * len(FIELDS) + len(ELEMENTWISE) + 2
    buf = (ctypes.c_int64 * n)()
    got = _lib().profile_read(buf)
    if got != n:
        raise RuntimeError(f"profile_read returned {got} counters, expected {n} (a stale kernel build?)")
    vals = list(buf)
    products = {}
    for t, tag in enumerate(TAGS):
        row = vals[t * len(FIELDS):(t + 1) * len(FIELDS)]
        products[tag] = dict(zip(FIELDS, row))
    k = len(TAGS) * len(FIELDS)
    ew = dict(zip(ELEMENTWISE, vals[k:k + len(ELEMENTWISE)]))
    return {"products": products, "elementwise_ns": ew, "steps": vals[-2], "step_ns": vals[-1]}
