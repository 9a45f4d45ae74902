"""The kernels of the weight formats (`rwkv_kernels.formats`) for y = x W^T with float32 activations: the C
kernels (`csrc/quant_ops.h`, part of the cpu_ops library, bound by `rwkv_kernels.cpu_c`) and a torch
reference of the same signature beside each.

Decode (token mode, any number of streams B): the C matrix-vector kernels read each compressed weight
once and convert in registers: F16C widening for float16, a 16-bit shift for bfloat16, and for the
the 8-bit blocks (Q8_0) integer dot products against x quantised to the same blocks (as ggml's
vec_dot_q8_0_q8_0).
Sequence mode (many rows): dequantise a slice of rows at a time into one reused float32 buffer and run
torch's GEMM on it. The kernel build is chosen by the CPU's instruction sets (AVX2 always, AVX-512 with
VNNI where present) and cached on disk under a name that includes that instruction set.

The names of the format record module are re-exported here (`FORMATS`, `Int8Weight`, `pack`, ...).
"""
import threading

import torch
import torch.nn.functional as F

from . import cpu_c, dispatch, formats
from .formats import (BLOCK, MIN_SCALE, Int8Weight, dequantize, quantize_int8,  # noqa: F401  (re-exported)
                      quantize_rows_reference)
from .linear import write_outputs

FORMATS = formats.NAMES                   # the registered format names (a live sequence)
FLOAT_FORMATS = formats.plain_dtypes()    # {name: dtype} of the plain tensor formats


def check_format(fmt):
    return formats.get(fmt).name


def format_of(w):
    """The weight format name of a tensor or packed weight."""
    return formats.name_of(w)


def pack(w, fmt):
    """A float matrix [out, in] -> the weight in format `fmt` (a tensor, or a packed weight)."""
    return formats.get(fmt).pack(w)


# ---------------------------------------------------------------------------------------------
# Torch references (same signature as the C versions below)

def matvec_reference(x, w):
    """x [B, in] float32, w any format -> y [B, out] float32, computed the kernel's way in float64
    (the format record's reference: 16-bit weights widened exactly, Q8_0 blocks as integer block dot
    products with x quantised to blocks)."""
    return formats.of(w).reference(x, w)


def dequantized_linear(x, w):
    """x [..., in] float32, w any format -> x W^T [..., out] with W dequantised (the format's exact
    float value of every weight): what the format means, independent of the kernels."""
    return F.linear(x.float(), dequantize(w))


# ---------------------------------------------------------------------------------------------
# The C build: one library for every kernel, bound (and its ISA chosen, once) by rwkv_kernels.cpu_c

SOURCE = cpu_c.SOURCE          # csrc/cpu_ops.c includes csrc/quant_ops.h: one library, one thread pool
cpu_features, supported_isas, best_isa = cpu_c.cpu_features, cpu_c.supported_isas, cpu_c.best_isa
_I64, _VP = cpu_c.I64, cpu_c.VP


def library(isa):
    """The C library built for `isa` (cached on disk per instruction set); None if this machine
    cannot build or run it."""
    try:
        return cpu_c.ops(isa).lib
    except cpu_c.BuildError:
        return None


def _lib(isa=None):
    return cpu_c.ops(isa).lib


# ---------------------------------------------------------------------------------------------
# The C kernels

def _parts(w):
    """-> (format code, values tensor, scales tensor or None, row stride)"""
    fmt = formats.of(w)
    values, scales = fmt.c_parts(w)
    return fmt.code, values, scales, values.shape[1]


def matvec_group(pairs, out=None, accumulate=False, isa=None):
    """[(x [B, in] float32 contiguous, w a weight of a format with a C code), ...] -> [y [B, out], ...] float32,
    y = x W^T (y += x W^T into `out` with `accumulate`). One parallel region for the whole group; each
    stream's result is the same whatever B is."""
    n, B = len(pairs), pairs[0][0].shape[0]
    if n > 16:
        raise ValueError(f"matvec_group takes at most 16 products, got {n}")
    if out is None:
        out = [torch.empty(B, w.shape[0]) for _, w in pairs]
    dims, ptrs = [], []
    for (x, w), y in zip(pairs, out):
        code, values, scales, _ = _parts(w)
        dims += (code, w.shape[0], w.shape[1])
        ptrs += (values.data_ptr(), None if scales is None else scales.data_ptr(), x.data_ptr(), y.data_ptr())
    _lib(isa).qmatvec_group(n, (_I64 * len(dims))(*dims), (_VP * len(ptrs))(*ptrs), B,
                            torch.get_num_threads(), int(accumulate))
    return out


def quantize_rows(x, isa=None):
    """The C version of `quantize_rows_reference`."""
    B, I = x.shape
    Ip = -(-I // BLOCK) * BLOCK
    q, d = torch.empty(B, Ip, dtype=formats.BLOCK_VALUES), torch.empty(B, Ip // BLOCK)
    _lib(isa).quantize_rows(x.data_ptr(), B, I, Ip, q.data_ptr(), d.data_ptr())
    return q, d


def dequantize_rows(w, r0, r1, out, isa=None):
    """Rows [r0, r1) of a 16-bit or Q8_0 weight -> out float32 [r1 - r0, in] (C, parallel over rows)."""
    code, values, scales, stride = _parts(w)
    _lib(isa).dequantize(code, values.data_ptr(), scales.data_ptr() if scales is not None else None,
                         out.data_ptr(), r0, r1, w.shape[1], stride, torch.get_num_threads())
    return out


# ---------------------------------------------------------------------------------------------
# Sequence mode: dequantise a slice of rows into a reused buffer, then torch's GEMM

GEMM_SLICE = 1 << 26            # most weights dequantised per GEMM call (256 MB of float32): whole
                                # matrices up to 7B; slices of rows beyond (a 14B ffn matrix, the head)
_buffers = threading.local()


def _buffer(n):
    buf = getattr(_buffers, "buf", None)
    if buf is None or buf.numel() < n:
        buf = _buffers.buf = torch.empty(n)
    return buf[:n]


def sliced_gemm(x, w, dequantize_rows):
    """x [rows, in] float32 -> x W^T [rows, out] through float32 slices of at most GEMM_SLICE weights,
    each made by `dequantize_rows(w, r0, r1, out)` in one per-thread buffer that every format reuses."""
    O, I = w.shape
    step = max(64, GEMM_SLICE // I)
    if step >= O:
        return x @ dequantize_rows(w, 0, O, _buffer(O * I).view(O, I)).T
    y = torch.empty(x.shape[0], O)
    for r0 in range(0, O, step):
        r1 = min(O, r0 + step)
        wf = dequantize_rows(w, r0, r1, _buffer((r1 - r0) * I).view(r1 - r0, I))
        y[:, r0:r1] = x @ wf.T
    return y


def gemm(x, w):
    """x [rows, in] float32 -> x W^T [rows, out] through float32 slices of W (C dequantisation)."""
    return sliced_gemm(x, w, dequantize_rows)


# ---------------------------------------------------------------------------------------------
# Implementations with the dispatch signature: pairs [(x [rows, in] float32 contiguous, w), ...]

def linear_matvec(pairs, out=None, accumulate=False):
    """Token mode (one token per stream, any B): the C kernels, batch invariant."""
    return matvec_group([(x.contiguous(), w) for x, w in pairs], out, accumulate)


def linear_gemm(pairs, out=None, accumulate=False):
    """Sequence mode: dequantised slices of rows + torch's GEMM."""
    return write_outputs(out, [gemm(x.contiguous(), w) for x, w in pairs], accumulate)


def linear_dequantized(pairs, out=None, accumulate=False):
    """Any format, no C kernels: dequantise the whole matrix with torch (slow, and a float32 copy per
    call): the table's fallback for the two above."""
    return write_outputs(out, [dequantized_linear(x, w) for x, w in pairs], accumulate)


dispatch.register_impl("linear", "quant_c", linear_matvec, needs_c=True)
dispatch.register_impl("linear", "quant_gemm", linear_gemm, needs_c=True)
dispatch.register_impl("linear", "quant_torch", linear_dequantized)
