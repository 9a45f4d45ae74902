"""The weight formats: one record each, from which every other table is derived (ggml's type_traits).

A record (`WeightFormat`) says everything the engine knows about a format: its name, its code in the C
kernels' enum (`csrc/quant_ops.h`; checked against the records when the library loads, None for a
format without C kernels), bytes per weight, block size, the embedding table's dtype, how a float
matrix is packed and dequantised, the float64 reference of the kernels' arithmetic, and which `linear`
implementations serve it on which device and shape (`serves`: the rows `rwkv_kernels.dispatch.TABLE` gets,
with their fallbacks). Everything else reads the records: `rwkv_kernels.quant` (kernels, byte counts), the
decode step's codes (`rwkv_kernels.decode`), the dispatch rows, the packed files of `rwkv_engine.weights`,
the CLI choices and fit checks of `bench`. Adding a format is one `register(record)` plus its kernels.

Built in, in this order: "float32", "float16", "bfloat16" (plain torch tensors of that dtype) and
`Q8_0`, blocks of 32 int8 values with one float16 scale each (`Int8Weight`, ggml's Q8_0; each row's
blocks stored interleaved in groups of 16, `interleave_blocks`, a layout packed files record). Block scales
keep an outlier weight from flattening its whole row (a per-row scale would), see
`bench.quality --outliers`. Activations, state and accumulation stay float32 in every format.
`rwkv_kernels.lowbit` registers the 5- and 4-bit block formats ("q5_0", "q4_1", "q4_k", "q5_k") and the outlier treatment's
"+cols" variants (also "int8+cols") through the same `register`.

A packed type (a format that is not a plain tensor) has: `shape` (out, in), `device`, `nbytes`,
`in_features`, `dequantize()` -> float32 [out, in], `check(name)` (ValueError, one line, or self) and
`parts()` -> its tensors in the order of the record's `file_parts` (how a packed file stores it:
KEY + suffix); `register` sets its `format` attribute to the record's name.
"""
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

BLOCK = 32
BLOCK_VALUES = torch.int8       # Q8_0's values, and the activation blocks its kernel multiplies them with
MIN_SCALE = 2.0 ** -14          # smallest normal float16: an all-zero block still gets a scale > 0
# The quantisers read a matrix in slices of about this many weights (1 MB of float32), so that the few
# float32 temporaries of a slice stay a few MB, whatever the matrix (a 14B head is 1 GB in float32).
PACK_SLICE = 1 << 18
# A sequence of at most this many rows (streams x tokens) in all runs the C step on the decode kernels
# rather than the GEMM, unless its format's record says otherwise for the build (`short_rows`).
SHORT_ROWS = 48


@dataclass(frozen=True)
class Serve:
    """One dispatch row of a format's `linear`: on `device` with `compute` activations, products of
    `shape` ("token", "short", "sequence" or "*") run `impl`, or `fallback` without the C build."""
    device: str
    compute: str
    shape: str
    impl: str
    fallback: Optional[str] = None


@dataclass(frozen=True)
class WeightFormat:
    name: str
    code: Optional[int]                     # the C enum value (csrc/quant_ops.h); None: no C kernels
    bytes_per_weight: float
    embedding_dtype: torch.dtype            # the (only indexed) embedding table's dtype
    pack: Callable                          # (float W [out, in], after_slice=None) -> the weight
    dequantize: Callable                    # weight -> float32 [out, in], the format's exact values
    reference: Callable                     # (x [B, in] float32, weight) -> y: the kernels' arithmetic in float64
    serves: Tuple[Serve, ...] = ()          # the `linear` rows of the dispatch table; else its catch-all
    block: int = 1                          # weights per scale (1: no scales)
    dtype: Optional[torch.dtype] = None     # a plain tensor format: the tensor's dtype
    packed_type: Optional[type] = None      # else: the packed weight's class (see the module)
    file_parts: Tuple[str, ...] = ("",)     # key suffixes of the packed type's parts() in a file
    c_parts: Optional[Callable] = field(default=None, compare=False)   # weight -> (values, scales or None[,
                                            # 5th-bit planes, minimums, column scales]): the C decode step's parts
    layout: Optional[str] = None            # the parts' byte layout, recorded in packed files (None: the plain one)
    from_layout: Optional[Callable] = field(default=None, compare=False)  # (parts, a file's layout or None)
                                            # -> parts in `layout`; ValueError for a layout it cannot read
    short_rows: Tuple[Tuple[str, Optional[int]], ...] = ()   # (ISA build, rows): the most rows a sequence
                                            # may have and still run the C step rather than the GEMM (None:
                                            # any, the C step being the faster at every length); else SHORT_ROWS

    def short_rows_for(self, isa):
        """The most rows (streams x tokens) of a sequence that runs the C step on `isa`'s build (None: any)."""
        return dict(self.short_rows).get(isa, SHORT_ROWS)


_FORMATS = {}
_BY_DTYPE = {}
_BY_TYPE = {}
_listeners = []


def register(fmt):
    """Make `fmt` a weight format everywhere (load, convert, bench, dispatch); returns it."""
    if fmt.name in _FORMATS:
        raise ValueError(f"weight format {fmt.name!r} is already registered")
    if (fmt.dtype is None) == (fmt.packed_type is None):
        raise ValueError(f"weight format {fmt.name!r}: give exactly one of dtype and packed_type")
    if fmt.code is not None and any(f.code == fmt.code for f in _FORMATS.values()):
        raise ValueError(f"weight format {fmt.name!r}: C code {fmt.code} is taken")
    _FORMATS[fmt.name] = fmt
    if fmt.dtype is not None:
        _BY_DTYPE[fmt.dtype] = fmt
    else:
        fmt.packed_type.format = fmt.name
        _BY_TYPE[fmt.packed_type] = fmt
    _changed()
    return fmt


def unregister(name):
    """Undo `register` (tests)."""
    fmt = _FORMATS.pop(name)
    _BY_DTYPE.pop(fmt.dtype, None)
    _BY_TYPE.pop(fmt.packed_type, None)
    _changed()


def on_change(callback):
    """Call `callback()` whenever a format is registered or removed (the dispatch table rebuilds)."""
    _listeners.append(callback)


def _changed():
    for callback in _listeners:
        callback()


def names():
    """The registered format names, in registration order."""
    return tuple(_FORMATS)


class _Names(Sequence):
    """The registered format names as a live sequence (argparse `choices=`, `in` tests): a format
    registered later is in it too."""

    def __getitem__(self, i):
        return names()[i]

    def __len__(self):
        return len(_FORMATS)

    def __contains__(self, name):
        return name in _FORMATS

    def __repr__(self):
        return repr(names())


NAMES = _Names()


def all_formats():
    return tuple(_FORMATS.values())


def get(name):
    """The record of `name`; ValueError (one line, with the choices) for an unknown one."""
    fmt = _FORMATS.get(name)
    if fmt is None:
        raise ValueError(f"unknown weight format {name!r}: use one of {', '.join(_FORMATS)}")
    return fmt


def of(w):
    """The record of a weight (a plain tensor by its dtype, a packed weight by its type); None if none."""
    return _BY_DTYPE.get(w.dtype) if isinstance(w, torch.Tensor) else _BY_TYPE.get(type(w))


def name_of(w):
    """The format name of a tensor (its dtype's name if no format has it) or packed weight."""
    if isinstance(w, torch.Tensor):
        fmt = _BY_DTYPE.get(w.dtype)
        return fmt.name if fmt is not None else str(w.dtype).removeprefix("torch.")
    return w.format


def is_packed(w):
    return not isinstance(w, torch.Tensor) and type(w) in _BY_TYPE


def plain_dtypes():
    """{name: torch dtype} of the plain tensor formats."""
    return {f.name: f.dtype for f in _FORMATS.values() if f.dtype is not None}


def dequantize(w):
    """Any weight -> float32 [out, in]."""
    return w.float() if isinstance(w, torch.Tensor) else _BY_TYPE[type(w)].dequantize(w)


def c_codes():
    """{name: C enum code} of the formats the C kernels take."""
    return {f.name: f.code for f in _FORMATS.values() if f.code is not None}


def check_c_enum(format_name):
    """Raise RuntimeError unless the C library's formats (`format_name(code)` -> bytes or None, for
    codes 0, 1, ... until None) are exactly the records' codes and names."""
    in_c, code = {}, 0
    while (name := format_name(code)) is not None:
        in_c[name.decode()] = code
        code += 1
    if in_c != c_codes():
        raise RuntimeError(f"kernels: the C format enum (csrc/quant_ops.h) {in_c} disagrees with the "
                           f"format records (rwkv_kernels/formats.py) {c_codes()}")


# ---------------------------------------------------------------------------------------------
# Plain tensor formats

def _plain(name, code, dtype, embedding_dtype, serves, short_rows=()):
    def pack(w, after_slice=None):
        out = w.detach().to(dtype).contiguous()
        if after_slice is not None:
            after_slice(w)
        return out
    return WeightFormat(name, code, dtype.itemsize, embedding_dtype, pack, lambda w: w.float(),
                        lambda x, w: (x.double() @ w.double().T).float(), serves, dtype=dtype,
                        c_parts=lambda w: (w, None), short_rows=short_rows)


# float32 weights: the batched C kernel of cpu_ops for token mode and short prompts, torch's GEMM else
_F32_SERVES = (Serve("cpu", "float32", "token", "c", "torch"), Serve("cpu", "float32", "short", "c", "torch"))
# compressed weights with float32 activations (rwkv_kernels/quant.py): the C kernels read each compressed
# weight once (token mode, short prompts); longer prompts dequantise slices for torch's GEMM
PACKED_SERVES = (Serve("cpu", "float32", "token", "quant_c", "quant_torch"),
                 Serve("cpu", "float32", "short", "quant_c", "quant_torch"),
                 Serve("cpu", "float32", "sequence", "quant_gemm", "quant_torch"))


# ---------------------------------------------------------------------------------------------
# What every packed weight object has

class PackedWeight:
    """A packed matrix W [out, in]: its tensors (`parts()`, the first with one row per output row),
    `in_features`, and `format` (its record's name). Shape, device and bytes follow from them."""

    @property
    def shape(self):
        return torch.Size((self.parts()[0].shape[0], self.in_features))

    @property
    def device(self):
        return self.parts()[0].device

    @property
    def nbytes(self):
        return sum(t.nbytes for t in self.parts())


# ---------------------------------------------------------------------------------------------
# Blocks of 32 int8 values with a float16 scale each (ggml's Q8_0)

GROUP = 16                      # Q8_0 blocks interleaved per group in a row (csrc/quant_ops.h)
INT8_LAYOUT = "g16"             # the name packed files record for that layout


def _group_view(q, transpose_from):
    """[O, Ip] int8 rows -> the same bytes with every group of (up to) 16 blocks re-ordered between
    [blocks][8 dwords][4] (row order) and [8 dwords][blocks][4] (interleaved): `transpose_from` says which
    of the two `q` is in (1: row order, 2: interleaved); the result is the other."""
    O, Ip = q.shape
    nb = Ip // BLOCK
    out = torch.empty_like(q)
    full = nb // GROUP * GROUP
    for j0, m, n in ((0, full, GROUP), (full, nb - full, nb - full)):    # whole groups, then the last one
        if m == 0:
            continue
        part = q[:, j0 * BLOCK:(j0 + m) * BLOCK].reshape(O, m // n, *((n, 8) if transpose_from == 1 else (8, n)), 4)
        out[:, j0 * BLOCK:(j0 + m) * BLOCK] = part.transpose(2, 3).reshape(O, m * BLOCK)
    return out


def interleave_blocks(q):
    """Row-order Q8_0 values [O, Ip] -> the kernels' layout: in each row, every group of 16 blocks (the
    last group: the blocks left) stored as [8][m][4], dword g of block l at byte 4 (g m + l) of the group,
    so one 64-byte load holds the same dword of 16 blocks (one per 32-bit lane of the integer dot)."""
    return _group_view(q, 1)


def deinterleave_blocks(q):
    """The inverse of `interleave_blocks`: the kernels' layout -> row order."""
    return _group_view(q, 2)


@dataclass
class Int8Weight(PackedWeight):
    """W [out, in] ~ q * scale, blockwise: q int8 [out, in_padded], scale float16 [out, in_padded / 32].
    in_padded is `in` rounded up to 32; the padding weights are 0. Each row of `q` holds its blocks
    interleaved in groups of 16 (`interleave_blocks`; `rows()` gives them in row order); `scale` is in
    block order."""
    q: torch.Tensor
    scale: torch.Tensor
    in_features: int

    def parts(self):
        return self.q, self.scale

    def rows(self):
        """The values in row order: int8 [out, in_padded], block j of row o at [o, 32 j : 32 j + 32]."""
        return deinterleave_blocks(self.q)

    def dequantize(self):
        """-> float32 [out, in] (exact: every int8 x float16 product is a float32)."""
        O, Ip = self.q.shape
        w = self.rows().float().view(O, Ip // BLOCK, BLOCK) * self.scale.float()[..., None]
        return w.view(O, Ip)[:, :self.in_features]

    def check(self, name="weight"):
        """Raise ValueError (one line) if the tensors cannot be a quantised matrix."""
        O, Ip = self.q.shape if self.q.dim() == 2 else (None, None)
        if self.q.dtype != torch.int8 or O is None or Ip % BLOCK or not 0 < self.in_features <= Ip < self.in_features + BLOCK:
            raise ValueError(f"{name}: {self.format} values must be int8 [out, in rounded up to {BLOCK}], got "
                             f"{self.q.dtype} {list(self.q.shape)} for in_features {self.in_features}")
        if self.scale.dtype != torch.float16 or tuple(self.scale.shape) != (O, Ip // BLOCK):
            raise ValueError(f"{name}: scales must be float16 {[O, Ip // BLOCK]}, got {self.scale.dtype} {list(self.scale.shape)}")
        s = self.scale.float()
        if not bool((torch.isfinite(s) & (s > 0)).all()):
            raise ValueError(f"{name}: corrupt {self.format} scales (NaN, Inf, zero or negative)")
        return self


def quantize_int8(w, rows_per_step=None, after_slice=None):
    """float W [out, in] -> Int8Weight: per block of 32, scale = max|w| / 127 (stored as float16, at
    least MIN_SCALE), q = round(w / scale) in [-127, 127]. Works through slices of rows so that the
    float32 temporaries stay small whatever the matrix (a 14B head is 1 GB in float32);
    `after_slice(rows)` is called with each source slice once it is done."""
    O, I = w.shape
    Ip = -(-I // BLOCK) * BLOCK
    q = torch.empty(O, Ip, dtype=torch.int8)
    scale = torch.empty(O, Ip // BLOCK, dtype=torch.float16)
    step = rows_per_step or max(1, PACK_SLICE // Ip)
    for r0 in range(0, O, step):
        rows, scale[r0:r0 + step] = _quantize_rows(w[r0:r0 + step].detach().float(), Ip)
        q[r0:r0 + step] = interleave_blocks(rows)
        if after_slice is not None:
            after_slice(w[r0:r0 + step])
    return Int8Weight(q, scale, I)


def _quantize_rows(w, Ip):
    if not bool(torch.isfinite(w).all()):
        raise ValueError("cannot quantise a matrix with NaN or Inf values")
    O, I = w.shape
    blocks = (F.pad(w, (0, Ip - I)) if Ip != I else w).reshape(O, Ip // BLOCK, BLOCK)
    scale = (blocks.abs().amax(-1) / 127).clamp_(min=MIN_SCALE)
    if bool((scale > torch.finfo(torch.float16).max).any()):
        raise ValueError(f"weights too large for {Q8_0.name} blocks with float16 scales (|w| > 8e6)")
    scale16 = scale.to(torch.float16)
    q = (blocks / scale16.float()[..., None]).round_().clamp_(-127, 127).to(torch.int8)   # one float32 temporary
    return q.view(O, Ip), scale16


def quantize_rows_reference(x):
    """x [B, I] float32 -> (q int8 [B, Ip], d float32 [B, Ip / 32]): the activation blocks the block
    kernel multiplies with (d = max|x| / 127 per block, q = round(x / d), half to even)."""
    B, I = x.shape
    Ip = -(-I // BLOCK) * BLOCK
    blocks = F.pad(x.float(), (0, Ip - I)).view(B, Ip // BLOCK, BLOCK)
    d = blocks.abs().amax(-1) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = torch.round(blocks * inv[..., None]).to(torch.int8)
    return q.view(B, Ip), d


def int8_from_layout(parts, layout):
    """A packed file's int8 parts (values, then scales and any others, as they are) -> the current
    layout: files written before the interleaved groups (no layout recorded) hold the values in row order
    ("int8" files until 2026-12-04, "int8+cols" files until 2026-12-07)."""
    if layout == INT8_LAYOUT:
        return parts
    if layout is None:
        q, *rest = parts
        return ((interleave_blocks(q) if q.dim() == 2 and q.shape[1] % BLOCK == 0 else q), *rest)
    raise ValueError(f"int8 values in layout {layout!r}, which this version cannot read (it writes {INT8_LAYOUT!r})")


def block_matvec_reference(x, w):
    """x [B, in] float32, w Int8Weight -> y [B, out]: integer block dot products with x quantised to
    the same blocks (as ggml's vec_dot_q8_0_q8_0), in float64."""
    qx, dx = quantize_rows_reference(x)
    q = w.rows()
    B, O, nb = x.shape[0], q.shape[0], q.shape[1] // BLOCK
    dots = torch.einsum("bkj,okj->bok", qx.view(B, nb, BLOCK).double(), q.view(O, nb, BLOCK).double())
    return (dots * dx.double()[:, None, :] * w.scale.double()[None]).sum(-1).float()


# Each record's `short_rows`: where its C step (in calls of at most rwkv_kernels.decode.STEP_ROWS rows) and
# the GEMM cross, from `python -m bench.modes --model rwkv-4-pile-169m --weights F --chunks
# 48,64,96,128,192,256,384,512[,1024,2048]` (GEMM time / C step time per forward), Intel Xeon (AMX),
# 2 threads, 2026-12-07, both builds (RWKV_ENGINE_ISA=avx2): docs/results.md, Prompts.
FLOAT32 = register(_plain("float32", 0, torch.float32, torch.float32, _F32_SERVES))
FLOAT16 = register(_plain("float16", 1, torch.float16, torch.float16, PACKED_SERVES,
                          short_rows=(("avx2", 64), ("avx512", 96))))
BFLOAT16 = register(_plain("bfloat16", 2, torch.bfloat16, torch.bfloat16, PACKED_SERVES,
                           short_rows=(("avx2", 64), ("avx512", 96))))
# the 512-bit build's int8 products (VNNI) beat the GEMM at every length: 1.36x at 2048 rows
INT8_SHORT_ROWS = (("avx2", 96), ("avx512", None))
Q8_0 = register(WeightFormat(
    "int8", 3, 1 + 2 / BLOCK, torch.float16,
    pack=lambda w, after_slice=None: quantize_int8(w, after_slice=after_slice),
    dequantize=Int8Weight.dequantize, reference=block_matvec_reference, serves=PACKED_SERVES, block=BLOCK,
    packed_type=Int8Weight, file_parts=("", ".scale"), c_parts=lambda w: (w.q, w.scale),
    layout=INT8_LAYOUT, from_layout=int8_from_layout, short_rows=INT8_SHORT_ROWS))
