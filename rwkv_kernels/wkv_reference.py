"""Plain-loop reference for the RWKV-4 WKV recurrence.

Every fast WKV implementation in `rwkv_kernels/` has this exact signature and is tested against this
function run in float64.

The recurrence (per channel c, decay w = -exp(time_decay) < 0, bonus u = time_first):

    wkv_t = (A_{t-1} + e^{u + k_t} v_t) / (B_{t-1} + e^{u + k_t})
    A_t   = e^{w} A_{t-1} + e^{k_t} v_t
    B_t   = e^{w} B_{t-1} + e^{k_t}

A and B overflow quickly (k can be large, w can be ~0), so they are stored scaled by e^{-p}
where p is the running max of the exponents seen so far (the log-sum-exp trick): the state is
(a, b, p) with A = a e^p and B = b e^p. Every exp() below has a non-positive argument.
"""
import torch

# Initial running max: "minus infinity" that stays finite so that p - p is 0, not NaN.
P_INIT = -1e38


def new_wkv_state(batch_size, channels, device="cpu", dtype=torch.float32):
    """Zero WKV state (a, b, p), each [B, C]."""
    a = torch.zeros(batch_size, channels, device=device, dtype=dtype)
    b = torch.zeros(batch_size, channels, device=device, dtype=dtype)
    p = torch.full((batch_size, channels), P_INIT, device=device, dtype=dtype)
    return a, b, p


def wkv_reference(w, u, k, v, state=None):
    """Reference WKV over a sequence.

    w, u: [C] (w is the per-step log decay, already -exp(time_decay)).
    k, v: [B, T, C]. state: (a, b, p), each [B, C], or None for a fresh state.
    Computes in float64 when any input is float64, else float32.
    Returns y [B, T, C] and the new state (a, b, p), in that compute dtype.
    """
    dtype = torch.float64 if torch.float64 in (w.dtype, u.dtype, k.dtype, v.dtype) else torch.float32
    B, T, C = k.shape
    w, u, k, v = (t.to(dtype) for t in (w, u, k, v))
    if state is None:
        state = new_wkv_state(B, C, k.device, dtype)
    a, b, p = (s.to(dtype) for s in state)
    y = torch.empty(B, T, C, device=k.device, dtype=dtype)
    for t in range(T):
        kt, vt = k[:, t], v[:, t]
        # output: previous state plus the current token with bonus u
        uk = u + kt
        q = torch.maximum(p, uk)
        e1, e2 = torch.exp(p - q), torch.exp(uk - q)
        y[:, t] = (e1 * a + e2 * vt) / (e1 * b + e2)
        # state update: decay the past by e^w, add the current token
        wp = p + w
        q = torch.maximum(wp, kt)
        e1, e2 = torch.exp(wp - q), torch.exp(kt - q)
        a, b, p = e1 * a + e2 * vt, e1 * b + e2, q
    return y, (a, b, p)
