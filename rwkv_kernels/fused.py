"""Fused element-wise ops of one RWKV-4 decode step, each beside its torch reference (same
signature). `rwkv_kernels.dispatch` picks the C version (`cpu_c`) for float32 contiguous CPU tensors and
the reference elsewhere (CUDA, 16-bit); the references are the definition of what each op computes."""
import torch
import torch.nn.functional as F

from . import cpu_c, dispatch
from .wkv_ops import wkv_step


def ln_shift_mix_reference(x, ln_w, ln_b, eps, shift, mixes):
    """xx = LayerNorm(x); returns [lerp(shift, xx, m) for m in mixes] and sets shift = xx.
    x, shift: [B, C]; ln_w, ln_b, each mix: [C]."""
    xx = F.layer_norm(x, (x.shape[-1],), ln_w, ln_b, eps)
    outs = [torch.lerp(shift, xx, m) for m in mixes]
    shift.copy_(xx)
    return outs


def wkv_step_gated_reference(w, u, r, k, v, a, b, p, backend=None):
    """sigmoid(r) * WKV(k, v) for one token; (a, b, p) updated in place. w, u: [C]; others [B, C].
    backend: the `wkv_step` implementation (None: the dispatch table's)."""
    return torch.sigmoid(r) * wkv_step(w, u, k, v, a, b, p, backend=backend).to(r.dtype)


def relu_square_reference_(k):
    return k.clamp_(min=0).square_()


def add_gated_reference_(x, r, v):
    """x += sigmoid(r) * v, in place."""
    return x.add_(torch.sigmoid(r) * v)


for _op, _c, _ref in (("ln_shift_mix", lambda *a: cpu_c.ops().ln_shift_mix(*a), ln_shift_mix_reference),
                      ("relu_square_", lambda k: cpu_c.ops().relu_square_(k), relu_square_reference_),
                      ("add_gated_", lambda *a: cpu_c.ops().add_gated_(*a), add_gated_reference_)):
    dispatch.register_impl(_op, "c", _c, needs_c=True)
    dispatch.register_impl(_op, "reference", _ref)
dispatch.register_impl("wkv_step_gated", "c", lambda *a, backend=None: cpu_c.ops().wkv_step_gated(*a), needs_c=True)
dispatch.register_impl("wkv_step_gated", "composed", wkv_step_gated_reference)


def _pick(op, tensors, backend=None):
    key = (dispatch.device_of(*tensors), dispatch.compute_of(*tensors), "-", dispatch.layout_of(*tensors))
    return dispatch.pick(op, key, backend)[1]


def ln_shift_mix(x, ln_w, ln_b, eps, shift, mixes, backend=None):
    return _pick("ln_shift_mix", (x, ln_w, ln_b, shift, *mixes), backend)(x, ln_w, ln_b, eps, shift, mixes)


def wkv_step_gated(w, u, r, k, v, a, b, p, backend=None):
    """backend: a WKV implementation ("c"/"cpu": the fused C step; "triton", "numpy", "reference":
    the gate over that `wkv_step`); None: the dispatch table."""
    gated = None if backend is None else ("c" if backend in ("c", "cpu") else "composed")
    fn = _pick("wkv_step_gated", (w, u, r, k, v, a, b, p), gated)
    return fn(w, u, r, k, v, a, b, p, backend=None if gated == "c" else backend)


def relu_square_(k, backend=None):
    return _pick("relu_square_", (k,), backend)(k)


def add_gated_(x, r, v, backend=None):
    return _pick("add_gated_", (x, r, v), backend)(x, r, v)
