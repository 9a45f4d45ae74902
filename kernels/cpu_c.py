"""The C decode kernels (`csrc/cpu_ops.c`), loaded with ctypes.

They run on the OpenMP thread pool torch already runs (the same `libgomp.so.1`), so decode does not
pay for two thread pools competing for the cores. Compiled on first use with the system C compiler
into the cache directory (keyed by a hash of the source and flags). Where there is no compiler or
no AVX2/FMA, `available()` is False and `kernels` uses the torch/numpy paths instead.
Callers pass float32, contiguous CPU tensors (the dispatch in `kernels.fused` / `kernels.linear`
checks that).
"""
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "cpu_ops.c"
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC"]
MAX_GROUP = 8
_P, _I64, _VP = ctypes.POINTER, ctypes.c_int64, ctypes.c_void_p


def _cpu_has_avx2_fma():
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags


def _cache_dir():
    root = os.environ.get("RWKV_ENGINE_CACHE") or Path.home() / ".cache" / "rwkv_engine"
    return Path(root) / "kernels"


@lru_cache(maxsize=None)
def _library():
    """Build (once) and load the shared library; None if this machine cannot."""
    if os.environ.get("RWKV_ENGINE_NO_C_KERNELS") or not _cpu_has_avx2_fma():
        return None
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        return None
    tag = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:16]
    out = _cache_dir() / f"cpu_ops-{tag}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            tmp_so = Path(tmp) / out.name
            if subprocess.run([cc, *FLAGS, str(SOURCE), "-o", str(tmp_so)], capture_output=True).returncode:
                return None
            os.replace(tmp_so, out)
    lib = ctypes.CDLL(str(out))
    lib.matvec_group.argtypes = [_I64, _P(_VP), _P(_VP), _P(_VP), _P(_I64), _P(_I64), _I64, _I64, _I64]
    lib.ln_shift_mix.argtypes = [_VP, _VP, _VP, ctypes.c_double, _VP, _I64, _P(_VP), _P(_VP), _I64, _I64]
    lib.wkv_step_gated.argtypes = [_VP] * 9 + [_I64, _I64]
    lib.relu_square.argtypes = [_VP, _I64]
    lib.add_gated.argtypes = [_VP, _VP, _VP, _I64]
    lib.wkv_seq.argtypes = [_VP] * 8 + [_I64] * 4
    for f in (lib.matvec_group, lib.ln_shift_mix, lib.wkv_step_gated, lib.relu_square, lib.add_gated, lib.wkv_seq):
        f.restype = None
    return lib


def available():
    return _library() is not None


def _ptrs(tensors):
    return (_VP * len(tensors))(*[t.data_ptr() for t in tensors])


def matvec_group(pairs, out=None, accumulate=False):
    """[(x [B, in], W [out, in]), ...] -> [y [B, out], ...]: y = x W^T (y += x W^T with
    `accumulate`, into the given `out` tensors). One parallel region for the whole group."""
    n = len(pairs)
    if n > MAX_GROUP:
        raise ValueError(f"matvec_group takes at most {MAX_GROUP} products, got {n}")
    B = pairs[0][0].shape[0]
    if out is None:
        out = [torch.empty(B, W.shape[0]) for _, W in pairs]
    _library().matvec_group(n, _ptrs([W for _, W in pairs]), _ptrs([x for x, _ in pairs]), _ptrs(out),
                            (_I64 * n)(*[W.shape[0] for _, W in pairs]),
                            (_I64 * n)(*[W.shape[1] for _, W in pairs]), B, torch.get_num_threads(),
                            int(accumulate))
    return out


def ln_shift_mix(x, ln_w, ln_b, eps, shift, mixes):
    B, C = x.shape
    outs = [torch.empty(B, C) for _ in mixes]
    _library().ln_shift_mix(x.data_ptr(), ln_w.data_ptr(), ln_b.data_ptr(), eps, shift.data_ptr(),
                            len(mixes), _ptrs(mixes), _ptrs(outs), B, C)
    return outs


def wkv_step_gated(w, u, r, k, v, a, b, p):
    out = torch.empty_like(k)
    _library().wkv_step_gated(w.data_ptr(), u.data_ptr(), r.data_ptr(), k.data_ptr(), v.data_ptr(),
                              a.data_ptr(), b.data_ptr(), p.data_ptr(), out.data_ptr(), k.shape[0], k.shape[1])
    return out


def relu_square_(k):
    _library().relu_square(k.data_ptr(), k.numel())
    return k


def add_gated_(x, r, v):
    _library().add_gated(x.data_ptr(), r.data_ptr(), v.data_ptr(), x.numel())
    return x


def wkv_seq(w, u, k, v, state):
    """WKV over [B, T, C] float32 contiguous k, v; returns y and a new state (inputs untouched)."""
    B, T, C = k.shape
    a, b, p = (t.clone() for t in state)
    y = torch.empty(B, T, C)
    _library().wkv_seq(w.data_ptr(), u.data_ptr(), k.data_ptr(), v.data_ptr(), y.data_ptr(),
                       a.data_ptr(), b.data_ptr(), p.data_ptr(), B, T, C, torch.get_num_threads())
    return y, (a, b, p)
