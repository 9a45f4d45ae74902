"""CPU WKV, same signature and numerics as `wkv_reference` (running-max form, see that module).

Two implementations: the C loop in `csrc/cpu_ops.c` (each thread owns a slice of the channels and
walks time with the state in registers) and, where no C compiler is available, a numpy loop over
time whose per-step work runs on preallocated float32 buffers with `out=` (a few microseconds of
dispatch per step instead of a dozen fresh torch tensors).
"""
import numpy as np
import torch

from . import cpu_c, dispatch
from .wkv_reference import new_wkv_state


def wkv_cpu(w, u, k, v, state=None):
    """WKV over a sequence on CPU in float32: what the dispatch table runs for CPU tensors (the C loop,
    `wkv_cpu_c`, channels split over threads; its fallback without the C build, with the table's one
    warning, the numpy loop below).

    w, u: [C] float32. k, v: [B, T, C]. state: (a, b, p) each [B, C] float32, or None.
    Returns y [B, T, C] float32 and a new state (a, b, p); the input state is not modified.
    """
    key = ("cpu", dispatch.dtype_name(k.dtype), "-", "*")
    return dispatch.pick("wkv", key)[1](w, u, k, v, state)


def wkv_cpu_c(w, u, k, v, state=None):
    """The C loop (`csrc/cpu_ops.c: wkv_seq`); same contract as `wkv_cpu`. Needs the C build."""
    B, T, C = k.shape
    if state is None:
        state = new_wkv_state(B, C)
    f32 = [t.detach().to(torch.float32).contiguous() for t in (w, u, k, v)]
    return cpu_c.ops().wkv_seq(*f32, tuple(s.detach().to(torch.float32).contiguous() for s in state))


def wkv_numpy(w, u, k, v, state):
    """The numpy loop: one set of ufuncs over all (B, C) per time step."""
    B, T, C = k.shape
    if state is None:
        state = new_wkv_state(B, C)
    a, b, p = (s.detach().to(torch.float32).numpy().copy() for s in state)
    w = w.detach().to(torch.float32).numpy()
    u = u.detach().to(torch.float32).numpy()
    k = k.detach().to(torch.float32).numpy()
    v = v.detach().to(torch.float32).numpy()
    y = np.empty((B, T, C), dtype=np.float32)
    uk = np.add(u, k)                                   # (B, T, C): exponent of the bonus term
    q, e1, e2, t1 = (np.empty((B, C), np.float32) for _ in range(4))
    for t in range(T):
        kt, vt, ukt = k[:, t], v[:, t], uk[:, t]
        # y_t = (e^p a + e^{u+k} v) / (e^p b + e^{u+k}), scaled by e^{-max(p, u+k)}
        np.maximum(p, ukt, out=q)
        np.subtract(p, q, out=e1); np.exp(e1, out=e1)
        np.subtract(ukt, q, out=e2); np.exp(e2, out=e2)
        np.multiply(e1, a, out=t1); np.multiply(e2, vt, out=q); np.add(t1, q, out=t1)
        np.multiply(e1, b, out=q); np.add(q, e2, out=q)
        np.divide(t1, q, out=y[:, t])
        # state: decay the past by e^w, add e^k; new running max q = max(p + w, k)
        np.add(p, w, out=p)
        np.maximum(p, kt, out=q)
        np.subtract(p, q, out=e1); np.exp(e1, out=e1)
        np.subtract(kt, q, out=e2); np.exp(e2, out=e2)
        np.multiply(e1, a, out=a); np.multiply(e2, vt, out=t1); np.add(a, t1, out=a)
        np.multiply(e1, b, out=b); np.add(b, e2, out=b)
        p, q = q, p
    return torch.from_numpy(y), (torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(p))


def wkv_cpu_step(w, u, k, v, a, b, p):
    """One token of WKV, updating the state in place. All float32 CPU tensors:
    w, u: [C]; k, v, a, b, p: [B, C]. Returns y [B, C]."""
    w, u, k, v = w.numpy(), u.numpy(), k.numpy(), v.numpy()
    a, b, p = a.numpy(), b.numpy(), p.numpy()
    uk = u + k
    q = np.maximum(p, uk)
    e1, e2 = np.exp(p - q), np.exp(uk - q)
    y = (e1 * a + e2 * v) / (e1 * b + e2)
    wp = p + w
    q = np.maximum(wp, k)
    e1, e2 = np.exp(wp - q), np.exp(k - q)
    a *= e1; a += e2 * v
    b *= e1; b += e2
    p[...] = q
    return torch.from_numpy(y)
