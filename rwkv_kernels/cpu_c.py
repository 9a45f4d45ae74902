"""The C CPU kernels (`csrc/cpu_ops.c`): built per instruction set, loaded with ctypes.

Build: `build(source, isa)` compiles a C file in `csrc/` with the system compiler for one instruction
set level of `ISAS` (never -march=native), into the cache directory under a name keyed by the ISA, a
hash of the sources, the flags and the compiler, so a cache shared between machines never hands a
CPU an instruction it lacks. The CPU's levels come from /proc/cpuinfo flags (`supported_isas`,
`best_isa`); cpu_ops runs the best level by default. `RWKV_ENGINE_CPU_FEATURES="avx2,fma,f16c"`
simulates another CPU's flags and `RWKV_ENGINE_ISA=avx512` picks a level; tests run every level.

Run: decode products run on the library's own thread pool (`csrc/pool.h`, sized by
`torch.get_num_threads()`); the prefill WKV scan runs on torch's OpenMP pool. Callers pass float32,
contiguous CPU tensors: `rwkv_kernels.dispatch` decides when these functions run.
"""
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch

from . import formats, spin

CSRC = Path(__file__).parent / "csrc"
SOURCE = CSRC / "cpu_ops.c"
BASE_FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-ffp-contract=off", "-pthread"]
# ISA level -> (compiler flags, /proc/cpuinfo flags the CPU must have); listed worst to best
ISAS = {
    "avx2": (["-mavx2", "-mfma", "-mf16c"], {"avx2", "fma", "f16c"}),
    "avx512": (["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"],
               {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"}),
}
_P, _I64, _VP = ctypes.POINTER, ctypes.c_int64, ctypes.c_void_p
I64, VP = _I64, _VP


class BuildError(RuntimeError):
    """The C kernels cannot be built or loaded here (one line: why)."""


def cpu_features():
    """The CPU's feature flags (from /proc/cpuinfo), or the simulated set in RWKV_ENGINE_CPU_FEATURES."""
    simulated = os.environ.get("RWKV_ENGINE_CPU_FEATURES")
    if simulated is not None:
        return {f.strip() for f in simulated.split(",") if f.strip()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def supported_isas(features=None):
    """ISA levels this CPU runs, best first."""
    features = cpu_features() if features is None else set(features)
    return [isa for isa, (_, needs) in reversed(ISAS.items()) if needs <= features]


def best_isa(features=None):
    """The level to use for these CPU flags (default: this CPU's): RWKV_ENGINE_ISA if set (must be
    supported), else the best supported; None if none."""
    supported = supported_isas(features)
    forced = os.environ.get("RWKV_ENGINE_ISA") if features is None else None
    if forced:
        if forced not in ISAS:
            raise ValueError(f"RWKV_ENGINE_ISA={forced!r}: use one of {', '.join(ISAS)}")
        return forced if forced in supported else None
    return supported[0] if supported else None


def _cache_dir():
    root = os.environ.get("RWKV_ENGINE_CACHE") or Path.home() / ".cache" / "rwkv_engine"
    return Path(root) / "kernels"


def _compiler():
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        raise BuildError("no C compiler found (set CC or install gcc)")
    return cc


def _build_key(source, flags, cc):
    """The cache key of `source` built with `flags` by `cc`: the source and every header it can include
    (its own folder's, which `#include "..."` finds first, then csrc/'s), so a source in another folder
    (bench.products --against-src) with the same text but other headers gets its own build."""
    h = hashlib.sha256()
    folders = dict.fromkeys([Path(source).resolve().parent, CSRC.resolve()])
    for folder in folders:
        h.update(b"folder\0")
        for f in sorted(folder.glob("*.h")):
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    h.update(Path(source).read_bytes())
    h.update(" ".join(flags).encode())
    h.update(f"{cc}:{os.stat(cc).st_mtime_ns}".encode())
    return h.hexdigest()[:16]


@lru_cache(maxsize=None)
def build(source, isa):
    """Compile `source` (a C file; `csrc/` is on the include path) for `isa` into the cache (once) and
    load it. Raises BuildError (compiler missing or failing, CPU lacking the ISA) or ValueError."""
    source = Path(source)
    if isa not in ISAS:
        raise ValueError(f"unknown ISA level {isa!r}: use one of {', '.join(ISAS)}")
    if isa not in supported_isas():
        raise BuildError(f"this CPU lacks {isa} (needs {', '.join(sorted(ISAS[isa][1]))})")
    cc = _compiler()
    flags = [*BASE_FLAGS, *ISAS[isa][0], f"-I{CSRC}"]
    out = _cache_dir() / f"{source.stem}-{isa}-{_build_key(source, flags, cc)}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            tmp_so = Path(tmp) / out.name
            r = subprocess.run([cc, *flags, str(source), "-o", str(tmp_so)], capture_output=True, text=True)
            if r.returncode:
                first = (r.stderr.strip().splitlines() or ["no output"])[0]
                raise BuildError(f"{cc} failed on {source.name} for {isa}: {first}")
            os.replace(tmp_so, out)
    try:
        return ctypes.CDLL(str(out))
    except OSError as exc:
        raise BuildError(f"cannot load {out.name}: {exc}") from None


class CpuOps:
    """The functions of one build of cpu_ops.c (one ISA level), taking and returning tensors: the one
    place that declares the library's C signatures (rwkv_kernels.quant calls `lib` for its kernels), and
    checks its format enum against the format records (rwkv_kernels/formats.py) when it loads."""

    def __init__(self, lib, isa):
        self.lib, self.isa = lib, isa
        lib.format_name.argtypes = [_I64]
        lib.format_name.restype = ctypes.c_char_p
        formats.check_c_enum(lib.format_name)
        lib.qmatvec_group.argtypes = [_I64, _P(_I64), _P(_VP), _I64, _I64, _I64]
        lib.qmatvec_group.restype = _I64
        lib.quantize_rows.argtypes = [_VP, _I64, _I64, _I64, _VP, _VP]
        lib.dequantize.argtypes = [_I64, _VP, _VP, _VP, _I64, _I64, _I64, _I64, _I64]
        for f in (lib.quantize_rows, lib.dequantize):
            f.restype = None
        lib.isa_level.restype = ctypes.c_int
        lib.set_q8_rows.argtypes = [_I64]
        lib.get_q8_rows.restype = _I64
        lib.set_wide16.argtypes = [_I64, _I64]
        lib.get_wide16_one_row_below.restype = _I64
        lib.get_wide16_pf.restype = _I64
        lib.set_f32_pf.argtypes = [_I64]
        lib.get_f32_pf.restype = _I64
        lib.matvec_group.argtypes = [_I64, _P(_VP), _P(_VP), _P(_VP), _P(_I64), _P(_I64), _I64, _I64, _I64]
        lib.matvec_group.restype = _I64
        lib.matvec_max_group.restype = _I64
        lib.ln_shift_mix.argtypes = [_VP, _VP, _VP, ctypes.c_double, _VP, _I64, _P(_VP), _P(_VP), _I64, _I64]
        lib.wkv_step_gated.argtypes = [_VP] * 9 + [_I64, _I64]
        lib.relu_square.argtypes = [_VP, _I64]
        lib.add_gated.argtypes = [_VP, _VP, _VP, _I64]
        lib.wkv_seq.argtypes = [_VP] * 8 + [_I64] * 4
        lib.decode_layers.argtypes = [_I64, _P(_I64), _P(_VP)] + [_VP] * 6 + [_I64] * 3 + [ctypes.c_double] + [_I64] * 3
        lib.decode_layers.restype = _I64
        lib.decode_token.argtypes = ([_I64, _P(_I64), _P(_VP), _VP, _P(_I64), _P(_VP), ctypes.c_double, _VP, _VP, _VP,
                                      _P(_I64), _P(_VP)] + [_VP] * 6
                                     + [_I64] * 3 + [ctypes.c_double] + [_I64] * 3)
        lib.decode_token.restype = _I64
        if hasattr(lib, "sequence_layers"):       # an older kernel source (the A/B harnesses) may not have it
            lib.sequence_layers.argtypes = ([_I64, _P(_I64), _P(_VP)] + [_VP] * 6 + [_I64] * 4 + [ctypes.c_double]
                                            + [_I64] * 3)
            lib.sequence_layers.restype = _I64
        lib.decode_layout.argtypes = [_I64]
        lib.sample_rows.argtypes = [_VP, _I64, _I64, ctypes.c_double, _VP, _VP, _I64]
        lib.sample_rows.restype = None
        if hasattr(lib, "exp_lanes"):             # the tests' handle on vexp; older sources lack it
            lib.exp_lanes.argtypes = [_VP, _VP, _I64, _I64]
            lib.exp_lanes.restype = None
        lib.pool_probe.argtypes = [_I64, _I64, _I64, _VP]
        lib.pool_probe.restype = _I64
        lib.pool_stalls.restype = _I64
        lib.pool_reset_stalls.restype = None
        lib.decode_layout.restype = _I64
        for f in (lib.ln_shift_mix, lib.wkv_step_gated, lib.relu_square, lib.add_gated, lib.wkv_seq):
            f.restype = None
        lib.lowbit_matvec_group.argtypes = [_I64, _P(_I64), _P(_VP), _I64, _I64, _I64]
        lib.lowbit_matvec_group.restype = _I64
        lib.lowbit_quantize_rows.argtypes = [_VP, _VP, _I64, _I64, _I64, _VP, _VP, _VP]
        lib.lowbit_dequantize.argtypes = [_I64, _VP, _VP, _VP, _VP, _VP, _I64, _I64, _I64, _I64]
        lib.lowbit_quantize_rows.restype = lib.lowbit_dequantize.restype = None
        lib.lowbit_quantize_k.argtypes = [_VP, _I64, _I64, _I64, _I64, _VP, _VP, _VP, _I64]
        lib.lowbit_quantize_k.restype = _I64
        self.max_group = lib.matvec_max_group()

    def matvec_group(self, pairs, out=None, accumulate=False):
        """[(x [B, in], W [out, in]), ...] -> [y [B, out], ...]: y = x W^T (y += x W^T with
        `accumulate`, into the given `out` tensors). Any B and any number of pairs (one pool job per
        `max_group` of them); each stream's result is independent of B (batch invariant)."""
        B = pairs[0][0].shape[0]
        if out is None:
            out = [torch.empty(B, W.shape[0]) for _, W in pairs]
        for lo in range(0, len(pairs), self.max_group):
            part, ys = pairs[lo:lo + self.max_group], out[lo:lo + self.max_group]
            n = len(part)
            self.lib.matvec_group(n, _ptrs([W for _, W in part]), _ptrs([x for x, _ in part]), _ptrs(ys),
                                  (_I64 * n)(*[W.shape[0] for _, W in part]),
                                  (_I64 * n)(*[W.shape[1] for _, W in part]), B, torch.get_num_threads(),
                                  int(accumulate))
        return out

    def ln_shift_mix(self, x, ln_w, ln_b, eps, shift, mixes):
        B, C = x.shape
        outs = [torch.empty(B, C) for _ in mixes]
        self.lib.ln_shift_mix(x.data_ptr(), ln_w.data_ptr(), ln_b.data_ptr(), eps, shift.data_ptr(),
                              len(mixes), _ptrs(mixes), _ptrs(outs), B, C)
        return outs

    def wkv_step_gated(self, w, u, r, k, v, a, b, p):
        out = torch.empty_like(k)
        self.lib.wkv_step_gated(w.data_ptr(), u.data_ptr(), r.data_ptr(), k.data_ptr(), v.data_ptr(),
                                a.data_ptr(), b.data_ptr(), p.data_ptr(), out.data_ptr(), k.shape[0], k.shape[1])
        return out

    def relu_square_(self, k):
        self.lib.relu_square(k.data_ptr(), k.numel())
        return k

    def add_gated_(self, x, r, v):
        self.lib.add_gated(x.data_ptr(), r.data_ptr(), v.data_ptr(), x.numel())
        return x

    def wkv_seq(self, w, u, k, v, state):
        """WKV over [B, T, C] float32 contiguous k, v; returns y and a new state (inputs untouched)."""
        B, T, C = k.shape
        a, b, p = (t.clone() for t in state)
        y = torch.empty(B, T, C)
        self.lib.wkv_seq(w.data_ptr(), u.data_ptr(), k.data_ptr(), v.data_ptr(), y.data_ptr(),
                         a.data_ptr(), b.data_ptr(), p.data_ptr(), B, T, C, torch.get_num_threads())
        return y, (a, b, p)


    def sample_rows(self, logits, inv_temp, u):
        """logits [B, V] float32 contiguous, u [B] float64 -> int64 [B] (rwkv_kernels/sampling.py)."""
        B, V = logits.shape
        out = torch.empty(B, dtype=torch.int64)
        self.lib.sample_rows(logits.data_ptr(), B, V, float(inv_temp), u.data_ptr(), out.data_ptr(),
                             torch.get_num_threads() if B > 1 else 1)
        return out


def _ptrs(tensors):
    return (_VP * len(tensors))(*[t.data_ptr() for t in tensors])


@lru_cache(maxsize=None)
def _load(isa):
    """CpuOps for `isa`, or the BuildError saying why not (cached: a failed build is tried once)."""
    try:
        if isa is None:
            raise BuildError("this CPU lacks AVX2/FMA/F16C, or RWKV_ENGINE_ISA names a level it lacks")
        return CpuOps(build(SOURCE, isa), isa)
    except BuildError as exc:
        return exc


def _default_isa():
    """The level cpu_ops runs by default: the best this CPU supports (or RWKV_ENGINE_ISA). Measured on
    a quiet AVX-512 machine (169m fp32, 2 threads): the avx512 build decodes one stream as fast as
    avx2 and 16 streams 1.4x faster (`python -m bench.generate --batch 16`, RWKV_ENGINE_ISA=avx2 vs
    avx512), where the products become compute-bound."""
    return best_isa()


_default = None         # the default build (CpuOps) or the BuildError saying why there is none
_default_ops = None     # the same when it is a build (the fast path of `ops`)


def _choose_default():
    """The default build, decided once, at first use: the environment switches
    (RWKV_ENGINE_NO_C_KERNELS, RWKV_ENGINE_ISA, RWKV_ENGINE_CPU_FEATURES) are read here and only here."""
    if os.environ.get("RWKV_ENGINE_NO_C_KERNELS"):
        return BuildError("disabled by RWKV_ENGINE_NO_C_KERNELS")
    return _load(_default_isa())


def ops(isa=None):
    """The cpu_ops build for `isa` (default: `best_isa()`, chosen once per process at first use).
    Raises BuildError if it cannot run here."""
    global _default, _default_ops
    if isa is None:
        if _default_ops is not None:
            return _default_ops
        if _default is None:
            _default = _choose_default()
            if not isinstance(_default, BuildError):
                _default_ops = _default
                spin.warn_if_too_late()          # the first use of the C kernels
        result = _default
    elif os.environ.get("RWKV_ENGINE_NO_C_KERNELS"):
        result = BuildError("disabled by RWKV_ENGINE_NO_C_KERNELS")
    else:
        result = _load(isa)
    if isinstance(result, BuildError):
        raise result
    return result


# The 512-bit loops' run-time settings (quant_ops.h: rows walked at once, prefetch distances; the bits do not
# depend on them): each setter and the getters that read its arguments back.
LOOP_SETTINGS = {"set_q8_rows": ("get_q8_rows",),
                 "set_wide16": ("get_wide16_one_row_below", "get_wide16_pf"),
                 "set_f32_pf": ("get_f32_pf",)}


def copy_loop_settings(src, dst):
    """Give the library `dst` (another build, e.g. an older commit's) the loop settings `src` runs with,
    where both are 512-bit builds and `dst` has the setter (an older source may lack some), so that an A/B
    of the two times their code, not their settings."""
    if src.isa_level() != 512 or dst.isa_level() != 512:
        return
    for setter, getters in LOOP_SETTINGS.items():
        if not hasattr(dst, setter):
            continue
        values = []
        for name in getters:
            get = getattr(src, name)
            get.restype = _I64
            values.append(get())
        fn = getattr(dst, setter)
        fn.argtypes = [_I64] * len(values)
        fn(*values)


def other_build(source, isa=None):
    """CpuOps of another kernel source file (e.g. an older commit's cpu_ops.c), built for `isa` (default:
    the default build's level) and given the default build's loop settings (copy_loop_settings): for A/B
    harnesses (bench.modes --against-src), which route calls to it with `routed`."""
    isa = isa or ops().isa
    other = CpuOps(build(str(source), isa), isa)
    copy_loop_settings(ops(isa).lib, other.lib)
    return other


@contextmanager
def routed(build_ops):
    """Within this block `ops()` (the default build, which every kernel call without an explicit isa
    uses) is `build_ops`."""
    global _default, _default_ops
    ops()                                         # the default decided first, so it is what comes back
    saved = _default, _default_ops
    _default = _default_ops = build_ops
    try:
        yield build_ops
    finally:
        _default, _default_ops = saved


def unavailable_reason():
    """None when the C kernels run here, else one line saying why not."""
    try:
        ops()
    except BuildError as exc:
        return str(exc)
    return None


def available():
    return unavailable_reason() is None
