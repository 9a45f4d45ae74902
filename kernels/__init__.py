"""Ops of the RWKV-4 model, each with a plain reference of the same signature beside it.

The rule deciding which implementation runs lives here and only here:
  * WKV over a sequence: Triton on CUDA tensors; on CPU the C loop over time (channels split
    over threads), or the vectorized numpy loop where no C compiler is available.
  * WKV single token (decode): the fused gated C step on CPU (`fused.wkv_step_gated`), the
    sequence kernel with T=1 on CUDA.
  * linear: on CPU float32 the C matrix-vector kernel for decode-sized inputs, torch GEMM for
    prompts; torch elsewhere (see `linear.py`). `linear_group` batches independent decode
    products into one parallel region.
  * the element-wise ops of a decode step (`fused.py`): C on CPU float32, torch elsewhere.
`backend=` forces one ("reference", "cpu", "triton").
"""
from .fused import add_gated_, ln_shift_mix, relu_square_, wkv_step_gated
from .linear import linear, linear_accumulate_, linear_group, linear_reference
from .wkv_cpu import wkv_cpu, wkv_cpu_step, wkv_numpy
from .wkv_reference import P_INIT, new_wkv_state, wkv_reference


def wkv(w, u, k, v, state=None, backend=None):
    """WKV over [B, T, C]; see `wkv_reference` for shapes and numerics. Returns y float32, state."""
    backend = backend or ("triton" if k.is_cuda else "cpu")
    if backend == "triton":
        from .wkv_triton import wkv_triton
        return wkv_triton(w, u, k, v, state)
    if backend == "cpu":
        return wkv_cpu(w, u, k, v, state)
    if backend == "reference":
        return wkv_reference(w, u, k, v, state)
    raise ValueError(f"unknown WKV backend {backend!r}: use 'cpu', 'triton' or 'reference'")


def wkv_step(w, u, k, v, a, b, p, backend=None):
    """One decode token: k, v, a, b, p [B, C]; updates (a, b, p) in place and returns y [B, C] float32."""
    backend = backend or ("triton" if k.is_cuda else "cpu")
    if backend == "triton":
        from .wkv_triton import wkv_triton_step
        return wkv_triton_step(w, u, k, v, (a, b, p), out_state=(a, b, p))[0]
    if backend == "cpu":
        return wkv_cpu_step(w, u, k.float(), v.float(), a, b, p)
    y, (a2, b2, p2) = wkv(w, u, k[:, None], v[:, None], (a, b, p), backend=backend)
    a.copy_(a2), b.copy_(b2), p.copy_(p2)
    return y[:, 0]
