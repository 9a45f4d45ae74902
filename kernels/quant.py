"""Weight formats for y = x W^T with float32 activations: the packed types, the one function that
makes them, the C kernels (`csrc/quant_ops.h`, part of the cpu_ops library) and a torch reference of the same signature beside each.

Formats (`FORMATS`): "float32", "float16", "bfloat16" are plain torch tensors of that dtype; "int8" is
`Int8Weight`: int8 values with one float16 scale per block of 32 along the input dimension (ggml's
Q8_0). Block scales keep an outlier weight from flattening its whole row (a per-row scale would), see
`bench.quality --outliers` for the measurement. Activations, state and accumulation stay float32.

Decode (token mode, any number of streams B): the C matrix-vector kernels read each compressed weight
once and convert in registers: F16C widening for float16, a 16-bit shift for bfloat16, and for int8
integer dot products against x quantised to the same int8 blocks (as ggml's vec_dot_q8_0_q8_0).
Sequence mode (many rows): dequantise a slice of rows at a time into one reused float32 buffer and run
torch's GEMM on it. The kernel build is chosen by the CPU's instruction sets (AVX2 always, AVX-512 with
VNNI where present) and cached on disk under a name that includes that instruction set.
"""
import ctypes
import os
import threading
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from . import cpu_c, dispatch
from .linear import write_outputs

FORMATS = ("float32", "float16", "bfloat16", "int8")
BLOCK = 32
FLOAT_FORMATS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_FMT_CODE = {"float16": 1, "bfloat16": 2, "int8": 3}
MIN_SCALE = 2.0 ** -14          # smallest normal float16: an all-zero block still gets a scale > 0


def check_format(fmt):
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}: use one of {', '.join(FORMATS)}")
    return fmt


# ---------------------------------------------------------------------------------------------
# The packed type

@dataclass
class Int8Weight:
    """W [out, in] ~ q * scale, blockwise: q int8 [out, in_padded], scale float16 [out, in_padded / 32].
    in_padded is `in` rounded up to 32; the padding weights are 0."""
    q: torch.Tensor
    scale: torch.Tensor
    in_features: int
    format = "int8"

    @property
    def shape(self):
        return torch.Size((self.q.shape[0], self.in_features))

    @property
    def device(self):
        return self.q.device

    @property
    def nbytes(self):
        return self.q.nbytes + self.scale.nbytes

    def dequantize(self):
        """-> float32 [out, in] (exact: every int8 x float16 product is a float32)."""
        O, Ip = self.q.shape
        w = self.q.float().view(O, Ip // BLOCK, BLOCK) * self.scale.float()[..., None]
        return w.view(O, Ip)[:, :self.in_features]

    def check(self, name="weight"):
        """Raise ValueError (one line) if the tensors cannot be a quantised matrix."""
        O, Ip = self.q.shape if self.q.dim() == 2 else (None, None)
        if self.q.dtype != torch.int8 or O is None or Ip % BLOCK or not 0 < self.in_features <= Ip < self.in_features + BLOCK:
            raise ValueError(f"{name}: int8 values must be int8 [out, in rounded up to {BLOCK}], got "
                             f"{self.q.dtype} {list(self.q.shape)} for in_features {self.in_features}")
        if self.scale.dtype != torch.float16 or tuple(self.scale.shape) != (O, Ip // BLOCK):
            raise ValueError(f"{name}: scales must be float16 {[O, Ip // BLOCK]}, got {self.scale.dtype} {list(self.scale.shape)}")
        s = self.scale.float()
        if not bool((torch.isfinite(s) & (s > 0)).all()):
            raise ValueError(f"{name}: corrupt int8 scales (NaN, Inf, zero or negative)")
        return self


def format_of(w):
    """The weight format name of a tensor or packed weight."""
    if isinstance(w, torch.Tensor):
        return {v: k for k, v in FLOAT_FORMATS.items()}.get(w.dtype, str(w.dtype))
    return w.format


def quantize_int8(w, rows_per_step=None, after_slice=None):
    """float W [out, in] -> Int8Weight: per block of 32, scale = max|w| / 127 (stored as float16, at
    least MIN_SCALE), q = round(w / scale) in [-127, 127]. Works through slices of rows so that the
    float32 temporaries stay small whatever the matrix (a 14B head is 1 GB in float32);
    `after_slice(rows)` is called with each source slice once it is done."""
    O, I = w.shape
    Ip = -(-I // BLOCK) * BLOCK
    q = torch.empty(O, Ip, dtype=torch.int8)
    scale = torch.empty(O, Ip // BLOCK, dtype=torch.float16)
    step = rows_per_step or max(1, (1 << 20) // Ip)
    for r0 in range(0, O, step):
        q[r0:r0 + step], scale[r0:r0 + step] = _quantize_rows(w[r0:r0 + step].detach().float(), Ip)
        if after_slice is not None:
            after_slice(w[r0:r0 + step])
    return Int8Weight(q, scale, I)


def _quantize_rows(w, Ip):
    if not bool(torch.isfinite(w).all()):
        raise ValueError("cannot quantise a matrix with NaN or Inf values")
    O, I = w.shape
    blocks = F.pad(w, (0, Ip - I)).view(O, Ip // BLOCK, BLOCK)
    scale = (blocks.abs().amax(-1) / 127).clamp_(min=MIN_SCALE)
    if bool((scale > torch.finfo(torch.float16).max).any()):
        raise ValueError("weights too large for int8 blocks with float16 scales (|w| > 8e6)")
    scale16 = scale.to(torch.float16)
    q = torch.round(blocks / scale16.float()[..., None]).clamp_(-127, 127).to(torch.int8)
    return q.view(O, Ip), scale16


def pack(w, fmt):
    """A float matrix [out, in] -> the weight in format `fmt` (a tensor, or an Int8Weight)."""
    check_format(fmt)
    if fmt == "int8":
        return quantize_int8(w)
    return w.detach().to(FLOAT_FORMATS[fmt]).contiguous()


def dequantize(w):
    """Any weight -> float32 [out, in]."""
    return w.dequantize() if isinstance(w, Int8Weight) else w.float()


def bytes_per_weight(fmt):
    return {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1 + 2 / BLOCK}[check_format(fmt)]


# ---------------------------------------------------------------------------------------------
# Torch references (same signature as the C versions below)

def quantize_rows_reference(x):
    """x [B, I] float32 -> (q int8 [B, Ip], d float32 [B, Ip / 32]): the activation blocks the int8
    kernel multiplies with (d = max|x| / 127 per block, q = round(x / d), half to even)."""
    B, I = x.shape
    Ip = -(-I // BLOCK) * BLOCK
    blocks = F.pad(x.float(), (0, Ip - I)).view(B, Ip // BLOCK, BLOCK)
    d = blocks.abs().amax(-1) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = torch.round(blocks * inv[..., None]).to(torch.int8)
    return q.view(B, Ip), d


def matvec_reference(x, w):
    """x [B, in] float32, w any format -> y [B, out] float32, computed the kernel's way in float64:
    16-bit weights widened exactly; int8 as integer block dot products with x quantised to blocks."""
    if not isinstance(w, Int8Weight):
        return (x.double() @ w.double().T).float()
    qx, dx = quantize_rows_reference(x)
    B, O, nb = x.shape[0], w.q.shape[0], w.q.shape[1] // BLOCK
    dots = torch.einsum("bkj,okj->bok", qx.view(B, nb, BLOCK).double(), w.q.view(O, nb, BLOCK).double())
    return (dots * dx.double()[:, None, :] * w.scale.double()[None]).sum(-1).float()


def linear_reference(x, w):
    """x [..., in] float32, w any format -> x W^T [..., out] with W dequantised (the format's exact
    float value of every weight): what the format means, independent of the kernels."""
    return F.linear(x.float(), dequantize(w))


# ---------------------------------------------------------------------------------------------
# The C build for each instruction set (kernels.cpu_c builds and caches it, keyed by the ISA)

SOURCE = cpu_c.SOURCE          # csrc/cpu_ops.c includes csrc/quant_ops.h: one library, one thread pool
_P, _I64, _VP = ctypes.POINTER, ctypes.c_int64, ctypes.c_void_p
cpu_features, supported_isas = cpu_c.cpu_features, cpu_c.supported_isas


def best_isa(features=None):
    """The best level for these CPU flags (default: this CPU's, or RWKV_ENGINE_ISA); None if none."""
    if features is None:
        return cpu_c.best_isa()
    isas = supported_isas(features)
    return isas[0] if isas else None


@lru_cache(maxsize=None)
def library(isa):
    """The quant kernels built for `isa` (cached on disk per instruction set); None if this machine
    cannot build or run them."""
    if isa is None or os.environ.get("RWKV_ENGINE_NO_C_KERNELS"):
        return None
    try:
        lib = cpu_c.build(SOURCE, isa)
    except cpu_c.BuildError:
        return None
    lib.qmatvec_group.argtypes = [_I64, _P(_I64), _P(_VP), _I64, _I64, _I64]
    lib.qmatvec_group.restype = _I64
    lib.quantize_rows.argtypes = [_VP, _I64, _I64, _I64, _VP, _VP]
    lib.dequantize.argtypes = [_I64, _VP, _VP, _VP, _I64, _I64, _I64, _I64, _I64]
    for f in (lib.quantize_rows, lib.dequantize):
        f.restype = None
    lib.isa_level.restype = ctypes.c_int
    return lib


def _lib(isa=None):
    if isa is None:
        isa = _default_isa(os.environ.get("RWKV_ENGINE_CPU_FEATURES"), os.environ.get("RWKV_ENGINE_ISA"))
    return library(isa)


@lru_cache(maxsize=None)
def _default_isa(simulated_features, forced_isa):
    """best_isa() once per setting of the two variables it reads (it parses /proc/cpuinfo)."""
    return best_isa()


_FMT_BY_DTYPE = {torch.float16: 1, torch.bfloat16: 2}


def available(isa=None):
    return _lib(isa) is not None


# ---------------------------------------------------------------------------------------------
# The C kernels

def _parts(w):
    """-> (format code, values tensor, scales tensor or None, row stride)"""
    if isinstance(w, Int8Weight):
        return _FMT_CODE["int8"], w.q, w.scale, w.q.shape[1]
    return _FMT_CODE[format_of(w)], w, None, w.shape[1]


def matvec_group(pairs, out=None, accumulate=False, isa=None):
    """[(x [B, in] float32 contiguous, w 16-bit tensor or Int8Weight), ...] -> [y [B, out], ...] float32,
    y = x W^T (y += x W^T into `out` with `accumulate`). One parallel region for the whole group; each
    stream's result is the same whatever B is."""
    n, B = len(pairs), pairs[0][0].shape[0]
    if n > 16:
        raise ValueError(f"matvec_group takes at most 16 products, got {n}")
    if out is None:
        out = [torch.empty(B, w.shape[0]) for _, w in pairs]
    dims, ptrs = [], []
    for (x, w), y in zip(pairs, out):
        if isinstance(w, Int8Weight):
            dims += (3, w.q.shape[0], w.in_features)
            ptrs += (w.q.data_ptr(), w.scale.data_ptr(), x.data_ptr(), y.data_ptr())
        else:
            dims += (_FMT_BY_DTYPE[w.dtype], w.shape[0], w.shape[1])
            ptrs += (w.data_ptr(), None, x.data_ptr(), y.data_ptr())
    _lib(isa).qmatvec_group(n, (_I64 * len(dims))(*dims), (_VP * len(ptrs))(*ptrs), B,
                            torch.get_num_threads(), int(accumulate))
    return out


def quantize_rows(x, isa=None):
    """The C version of `quantize_rows_reference`."""
    B, I = x.shape
    Ip = -(-I // BLOCK) * BLOCK
    q, d = torch.empty(B, Ip, dtype=torch.int8), torch.empty(B, Ip // BLOCK)
    _lib(isa).quantize_rows(x.data_ptr(), B, I, Ip, q.data_ptr(), d.data_ptr())
    return q, d


def dequantize_rows(w, r0, r1, out, isa=None):
    """Rows [r0, r1) of a 16-bit or int8 weight -> out float32 [r1 - r0, in] (C, parallel over rows)."""
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


def gemm(x, w):
    """x [rows, in] float32 -> x W^T [rows, out] through float32 slices of W (C dequantisation)."""
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


# ---------------------------------------------------------------------------------------------
# Implementations with the dispatch signature: pairs [(x [rows, in] float32 contiguous, w), ...]

def linear_matvec(pairs, out=None, accumulate=False):
    """Token mode (one token per stream, any B): the C kernels, batch invariant."""
    if not available():
        return linear_torch(pairs, out, accumulate)
    return matvec_group([(x.contiguous(), w) for x, w in pairs], out, accumulate)


def linear_gemm(pairs, out=None, accumulate=False):
    """Sequence mode: dequantised slices of rows + torch's GEMM."""
    if not available():
        return linear_torch(pairs, out, accumulate)
    return write_outputs(out, [gemm(x.contiguous(), w) for x, w in pairs], accumulate)


def linear_torch(pairs, out=None, accumulate=False):
    """No C kernels: dequantise the whole matrix with torch (slow, and a float32 copy per call)."""
    return write_outputs(out, [linear_reference(x, w) for x, w in pairs], accumulate)


dispatch.register_impl("linear", "quant_c", linear_matvec)
dispatch.register_impl("linear", "quant_gemm", linear_gemm)
dispatch.register_impl("linear", "quant_torch", linear_torch)
