"""5- and 4-bit block weight formats for y = x W^T with float32 activations (CPU), and the outlier
treatment (per-input-channel scales, "+cols") they and int8 can carry: records of `rwkv_kernels.formats`.

Layouts (`SPECS`), blocks of 32 weights along the input dimension, values unsigned q in [0, 2^bits):
  "q5_0"  5.5 bits/weight: float16 d per block, w = d (q - 16)           (ggml's Q5_0)
  "q4_1"  5.0 bits/weight: float16 d and m per block, w = d q + m         (ggml's Q4_1)
  "q4_k"  4.5 bits/weight: w = d q + m; per super-block of 8 blocks float16 D and Dmin and per block
          6-bit sc and mn, d = D sc, m = -Dmin mn                          (the k-quant idea, ggml's Q4_K)
  "q5_k"  5.5 bits/weight: q4_k with 5-bit values (a 5th-bit plane per super-block)  (ggml's Q5_K idea)
chosen by docs/lowbit_choice.md (the super-block formats quantise each block with a small search for the
least squared error, in C: `_quantize_rows_k_reference` says how; q4_0 and q5_1 were measured there and left out: q4_0 misses the 4-bit
quality target, q5_1 costs half a bit more than q5_0 for little). Storage (`BlockWeight`), planar like
`Int8Weight`, laid out for the AVX2 kernel's unpacking: rows padded with zero weights to a multiple of
`Spec.group` (64 for 4 bits, 256 for 5 and the super-block formats); qs uint8 [out, in_padded / 2]: blocks in pairs, 32 bytes per
pair, byte k = element k of the first block (low nibble) | element k of the second (high nibble); qh
uint8 [out, in_padded / 8] (5-bit): 32 bytes per 8 blocks, bit b of byte k = the 5th bit of element k
of block b of the eight; d float16 [out, blocks] (signed for "_0": ggml's choice, see `quantize`), m
float16 [out, blocks] ("_1" only); "q4_k", "q5_k": qs interleaved per super-block of 8 blocks so that one 32-byte
load holds 8 weights of each of the 8 (`_pack_nibbles_k`), sb uint8 [out, in_padded / 16] (`KBlockWeight`).

Outlier treatment ("+cols", `col`): trained models have a few input channels whose activations are
10-16x the others, and the matrices that read them have small columns there. With `col` (float32
[in], powers of two, chosen from the weights alone: `column_scales`), the matrix stored is W diag(1/col)
and the kernels multiply x by col before they quantise it: y = (x diag(col)) (W diag(1/col))^T = x W^T;
powers of two make both scalings exact. "int8+cols" is the int8 blocks of `formats.Int8Weight` with it,
in Int8Weight's interleaved layout: its products run the int8 kernels (`csrc/quant_ops.h`), x times col
quantised in their activation blocks.

Decode (token mode and short prompts): `csrc/lowbit_ops.h` quantises x (times col) to int8 blocks of 32
once per product, unpacks each block's nibbles into bytes and multiplies them with x's bytes (maddubs),
the block's offset (m, or -16 d) times the block's sum of x added per block. Batch invariant. The same
AVX2 code runs in the AVX-512 build (bit-identical across builds). Sequence mode: dequantise a slice
of rows (col applied, exact) into a reused float32 buffer, then torch's GEMM.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import cpu_c, dispatch, formats
from .formats import BLOCK, MIN_SCALE, PACK_SLICE, Int8Weight, quantize_int8, quantize_rows_reference
from .linear import write_outputs
from .quant import sliced_gemm


@dataclass(frozen=True)
class Spec:
    bits: int
    has_min: bool
    code: int                   # the layout's number in csrc/lowbit_ops.h (LB_*)
    super_block: bool = False   # scales and mins of 6 bits per block, two float16 per 8 blocks (k-quant)

    @property
    def levels(self):
        return (1 << self.bits) - 1

    @property
    def group(self):
        """Rows are padded to a multiple of this many weights: pairs of blocks; 8 blocks with a qh plane
        or a super-block."""
        return 8 * BLOCK if self.bits == 5 or self.super_block else 2 * BLOCK

    @property
    def bytes_per_weight(self):
        scale_bits = 8 * SUPER_BYTES / (8 * BLOCK) if self.super_block else 16 * (1 + self.has_min) / BLOCK
        return (self.bits + scale_bits) / 8


SUPER_BYTES = 16                # bytes of scales per super-block of 8 blocks ("q4_k": see the module)
SPECS = {"q5_0": Spec(5, False, 50), "q4_1": Spec(4, True, 41), "q4_k": Spec(4, True, 44, super_block=True),
         "q5_k": Spec(5, True, 54, super_block=True)}
# each layout's record's `short_rows` (rwkv_kernels.formats: where its C step and the GEMM cross, per build;
# the "+cols" variant takes its layout's)
SHORT_ROWS = {"q5_0": (("avx2", 64), ("avx512", 96)), "q4_1": (("avx2", 64), ("avx512", 96)),
              "q4_k": (("avx2", 192), ("avx512", 768)), "q5_k": (("avx2", 192), ("avx512", 1024))}
# the formats' codes in the C library's format enum (csrc/quant_ops.h FMT_*; checked when it loads): the
# decode step (csrc/decode_step.h) runs their products through lowbit_ops.h
C_CODES = {"q5_0": 4, "q5_0+cols": 5, "q4_1": 6, "q4_1+cols": 7, "int8+cols": 8, "q4_k": 9, "q4_k+cols": 10,
           "q5_k": 11, "q5_k+cols": 12}
OUTLIER_SUFFIX = "+cols"
LB_Q8 = 8                       # csrc/lowbit_ops.h's code of the int8 blocks (int8+cols)
COL_EXPONENT = 1.0              # col_j = 2^round(a log2(rms_j / median rms)) (docs/lowbit_choice.md)
COL_MAX_SHIFT = 8               # |log2 col| at most this


def check_col(col, in_features, name):
    if col.dtype != torch.float32 or tuple(col.shape) != (in_features,):
        raise ValueError(f"{name}: column scales must be float32 [{in_features}], got {col.dtype} {list(col.shape)}")
    m, e = torch.frexp(col)
    if not bool(((m == 0.5) & ((e - 1).abs() <= COL_MAX_SHIFT)).all()):
        raise ValueError(f"{name}: corrupt column scales (each must be a power of two within 2^+-{COL_MAX_SHIFT})")


# ---------------------------------------------------------------------------------------------
# The packed types: one class per record (the registry finds a weight's record by its type)

class BlockWeight(formats.PackedWeight):
    """W [out, in] ~ (d q + m) per block of 32 along in (m = -2^(bits-1) d without a stored min), times
    col per input column in the "+cols" formats. Built from the tensors in the order of the record's
    `file_parts` and in_features: BlockWeight(qs, [qh], d, [m], [col], in_features)."""
    layout = None               # "q5_0", set per subclass
    cols = False                # whether the format has column scales

    def __init__(self, qs, *rest):
        *parts, self.in_features = rest
        spec = SPECS[self.layout]
        names = ("qh",) * (spec.bits == 5) + ("d",) + ("m",) * spec.has_min + ("col",) * self.cols
        if len(parts) != len(names):
            raise TypeError(f"{self.format} takes {len(names) + 2} arguments, got {len(rest) + 1}")
        self.qs, self.qh, self.m, self.col = qs, None, None, None
        for name, t in zip(names, parts):
            setattr(self, name, t)

    @property
    def spec(self):
        return SPECS[self.layout]

    def parts(self):
        return tuple(t for t in (self.qs, self.qh, self.d, self.m, self.col) if t is not None)

    def values(self):
        """-> q uint8 [out, in_padded] (0 .. 2^bits - 1)."""
        O, half = self.qs.shape
        qs = self.qs.view(O, half // BLOCK, 1, BLOCK)
        q = torch.cat([qs & 15, qs >> 4], 2)                           # [O, pairs, 2, 32]
        if self.qh is not None:
            planes = self.qh.view(O, -1, 1, BLOCK)                       # [O, groups of 8, 1, 32]
            bits = (planes >> torch.arange(8, dtype=torch.uint8).view(1, 1, 8, 1)) & 1
            q = q.view(O, -1, 8, BLOCK) | (bits << 4)
        return q.reshape(O, 2 * half)

    def offsets(self):
        """-> m float32 [out, blocks]: the value of q = 0 in each block."""
        if self.m is not None:
            return self.m.float()
        return -float(1 << (self.spec.bits - 1)) * self.d.float()

    def dequantize_stored(self):
        """The stored matrix (W diag(1/col)) -> float32 [out, in]: fl(d q + m)."""
        O, Ip = self.qs.shape[0], 2 * self.qs.shape[1]
        q = self.values().float().view(O, Ip // BLOCK, BLOCK)
        w = q * self.d.float()[..., None] + self.offsets()[..., None]
        return w.view(O, Ip)[:, :self.in_features]

    def dequantize(self):
        """-> float32 [out, in], the matrix the format means (col applied: exact, powers of two)."""
        w = self.dequantize_stored()
        return w * self.col if self.col is not None else w

    def _check_nibbles(self, name):
        """-> (out, in_padded) of the nibbles, or ValueError (one line) if they cannot be this format's."""
        spec = self.spec
        O, half = self.qs.shape if self.qs.dim() == 2 else (None, None)
        Ip = None if half is None else 2 * half
        if self.qs.dtype != torch.uint8 or O is None or Ip % spec.group or not 0 < self.in_features <= Ip < self.in_features + spec.group:
            raise ValueError(f"{name}: {self.format} nibbles must be uint8 [out, (in rounded up to {spec.group}) / 2], "
                             f"got {self.qs.dtype} {list(self.qs.shape)} for in_features {self.in_features}")
        return O, Ip

    def check(self, name="weight"):
        """Raise ValueError (one line) if the tensors cannot be a matrix of this format."""
        spec = self.spec
        O, Ip = self._check_nibbles(name)
        nb = Ip // BLOCK
        want = {"d": (self.d, torch.float16, nb), "m": (self.m, torch.float16 if spec.has_min else None, nb),
                "qh": (self.qh, torch.uint8 if spec.bits == 5 else None, Ip // 8)}
        for part, (t, dtype, n) in want.items():
            if dtype is None:
                continue
            if t.dtype != dtype or tuple(t.shape) != (O, n):
                raise ValueError(f"{name}: {self.format} {part} must be {dtype} {[O, n]}, got {t.dtype} {list(t.shape)}")
        d = self.d.float()
        if not bool((torch.isfinite(d) & (d != 0) & ((d > 0) | (not spec.has_min))).all()):
            raise ValueError(f"{name}: corrupt {self.format} scales (NaN, Inf, zero, or negative with a min)")
        if self.m is not None and not bool(torch.isfinite(self.m.float()).all()):
            raise ValueError(f"{name}: corrupt {self.format} minimums (NaN or Inf)")
        if self.col is not None:
            check_col(self.col, self.in_features, name)
        return self

    def c_parts(self):
        """The parts the C decode step takes: values, scales, 5th-bit planes, minimums, column scales."""
        return self.qs, self.d, self.qh, self.m, self.col


class KBlockWeight(BlockWeight):
    """A super-block format ("q4_k", "q5_k"): W [out, in] ~ d_j q + m_j per block j of 32, where per
    super-block of 8 blocks d_j = D sc_j and m_j = -Dmin mn_j, D and Dmin float16, sc_j and mn_j 6-bit
    integers (the products are exact in float32). Built from KBlockWeight(qs, [qh], sb, [col],
    in_features); qh (5-bit) uint8 [out, in_padded / 8], a 32-byte plane per super-block (`_pack_high_k`);
    sb uint8 [out, (in_padded / 256) * 16], per super-block:
    D, Dmin (float16, little-endian), then byte k (k < 8) = sc_k | (mn_k & 3) << 6, then nibble k of
    bytes 12..15 (low nibble first) = mn_k >> 2."""

    def __init__(self, qs, *rest):
        *parts, self.in_features = rest
        five = self.spec.bits == 5
        if len(parts) != 1 + five + self.cols:
            raise TypeError(f"{self.format} takes {3 + five + self.cols} arguments, got {len(rest) + 1}")
        self.qs, self.qh = qs, parts[0] if five else None
        self.sb = parts[five]
        self.col = parts[-1] if self.cols else None

    def parts(self):
        return tuple(t for t in (self.qs, self.qh, self.sb, self.col) if t is not None)

    def values(self):
        """-> q uint8 [out, in_padded] (0 .. 2^bits - 1), from the nibbles interleaved per super-block."""
        q = _unpack_nibbles_k(self.qs)
        return q if self.qh is None else q | (_unpack_high_k(self.qh) << 4)

    def _super(self):
        """-> (D, Dmin float32 [out, supers], sc, mn int64 [out, supers, 8])."""
        O = self.sb.shape[0]
        sb = self.sb.view(O, -1, SUPER_BYTES)
        dd = sb[..., :4].contiguous().view(torch.float16).float()                 # [O, supers, 2]
        low = sb[..., 4:12].long()
        high = sb[..., 12:16].long()
        mn_high = torch.stack([high & 15, high >> 4], -1).view(O, -1, 8)
        return dd[..., 0], dd[..., 1], low & 63, (low >> 6) | (mn_high << 2)

    @property
    def d(self):
        """float32 [out, blocks]: each block's step D sc_j."""
        D, _, sc, _ = self._super()
        return (D[..., None] * sc.float()).view(D.shape[0], -1)

    @property
    def m(self):
        """float32 [out, blocks]: each block's value at q = 0, -Dmin mn_j."""
        _, Dmin, _, mn = self._super()
        return (-Dmin[..., None] * mn.float()).view(Dmin.shape[0], -1)

    def offsets(self):
        return self.m

    def check(self, name="weight"):
        spec = self.spec
        O, Ip = self._check_nibbles(name)
        if spec.bits == 5 and (self.qh.dtype != torch.uint8 or list(self.qh.shape) != [O, Ip // 8]):
            raise ValueError(f"{name}: {self.format} qh must be torch.uint8 {[O, Ip // 8]}, "
                             f"got {self.qh.dtype} {list(self.qh.shape)}")
        want = [O, Ip // spec.group * SUPER_BYTES]
        if self.sb.dtype != torch.uint8 or list(self.sb.shape) != want:
            raise ValueError(f"{name}: {self.format} super-block scales must be uint8 {want}, "
                             f"got {self.sb.dtype} {list(self.sb.shape)}")
        D, Dmin, _, _ = self._super()
        if not bool((torch.isfinite(D) & (D > 0) & torch.isfinite(Dmin) & (Dmin >= 0)).all()):
            raise ValueError(f"{name}: corrupt {self.format} scales (NaN, Inf, or not positive)")
        if self.col is not None:
            check_col(self.col, self.in_features, name)
        return self

    def c_parts(self):
        """The C decode step's parts: values, the super-block scales (in the scales' place), 5th bits,
        column scales."""
        return self.qs, self.sb, self.qh, None, self.col


class Int8ColsWeight(Int8Weight):
    """The int8 blocks of `formats.Int8Weight` holding W diag(1/col), in its layout (values interleaved
    in groups of 16 blocks per row, `rows()` in row order), with the column scales col."""

    def __init__(self, q, scale, col, in_features):
        super().__init__(q, scale, in_features)
        self.col = col

    def parts(self):
        return self.q, self.scale, self.col

    def dequantize_stored(self):
        """The stored matrix (W diag(1/col)) -> float32 [out, in]."""
        return super().dequantize()

    def dequantize(self):
        return self.dequantize_stored() * self.col

    def check(self, name="weight"):
        super().check(name)
        check_col(self.col, self.in_features, name)
        return self

    def c_parts(self):
        return self.q, self.scale, None, None, self.col


# ---------------------------------------------------------------------------------------------
# Quantising

def column_scales(w, exponent=COL_EXPONENT, rows_per_step=None, after_slice=None):
    """Per-input-channel scales from the weights alone: col_j = 2^round(a log2(r_j / c)), r_j the root
    mean square of column j and c the median of r: the stored W diag(1/col) has a column far smaller
    (or larger) than the typical one brought back to it, and x col the channel that column reads brought
    down by the same factor. The RMS, not the maximum: one heavy-tailed weight must not rescale its whole
    column (measured, docs/lowbit_choice.md). A power of two within 2^+-COL_MAX_SHIFT; W read in slices
    of rows (`after_slice(rows)` after each)."""
    O, I = w.shape
    step = rows_per_step or max(1, PACK_SLICE // max(1, I))
    sumsq = torch.zeros(I, dtype=torch.float64)
    for r0 in range(0, O, step):
        part = w[r0:r0 + step].detach()
        if not bool(torch.isfinite(part).all()):
            raise ValueError("cannot quantise a matrix with NaN or Inf values")
        sumsq += part.double().pow_(2).sum(0)                     # in place: one float64 slice at a time
        if after_slice is not None:
            after_slice(part)
    rms = (sumsq / O).sqrt().float()
    typical = rms.median().clamp(min=1e-30)
    ratio = (rms.clamp(min=typical * 2.0 ** -COL_MAX_SHIFT) / typical).log2() * exponent
    return torch.exp2(ratio.round().clamp(-COL_MAX_SHIFT, COL_MAX_SHIFT)).float()


def quantize(w, layout, cols=False, rows_per_step=None, after_slice=None):
    """float W [out, in] -> the BlockWeight of `layout` (with column scales if `cols`). Per block of 32:
    with a stored min, m = min w, d = (max w - m) / (2^bits - 1); without, d = the largest-magnitude
    weight / -2^(bits-1) (it maps to q = 0 exactly, ggml's choice); d and m rounded to float16, then
    q = round((w - m) / d) clamped to the range. Works through slices of rows so the float32
    temporaries stay small; `after_slice(rows)` is called with each source slice once done."""
    spec = SPECS[layout]
    O, I = w.shape
    Ip = -(-I // spec.group) * spec.group
    nb = Ip // BLOCK
    col = column_scales(w, rows_per_step=rows_per_step, after_slice=after_slice) if cols else None
    qs = torch.empty(O, Ip // 2, dtype=torch.uint8)
    if spec.super_block:
        return _quantize_k(w, layout, col, qs, rows_per_step, after_slice)
    qh = torch.empty(O, Ip // 8, dtype=torch.uint8) if spec.bits == 5 else None
    d = torch.empty(O, nb, dtype=torch.float16)
    m = torch.empty(O, nb, dtype=torch.float16) if spec.has_min else None
    step = rows_per_step or max(1, PACK_SLICE // Ip)
    for r0 in range(0, O, step):
        src = w[r0:r0 + step].detach().float()
        if col is not None:
            src = src / col
        q, dd, mm = _quantize_rows(src, spec, Ip)
        qs[r0:r0 + step], d[r0:r0 + step] = _pack_nibbles(q), dd
        if qh is not None:
            qh[r0:r0 + step] = _pack_high(q)
        if m is not None:
            m[r0:r0 + step] = mm
        if after_slice is not None:
            after_slice(w[r0:r0 + step])
    parts = [t for t in (qh, d, m, col) if t is not None]
    return TYPES[layout + OUTLIER_SUFFIX * cols](qs, *parts, I)


def _quantize_rows(w, spec, Ip):
    if not bool(torch.isfinite(w).all()):
        raise ValueError("cannot quantise a matrix with NaN or Inf values")
    O, I = w.shape
    blocks = (F.pad(w, (0, Ip - I)) if Ip != I else w).reshape(O, Ip // BLOCK, BLOCK)
    if spec.has_min:
        lo, hi = blocks.amin(-1), blocks.amax(-1)
        d = ((hi - lo) / spec.levels).clamp_(min=MIN_SCALE)
        m16 = lo.to(torch.float16)
        mf = m16.float()
    else:
        half = float(1 << (spec.bits - 1))
        big = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))[..., 0]
        d = big / -half
        d = torch.where(d.abs() < MIN_SCALE, torch.full_like(d, MIN_SCALE), d)
        m16 = None
    if bool((d.abs() > torch.finfo(torch.float16).max).any()) or (m16 is not None and not bool(torch.isfinite(m16).all())):
        raise ValueError("weights too large for float16 block scales (|w| > 6e4)")
    d16 = d.to(torch.float16)
    # one float32 temporary of the slice's size, the rest in place (the same operations, the same bits)
    if spec.has_min:
        q = (blocks - mf[..., None]).div_(d16.float()[..., None]).round_()
    else:
        q = (blocks / d16.float()[..., None]).round_().add_(half)
    return q.clamp_(0, spec.levels).to(torch.uint8).view(O, Ip), d16, m16


def _quantize_k(w, layout, col, qs, rows_per_step, after_slice):
    """`quantize` for a super-block layout (`_quantize_rows_k_reference` says how), in slices of rows."""
    spec = SPECS[layout]
    O, I = w.shape
    Ip = qs.shape[1] * 2
    sb = torch.empty(O, Ip // spec.group * SUPER_BYTES, dtype=torch.uint8)
    qh = torch.empty(O, Ip // 8, dtype=torch.uint8) if spec.bits == 5 else None
    step = rows_per_step or max(1, PACK_SLICE // Ip)
    for r0 in range(0, O, step):
        src = w[r0:r0 + step].detach().float()
        if col is not None:
            src = src / col
        q, h, b = _quantize_rows_k(src.contiguous(), Ip, spec.bits)
        qs[r0:r0 + step], sb[r0:r0 + step] = q, b
        if qh is not None:
            qh[r0:r0 + step] = h
        if after_slice is not None:
            after_slice(w[r0:r0 + step])
    parts = [t for t in (qh, sb, col) if t is not None]
    return TYPES[layout + OUTLIER_SUFFIX * (col is not None)](qs, *parts, I)


K_TOP = 63                      # 6-bit scales and mins
K_SEARCH = (0, 1, 2)            # steps below the covering sc and mn tried per block


def _f16_at_least(v):
    """float32 tensor -> the smallest float16 values >= max(v, MIN_SCALE)."""
    v = v.clamp(min=MIN_SCALE)
    h = v.to(torch.float16)
    return torch.where(h.float() < v, torch.nextafter(h, torch.full_like(h, float("inf"))), h)


def _quantize_rows_k(w, Ip, bits=4):
    """float32 rows [O, I] -> (nibbles [O, Ip / 2], 5th bits [O, Ip / 8] or None, scales [O, Ip / 16]) of
    q4_k (bits 4) or q5_k (5): the C quantiser (csrc/lowbit_ops.h lowbit_quantize_k) where the library
    builds, else the reference; the same bits."""
    if not bool(torch.isfinite(w).all()):
        raise ValueError("cannot quantise a matrix with NaN or Inf values")
    if not cpu_c.available():
        return _quantize_rows_k_reference(w, Ip, bits)
    O, I = w.shape
    qs = torch.empty(O, Ip // 2, dtype=torch.uint8)
    qh = torch.empty(O, Ip // 8, dtype=torch.uint8) if bits == 5 else None
    sb = torch.empty(O, Ip // (8 * BLOCK) * SUPER_BYTES, dtype=torch.uint8)
    rc = cpu_c.ops().lib.lowbit_quantize_k(w.data_ptr(), O, I, Ip, bits, qs.data_ptr(), _ptr(qh), sb.data_ptr(),
                                           torch.get_num_threads())
    if rc == -1:
        raise ValueError("weights too large for float16 block scales (|w| > 6e4)")
    if rc:
        raise ValueError(f"lowbit_quantize_k: no super-block format of {bits} bits")
    return qs, qh, sb


def _quantize_rows_k_reference(w, Ip, bits=4):
    """The super-block quantiser (q4_k: bits 4, L = 15; q5_k: bits 5, L = 31) in float32 torch. Per block
    of 32, lo = min(min w, 0), hi = max w; per super-block of 8 blocks Dmin = the smallest float16 >=
    max(-lo) / 63 and D the smallest >= max(max(hi + Dmin mn0, 0) / L) / 63, with mn0 = ceil(-lo / Dmin):
    these cover every block's range. Then per block the pairs mn = mn0 - a (a in K_SEARCH, clamped to
    [0, 63]), sc = ceil(max(hi + Dmin mn, 0) / L / D) - b (b in K_SEARCH, clamped to [1, 63]) are tried in
    that order (a outer), and the first one with the least sum over the block (in order) of
    ((q d + m) - w)^2 is kept, q = clamp(round((w - m) / d), 0, L), d = D sc, m = -(Dmin mn): giving up a
    little range at either end (clipping) often rounds the rest better.
    Every operation is one float32 rounding, in the C quantiser's order, so the bits agree."""
    O, I = w.shape
    top, levels = float(K_TOP), float((1 << bits) - 1)
    b = F.pad(w, (0, Ip - I)).view(O, Ip // (8 * BLOCK), 8, BLOCK)
    lo, hi = b.amin(-1).clamp(max=0), b.amax(-1)
    dmin = _f16_at_least((-lo).amax(-1) / top)
    dm = dmin.float()[..., None]
    mn0 = torch.ceil(-lo / dm).clamp(0, top)
    D = _f16_at_least(((hi + dm * mn0).clamp(min=0) / levels).amax(-1) / top)
    if bool(torch.isinf(D).any() | torch.isinf(dmin).any()):
        raise ValueError("weights too large for float16 block scales (|w| > 6e4)")
    Df = D.float()[..., None]
    best = torch.full_like(lo, float("inf"))
    bsc, bmn = torch.zeros_like(lo), torch.zeros_like(lo)
    for a in K_SEARCH:
        mn = (mn0 - a).clamp(0, top)
        m = -(dm * mn)
        sc0 = torch.ceil(((hi - m).clamp(min=0) / levels) / Df).clamp(1, top)
        for s in K_SEARCH:
            sc = (sc0 - s).clamp(1, top)
            d = Df * sc
            q = torch.round((b - m[..., None]) / d[..., None]).clamp(0, levels)
            e = (q * d[..., None] + m[..., None]) - b
            e = e * e
            err = torch.zeros_like(lo)
            for i in range(BLOCK):
                err = err + e[..., i]
            better = err < best
            best, bsc, bmn = torch.where(better, err, best), torch.where(better, sc, bsc), torch.where(better, mn, bmn)
    m, d = -(dm * bmn), Df * bsc
    q = torch.round((b - m[..., None]) / d[..., None]).clamp(0, levels).to(torch.uint8).view(O, Ip)
    sc8, mn8 = bsc.to(torch.uint8), bmn.to(torch.uint8)
    head = torch.stack([D, dmin], -1).view(torch.uint8)                              # [O, supers, 4]
    high = mn8 >> 2
    packed = torch.cat([head, sc8 | ((mn8 & 3) << 6), high[..., 0::2] | (high[..., 1::2] << 4)], -1)
    return _pack_nibbles_k(q), _pack_high_k(q) if bits == 5 else None, packed.reshape(O, -1)


def _pack_nibbles_k(q):
    """q [O, Ip] (Ip a multiple of 256) -> the super-block nibbles [O, Ip / 2]: per super-block 4 chunks
    of 32 bytes, byte 4 l + i of chunk c = weight 8 c + i of block l (low nibble) | weight 8 c + 4 + i
    (high nibble), so that 32-bit lane l of a chunk holds block l's weights (lowbit_ops.h)."""
    O, Ip = q.shape
    b = q.view(O, Ip // (8 * BLOCK), 8, 4, 2, 4) & 15                 # [O, super, block l, chunk c, half, i]
    return (b[:, :, :, :, 0] | (b[:, :, :, :, 1] << 4)).transpose(2, 3).reshape(O, Ip // 2)


def _pack_high_k(q):
    """q [O, Ip] (5-bit) -> the super-block 5th-bit planes [O, Ip / 8]: bit 2 c + h of byte 4 l + i = the
    5th bit of weight 8 c + 4 h + i of block l (the weight whose nibble is byte 4 l + i of chunk c)."""
    O, Ip = q.shape
    bits = (q.view(O, Ip // (8 * BLOCK), 8, 4, 2, 4) >> 4) & 1                     # [O, super, l, c, h, i]
    bits = bits.permute(0, 1, 2, 5, 3, 4).reshape(O, -1, 8, 4, 8)                   # [O, super, l, i, 2c + h]
    return (bits << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8).reshape(O, Ip // 8)


def _unpack_high_k(qh):
    """The inverse of `_pack_high_k`: -> the 5th bits [O, Ip] (0 or 1)."""
    O, n = qh.shape
    bits = (qh.view(O, n // BLOCK, 8, 4, 1) >> torch.arange(8, dtype=torch.uint8)) & 1   # [O, super, l, i, 2c + h]
    return bits.view(O, -1, 8, 4, 4, 2).permute(0, 1, 2, 4, 5, 3).reshape(O, 8 * n)


def _unpack_nibbles_k(qs):
    """The inverse of `_pack_nibbles_k`."""
    O, half = qs.shape
    b = qs.view(O, half // (4 * BLOCK), 4, 8, 4).transpose(2, 3)       # [O, super, block l, chunk c, i]
    return torch.stack([b & 15, b >> 4], 4).reshape(O, 2 * half)


def _pack_nibbles(q):
    """q [O, Ip] (Ip a multiple of 64) -> the paired-block nibbles [O, Ip / 2]."""
    O, Ip = q.shape
    b = q.view(O, Ip // (2 * BLOCK), 2, BLOCK) & 15
    return (b[:, :, 0] | (b[:, :, 1] << 4)).reshape(O, Ip // 2)


def _pack_high(q):
    """q [O, Ip] (Ip a multiple of 256) -> the 5th-bit planes [O, Ip / 8]."""
    O, Ip = q.shape
    bits = (q.view(O, Ip // (8 * BLOCK), 8, BLOCK) >> 4) & 1
    return (bits << torch.arange(8, dtype=torch.uint8).view(1, 1, 8, 1)).sum(2, dtype=torch.uint8).reshape(O, Ip // 8)


def quantize_int8_cols(w, rows_per_step=None, after_slice=None):
    """float W -> Int8ColsWeight: column scales from the weights, then the int8 blocks of W diag(1/col)."""
    col = column_scales(w, rows_per_step=rows_per_step, after_slice=after_slice)
    q8 = quantize_int8(_ScaledRows(w, col), rows_per_step,
                       after_slice=after_slice and (lambda part: after_slice(part.source)))
    return Int8ColsWeight(q8.q, q8.scale, col, w.shape[1])


class _ScaledRows:
    """W diag(1/col), sliced lazily (quantize_int8 reads slices of rows); each slice knows its source."""

    def __init__(self, w, col):
        self.w, self.col, self.shape = w, col, w.shape

    def __getitem__(self, rows):
        src = self.w[rows]
        part = _Slice(src.detach().float() / self.col)
        part.source = src
        return part


class _Slice(torch.Tensor):
    pass


# ---------------------------------------------------------------------------------------------
# Float64 reference of the kernels' arithmetic

def scaled_x(x, w):
    """x times the weight's column scales (exact: powers of two), float32."""
    return x.float() * w.col if getattr(w, "col", None) is not None else x.float()


def matvec_reference(x, w):
    """x [B, in] float32 -> y [B, out], computed the kernel's way in float64: x' = x col quantised to
    int8 blocks (formats.quantize_rows_reference), per block the integer dot of q and x'q times d dx,
    plus the block's offset m times dx times the integer sum of x'q."""
    if isinstance(w, Int8ColsWeight):
        return formats.block_matvec_reference(scaled_x(x, w), w)
    B, O, nb = x.shape[0], w.qs.shape[0], w.d.shape[1]
    qx, dx = quantize_rows_reference(F.pad(scaled_x(x, w), (0, nb * BLOCK - x.shape[1])))
    qxb = qx.view(B, nb, BLOCK).double()
    dots = torch.einsum("bkj,okj->bok", qxb, w.values().view(O, nb, BLOCK).double())
    sums = qxb.sum(-1)                                                        # [B, nb]
    y = dots * w.d.double()[None] + sums[:, None, :] * w.offsets().double()[None]
    return (y * dx.double()[:, None, :]).sum(-1).float()


# ---------------------------------------------------------------------------------------------
# The C kernels (csrc/lowbit_ops.h, part of the cpu_ops library)

def _ptr(t):
    return None if t is None else t.data_ptr()


def _c_code(w):
    return LB_Q8 if isinstance(w, Int8ColsWeight) else w.spec.code


def _c_pointers(w):
    """-> (qs, qh, d, m, col) pointers of the stored matrix."""
    qs, d, qh, m, col = w.c_parts()
    return qs.data_ptr(), _ptr(qh), d.data_ptr(), _ptr(m), _ptr(col)


def matvec_group(pairs, out=None, accumulate=False, isa=None):
    """[(x [B, in] float32 contiguous, w a low-bit or +cols weight), ...] -> [y [B, out], ...], y = x W^T
    (y += with `accumulate`, into `out`). One pool job per 16 products; batch invariant."""
    B = pairs[0][0].shape[0]
    if out is None:
        out = [torch.empty(B, w.shape[0]) for _, w in pairs]
    lib = cpu_c.ops(isa).lib
    for lo in range(0, len(pairs), 16):
        dims, ptrs = [], []
        for (x, w), y in zip(pairs[lo:lo + 16], out[lo:lo + 16]):
            dims += (_c_code(w), w.shape[0], w.shape[1])
            ptrs += (*_c_pointers(w), x.data_ptr(), y.data_ptr())
        rc = lib.lowbit_matvec_group(len(dims) // 3, (cpu_c.I64 * len(dims))(*dims), (cpu_c.VP * len(ptrs))(*ptrs),
                                     B, torch.get_num_threads(), int(accumulate))
        if rc == -2:
            raise MemoryError(f"lowbit: cannot allocate activation scratch for {B} streams")
        if rc:
            raise ValueError("lowbit: bad product group (unknown format code)")
    return out


def quantize_rows(x, col=None, isa=None):
    """The C activation quantiser: x [B, I] (times col) -> (q int8 [B, Ip], d [B, nb], s [B, nb])."""
    B, I = x.shape
    Ip = -(-I // BLOCK) * BLOCK
    q, d, s = torch.empty(B, Ip, dtype=torch.int8), torch.empty(B, Ip // BLOCK), torch.empty(B, Ip // BLOCK)
    cpu_c.ops(isa).lib.lowbit_quantize_rows(x.data_ptr(), _ptr(col), B, I, Ip, q.data_ptr(), d.data_ptr(), s.data_ptr())
    return q, d, s


def dequantize_rows(w, r0, r1, out, isa=None):
    """Rows [r0, r1) of the stored matrix (W diag(1/col)) -> out float32 [r1 - r0, in] (C, OpenMP)."""
    qs, qh, d, m, _ = _c_pointers(w)
    cpu_c.ops(isa).lib.lowbit_dequantize(_c_code(w), qs, qh, d, m, out.data_ptr(), r0, r1, w.shape[1],
                                         torch.get_num_threads())
    return out


def gemm(x, w):
    """x [rows, in] float32 -> x W^T [rows, out]: (x col) times slices of at most quant.GEMM_SLICE
    dequantised stored weights."""
    return sliced_gemm(scaled_x(x, w), w, dequantize_rows)


# Implementations with the dispatch signature: pairs [(x [rows, in] float32, w), ...]

def linear_matvec(pairs, out=None, accumulate=False):
    """Token mode (one token per stream, any B; also short prompts): the C kernels, batch invariant."""
    return matvec_group([(x.contiguous(), w) for x, w in pairs], out, accumulate)


def linear_gemm(pairs, out=None, accumulate=False):
    """Sequence mode: dequantised slices of rows + torch's GEMM."""
    return write_outputs(out, [gemm(x.contiguous(), w) for x, w in pairs], accumulate)


dispatch.register_impl("linear", "lowbit_c", linear_matvec, needs_c=True)
dispatch.register_impl("linear", "lowbit_gemm", linear_gemm, needs_c=True)

# ---------------------------------------------------------------------------------------------
# The records

SERVES = (formats.Serve("cpu", "float32", "token", "lowbit_c", "quant_torch"),
          formats.Serve("cpu", "float32", "short", "lowbit_c", "quant_torch"),
          formats.Serve("cpu", "float32", "sequence", "lowbit_gemm", "quant_torch"))


def _block_type(layout, cols):
    name = layout.replace("_", "").upper() + ("Cols" if cols else "") + "Weight"
    base = KBlockWeight if SPECS[layout].super_block else BlockWeight
    return type(name, (base,), {"layout": layout, "cols": cols, "__module__": __name__})


def _file_parts(spec, cols):
    scales = ((".qh",) * (spec.bits == 5) + (".sb",) if spec.super_block
              else (".qh",) * (spec.bits == 5) + (".d",) + (".m",) * spec.has_min)
    return ("",) + scales + (".col",) * cols


TYPES = {}
RECORDS = {}
for _layout, _spec in SPECS.items():
    for _cols in (False, True):
        _name = _layout + OUTLIER_SUFFIX * _cols
        TYPES[_name] = _block_type(_layout, _cols)
        RECORDS[_name] = formats.register(formats.WeightFormat(
            _name, C_CODES[_name], _spec.bytes_per_weight, torch.float16,
            pack=lambda w, after_slice=None, _l=_layout, _c=_cols: quantize(w, _l, _c, after_slice=after_slice),
            dequantize=TYPES[_name].dequantize, reference=matvec_reference, serves=SERVES, block=BLOCK,
            packed_type=TYPES[_name], c_parts=TYPES[_name].c_parts, file_parts=_file_parts(_spec, _cols),
            short_rows=SHORT_ROWS[_layout]))
_name = formats.Q8_0.name + OUTLIER_SUFFIX             # "int8+cols"
TYPES[_name] = Int8ColsWeight
RECORDS[_name] = formats.register(formats.WeightFormat(
    _name, C_CODES[_name], formats.Q8_0.bytes_per_weight, torch.float16,
    pack=lambda w, after_slice=None: quantize_int8_cols(w, after_slice=after_slice),
    dequantize=Int8ColsWeight.dequantize, reference=matvec_reference, serves=SERVES, block=BLOCK,
    packed_type=Int8ColsWeight, file_parts=("", ".scale", ".col"), c_parts=Int8ColsWeight.c_parts,
    layout=formats.INT8_LAYOUT, from_layout=formats.int8_from_layout, short_rows=formats.INT8_SHORT_ROWS))
