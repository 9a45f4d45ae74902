"""The WKV entry points, sequence (`wkv`) and single token (`wkv_step`), dispatched by
`rwkv_kernels.dispatch` to the implementations beside their reference: `wkv_cpu` (C, numpy),
`wkv_triton` (CUDA, or Triton's interpreter on CPU), `wkv_reference` (the definition)."""
from . import dispatch
from .wkv_cpu import wkv_cpu_c, wkv_cpu_step, wkv_numpy
from .wkv_reference import wkv_reference


def _wkv_triton(w, u, k, v, state):
    from .wkv_triton import wkv_triton          # imports triton: only when a Triton path runs
    return wkv_triton(w, u, k, v, state)


def _wkv_step_triton(w, u, k, v, a, b, p):
    from .wkv_triton import wkv_triton_step
    return wkv_triton_step(w, u, k, v, (a, b, p), out_state=(a, b, p))[0]


def _wkv_step_numpy(w, u, k, v, a, b, p):
    return wkv_cpu_step(w, u, k.float(), v.float(), a, b, p)


def _wkv_step_via_sequence(backend):
    def step(w, u, k, v, a, b, p):
        y, (a2, b2, p2) = wkv(w, u, k[:, None], v[:, None], (a, b, p), backend=backend)
        a.copy_(a2), b.copy_(b2), p.copy_(p2)
        return y[:, 0]
    return step


dispatch.register_impl("wkv", "c", wkv_cpu_c, needs_c=True)
dispatch.register_impl("wkv", "numpy", wkv_numpy)
dispatch.register_impl("wkv", "triton", _wkv_triton)
dispatch.register_impl("wkv", "reference", wkv_reference)
dispatch.register_impl("wkv_step", "numpy", _wkv_step_numpy)
dispatch.register_impl("wkv_step", "triton", _wkv_step_triton)
dispatch.register_impl("wkv_step", "reference", _wkv_step_via_sequence("reference"))
dispatch.register_impl("wkv_step", "c", _wkv_step_via_sequence("c"), needs_c=True)


def wkv(w, u, k, v, state=None, backend=None):
    """WKV over [B, T, C]; see `wkv_reference` for shapes and numerics. Returns y float32, state.
    backend: "c" (or "cpu"), "numpy", "triton", "reference"; None: the dispatch table."""
    tensors = (w, u, k, v, *(state or ()))
    key = (dispatch.device_of(*tensors), dispatch.dtype_name(k.dtype), "-", "*")
    return dispatch.pick("wkv", key, backend)[1](w, u, k, v, state)


def wkv_step(w, u, k, v, a, b, p, backend=None):
    """One decode token: k, v, a, b, p [B, C]; updates (a, b, p) in place and returns y [B, C] float32."""
    key = (dispatch.device_of(w, u, k, v, a, b, p), dispatch.dtype_name(k.dtype), "-", "*")
    return dispatch.pick("wkv_step", key, backend)[1](w, u, k, v, a, b, p)
