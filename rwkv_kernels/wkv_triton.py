"""Triton WKV: one program per (batch row, block of channels), a loop over time inside.

Same signature and numerics as `wkv_reference` (running-max form, see that module); k and v may
be fp32, fp16 or bf16 and are widened to fp32 on load, everything else is fp32. Each channel's
recurrence is sequential in t but independent across (b, c), so the grid is (B, cdiv(C, BLOCK_C))
and each program walks t = 0..T-1 keeping its (a, b, p) in registers: one read of k and v, one
write of y, and the state touched only at the start and the end. T is a runtime argument, so one
compiled kernel serves every sequence length, prompt and single-token decode alike.

Layout as in the Triton tutorials: the kernel, then the launcher (checks, allocation, grid,
launch), then the public functions.

Triton is imported defensively: on a machine without it (or without a GPU backend) this module
still imports and the functions raise a clear error when called. With TRITON_INTERPRET=1 set
before this module is imported, the kernel runs in Triton's CPU interpreter on CPU tensors (that is
how the tests run without a GPU).
"""
import torch

from .wkv_reference import P_INIT, new_wkv_state

try:
    import triton
    import triton.language as tl
    _TRITON_IMPORT_ERROR = None
except Exception as exc:  # missing or broken install: fail when called, not when imported
    triton = tl = None
    _TRITON_IMPORT_ERROR = exc


# ----------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------

if triton is not None:
    _P_INIT = tl.constexpr(P_INIT)

    @triton.jit(do_not_specialize=["T"])
    def _wkv_fwd_kernel(
        w_ptr, u_ptr,                                  # [C] fp32: log decay (-exp(time_decay)), bonus
        k_ptr, stride_k_b, stride_k_t, stride_k_c,     # [B, T, C] fp32 / fp16 / bf16
        v_ptr, stride_v_b, stride_v_t, stride_v_c,     # [B, T, C] fp32 / fp16 / bf16
        y_ptr, stride_y_b, stride_y_t,                 # [B, T, C] fp32 out, unit stride in C
        a0_ptr, b0_ptr, p0_ptr,                        # [B, C] fp32 initial state, contiguous
        a_ptr, b_ptr, p_ptr,                           # [B, C] fp32 final state, contiguous
        T, C,
        HAS_INITIAL_STATE: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        pid_b = tl.program_id(0).to(tl.int64)          # int64: pid_b * stride_b can pass 2^31
        pid_c = tl.program_id(1)
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        offs_s = pid_b * C + offs_c                    # into the [B, C] state tensors

        w = tl.load(w_ptr + offs_c, mask=mask_c, other=0.0)
        u = tl.load(u_ptr + offs_c, mask=mask_c, other=0.0)
        if HAS_INITIAL_STATE:
            a = tl.load(a0_ptr + offs_s, mask=mask_c, other=0.0)
            b = tl.load(b0_ptr + offs_s, mask=mask_c, other=0.0)
            p = tl.load(p0_ptr + offs_s, mask=mask_c, other=0.0)
        else:
            a = tl.zeros([BLOCK_C], dtype=tl.float32)
            b = tl.zeros([BLOCK_C], dtype=tl.float32)
            p = tl.full([BLOCK_C], _P_INIT, dtype=tl.float32)   # "-inf" that keeps p - p == 0

        k_ptrs = k_ptr + pid_b * stride_k_b + offs_c * stride_k_c
        v_ptrs = v_ptr + pid_b * stride_v_b + offs_c * stride_v_c
        y_ptrs = y_ptr + pid_b * stride_y_b + offs_c
        # Loads run one step ahead: step t+1's k, v are requested before step t's math, so their
        # memory latency overlaps the exp()s instead of stalling every iteration. On the last step
        # the look-ahead load is masked off (channel limit 0). The launcher ensures T >= 1.
        kt = tl.load(k_ptrs, mask=mask_c, other=0.0).to(tl.float32)
        vt = tl.load(v_ptrs, mask=mask_c, other=0.0).to(tl.float32)
        for t in range(T):
            k_ptrs += stride_k_t
            v_ptrs += stride_v_t
            mask_next = offs_c < tl.where(t + 1 < T, C, 0)
            k_next = tl.load(k_ptrs, mask=mask_next, other=0.0).to(tl.float32)
            v_next = tl.load(v_ptrs, mask=mask_next, other=0.0).to(tl.float32)

            # y_t = (e^p a + e^{u+k} v) / (e^p b + e^{u+k}); numerator and denominator are both
            # scaled by e^{-q}, q = max(p, u + k), so every exp() argument is <= 0.
            uk = u + kt
            q = tl.maximum(p, uk)
            e1 = tl.exp(p - q)
            e2 = tl.exp(uk - q)
            tl.store(y_ptrs, (e1 * a + e2 * vt) / (e1 * b + e2), mask=mask_c)

            # State: decay the past by e^w and add e^k, rescaled to the new running max q.
            wp = p + w
            q = tl.maximum(wp, kt)
            e1 = tl.exp(wp - q)
            e2 = tl.exp(kt - q)
            a = e1 * a + e2 * vt
            b = e1 * b + e2
            p = q

            y_ptrs += stride_y_t
            kt = k_next
            vt = v_next

        tl.store(a_ptr + offs_s, a, mask=mask_c)
        tl.store(b_ptr + offs_s, b, mask=mask_c)
        tl.store(p_ptr + offs_s, p, mask=mask_c)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------

_KV_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def is_interpreted():
    """True when the kernel was built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    if triton is None:
        return False
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return isinstance(_wkv_fwd_kernel, InterpretedFunction)


def _check_inputs(w, u, k, v, state):
    """Raise ValueError naming the first bad argument; return (B, T, C)."""
    for name, x in (("w", w), ("u", u), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"wkv_triton: {name} must be a torch.Tensor, got {type(x).__name__}")
    if k.dim() != 3:
        raise ValueError(f"wkv_triton: k must be [B, T, C], got shape {tuple(k.shape)}")
    B, T, C = k.shape
    if v.shape != k.shape:
        raise ValueError(f"wkv_triton: v has shape {tuple(v.shape)}, expected k's {tuple(k.shape)}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype not in _KV_DTYPES:
            raise ValueError(f"wkv_triton: {name} has dtype {x.dtype}, expected float32/float16/bfloat16")
    for name, x in (("w", w), ("u", u)):
        if x.shape != (C,):
            raise ValueError(f"wkv_triton: {name} has shape {tuple(x.shape)}, expected [C] = ({C},)")
        if not x.is_floating_point():
            raise ValueError(f"wkv_triton: {name} has dtype {x.dtype}, expected a floating dtype")
    tensors = [("w", w), ("u", u), ("v", v)]
    if state is not None:
        if not isinstance(state, (tuple, list)) or len(state) != 3:
            raise ValueError("wkv_triton: state must be a tuple (a, b, p) or None")
        for name, x in zip(("state.a", "state.b", "state.p"), state):
            if not isinstance(x, torch.Tensor) or x.shape != (B, C):
                shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"wkv_triton: {name} has shape {shape}, expected [B, C] = ({B}, {C})")
            if not x.is_floating_point():
                raise ValueError(f"wkv_triton: {name} has dtype {x.dtype}, expected a floating dtype")
            tensors.append((name, x))
    for name, x in tensors:
        if x.device != k.device:
            raise ValueError(f"wkv_triton: {name} is on {x.device}, but k is on {k.device}")
    return B, T, C


def launch_config(C, interpreted=None):
    """The default launch configuration for C channels: (BLOCK_C, num_warps). On a GPU one channel
    per thread, up to 4 warps per program; in the interpreter (`interpreted`, default: how this
    module was built) every program pays Python overhead per op and step, so few, wide programs."""
    if triton is None:
        raise RuntimeError(f"wkv_triton needs the triton package, which failed to import: {_TRITON_IMPORT_ERROR}")
    if is_interpreted() if interpreted is None else interpreted:
        return min(1024, triton.next_power_of_2(C)), 1
    block_c = max(16, min(128, triton.next_power_of_2(C)))
    return block_c, max(1, block_c // 32)


def _check_out_state(out_state, B, C, device):
    if not isinstance(out_state, (tuple, list)) or len(out_state) != 3:
        raise ValueError("wkv_triton: out_state must be a tuple (a, b, p) or None")
    for name, x in zip(("out_state.a", "out_state.b", "out_state.p"), out_state):
        if not isinstance(x, torch.Tensor) or x.shape != (B, C) or x.dtype != torch.float32 \
                or not x.is_contiguous() or x.device != device:
            raise ValueError(f"wkv_triton: {name} must be a contiguous float32 [B, C] = ({B}, {C}) "
                             f"tensor on {device}")


def _wkv_forward(w, u, k, v, state=None, out_state=None, block_c=None, num_warps=None):
    """Check, allocate, launch. out_state: where to write the new state (may be `state` itself);
    block_c / num_warps override the default launch config (benchmarks, tests)."""
    if triton is None:
        raise RuntimeError(f"wkv_triton needs the triton package, which failed to import: {_TRITON_IMPORT_ERROR}")
    B, T, C = _check_inputs(w, u, k, v, state)
    interpreted = is_interpreted()
    if not interpreted and k.device.type == "cpu":
        raise ValueError("wkv_triton: k is a CPU tensor; the compiled Triton kernel needs GPU tensors "
                         "(set TRITON_INTERPRET=1 before importing rwkv_kernels.wkv_triton to run on CPU)")
    if block_c is not None and (block_c < 1 or block_c & (block_c - 1)):
        raise ValueError(f"wkv_triton: block_c must be a power of two, got {block_c}")

    f32 = torch.float32
    w, u = (x.detach().to(f32).contiguous() for x in (w, u))
    k, v = k.detach(), v.detach()                  # any strides: passed to the kernel as they are
    y = torch.empty(B, T, C, device=k.device, dtype=f32)
    if out_state is None:
        a, b, p = (torch.empty(B, C, device=k.device, dtype=f32) for _ in range(3))
    else:
        _check_out_state(out_state, B, C, k.device)
        a, b, p = out_state     # in place is safe: each element is read once, then written at the end
    if state is None:
        a0 = b0 = p0 = a                           # unread: HAS_INITIAL_STATE=False
    else:
        a0, b0, p0 = (x.detach().to(f32).contiguous() for x in state)
    if B == 0 or C == 0 or T == 0:              # nothing to launch: the state passes through
        for dst, src in zip((a, b, p), new_wkv_state(B, C, k.device) if state is None else (a0, b0, p0)):
            dst.copy_(src)
        return y, (a, b, p)

    default_block_c, default_warps = launch_config(C, interpreted)
    BLOCK_C = block_c or default_block_c
    grid = (B, triton.cdiv(C, BLOCK_C))
    _wkv_fwd_kernel[grid](
        w, u,
        k, k.stride(0), k.stride(1), k.stride(2),
        v, v.stride(0), v.stride(1), v.stride(2),
        y, y.stride(0), y.stride(1),
        a0, b0, p0,
        a, b, p,
        T, C,
        HAS_INITIAL_STATE=state is not None,
        BLOCK_C=BLOCK_C,
        num_warps=num_warps or default_warps,
    )
    return y, (a, b, p)


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------

def wkv_triton(w, u, k, v, state=None, block_c=None, num_warps=None):
    """WKV over a sequence with the Triton kernel.

    w, u: [C] (w is the per-step log decay, already -exp(time_decay)); any float dtype, used as fp32.
    k, v: [B, T, C] float32, float16 or bfloat16, any strides (slices are read in place).
    state: (a, b, p), each [B, C], or None for a fresh state.
    block_c (a power of two), num_warps: override `launch_config(C)` (benchmarks, tests).
    Returns y [B, T, C] float32 and a new state (a, b, p), each [B, C] float32; the input state is
    not modified. All tensors on one GPU (or on CPU under TRITON_INTERPRET=1).
    """
    return _wkv_forward(w, u, k, v, state, block_c=block_c, num_warps=num_warps)


def wkv_triton_step(w, u, k, v, state=None, out_state=None):
    """One token of WKV: the sequence kernel with T = 1 (no separate kernel to keep in sync).

    w, u: [C]. k, v: [B, C]. state: (a, b, p), each [B, C], or None.
    out_state: optional (a, b, p) contiguous float32 [B, C] tensors to write the new state into;
    passing `state` itself updates it in place (what a decode loop wants: no allocation).
    Returns y [B, C] float32 and the new state, as `wkv_triton` on k[:, None], v[:, None].
    """
    for name, x in (("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"wkv_triton_step: {name} must be [B, C], got {shape}")
    y, state = _wkv_forward(w, u, k.unsqueeze(1), v.unsqueeze(1), state, out_state=out_state)
    return y.squeeze(1), state
