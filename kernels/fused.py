"""Fused element-wise ops of one RWKV-4 decode step, each beside its torch reference (same
signature). The C versions (`cpu_c`) run for float32 contiguous CPU tensors; everything else
(CUDA, 16-bit) runs the references, which are the definition of what each op computes."""
import torch
import torch.nn.functional as F

from . import cpu_c


def _c_ok(*tensors):
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors) \
        and cpu_c.available()


def ln_shift_mix_reference(x, ln_w, ln_b, eps, shift, mixes):
    """xx = LayerNorm(x); returns [lerp(shift, xx, m) for m in mixes] and sets shift = xx.
    x, shift: [B, C]; ln_w, ln_b, each mix: [C]."""
    xx = F.layer_norm(x, (x.shape[-1],), ln_w, ln_b, eps)
    outs = [torch.lerp(shift, xx, m) for m in mixes]
    shift.copy_(xx)
    return outs


def wkv_step_gated_reference(w, u, r, k, v, a, b, p):
    """sigmoid(r) * WKV(k, v) for one token; (a, b, p) updated in place. w, u: [C]; others [B, C]."""
    from . import wkv_step
    return torch.sigmoid(r) * wkv_step(w, u, k, v, a, b, p).to(r.dtype)


def relu_square_reference_(k):
    return k.clamp_(min=0).square_()


def add_gated_reference_(x, r, v):
    """x += sigmoid(r) * v, in place."""
    return x.add_(torch.sigmoid(r) * v)


def ln_shift_mix(x, ln_w, ln_b, eps, shift, mixes):
    if _c_ok(x, ln_w, ln_b, shift, *mixes):
        return cpu_c.ln_shift_mix(x, ln_w, ln_b, eps, shift, mixes)
    return ln_shift_mix_reference(x, ln_w, ln_b, eps, shift, mixes)


def wkv_step_gated(w, u, r, k, v, a, b, p):
    if _c_ok(w, u, r, k, v, a, b, p):
        return cpu_c.wkv_step_gated(w, u, r, k, v, a, b, p)
    return wkv_step_gated_reference(w, u, r, k, v, a, b, p)


def relu_square_(k):
    return cpu_c.relu_square_(k) if _c_ok(k) else relu_square_reference_(k)


def add_gated_(x, r, v):
    return cpu_c.add_gated_(x, r, v) if _c_ok(x, r, v) else add_gated_reference_(x, r, v)
