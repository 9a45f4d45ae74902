"""Triton WKV kernel against the float64 reference: output and final state, chunking, steps, errors.

Runs in Triton's CPU interpreter here (TRITON_INTERPRET=1, set below and in conftest.py before
triton is imported) and on the GPU when run with TRITON_INTERPRET=0 (bench/gpu_check.py does that).
The interpreter costs ~2 ms per time step per program, so the long cases are marked slow; every
property they check is also checked by a fast case.
"""
import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")     # before triton is imported (see conftest.py)

import pytest
import torch

pytest.importorskip("triton")

from rwkv_kernels.wkv_reference import P_INIT, wkv_reference
from rwkv_kernels.wkv_triton import is_interpreted, launch_config, wkv_triton, wkv_triton_step

if not is_interpreted() and not torch.cuda.is_available():
    raise RuntimeError("rwkv_kernels.wkv_triton is compiled for the GPU (TRITON_INTERPRET was not 1 when it was "
                       "imported) and there is no GPU: run pytest from the repo root so tests/conftest.py sets it")
DEVICE = "cpu" if is_interpreted() else "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------

def make_inputs(B, T, C, dtype=torch.float32, k_scale=3.0, k_max=40.0, seed=0):
    """w, u fp32 [C]; k, v [B, T, C] in `dtype` on DEVICE.

    time_decay is spread over [-8, 10] across channels, i.e. w from -exp(-8) (the past barely
    decays) to -exp(10) (it vanishes in one step), in a shuffled order so that every block of
    channels sees both ends. k ~ N(0, k_scale^2) clipped to +-k_max.
    """
    g = torch.Generator().manual_seed(seed)
    time_decay = torch.linspace(-8, 10, C)[torch.randperm(C, generator=g)]
    w = -torch.exp(time_decay)
    u = torch.randn(C, generator=g)
    k = (torch.randn(B, T, C, generator=g) * k_scale).clamp(-k_max, k_max).to(dtype)
    v = torch.randn(B, T, C, generator=g).to(dtype)
    return w.to(DEVICE), u.to(DEVICE), k.to(DEVICE), v.to(DEVICE)


def random_state(B, C, seed=1):
    """A valid mid-sequence state: p the running max, b > 0, a / b a weighted mean of v."""
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(B, C, generator=g) * 5
    b = torch.rand(B, C, generator=g) * 3 + 0.1
    a = b * torch.randn(B, C, generator=g)
    return tuple(x.to(DEVICE) for x in (a, b, p))


def reference(w, u, k, v, state=None):
    """wkv_reference in float64 on CPU, on exactly the (already rounded) inputs the kernel sees."""
    cast = lambda x: x.detach().cpu().double()
    return wkv_reference(cast(w), cast(u), cast(k), cast(v), None if state is None else tuple(map(cast, state)))


def assert_matches_reference(y, state, y_ref, state_ref, T):
    """Output and final state agree with the float64 reference up to fp32 compute error.

    The inputs were rounded to their dtype before both runs, so the tolerance does not depend on
    the input dtype: it is fp32 error only. That error grows with the size of the exponents (|p|:
    an fp32 rounding of p + w changes the effective decay by ~|p| * 6e-8 per step) and with the
    number of steps T. The bound 2e-6 * (1 + |p|max) * (1 + sqrt T) has ~10x headroom over the
    errors of this kernel and of wkv_cpu (e.g. 2e-4 on y at T=1000, |p|=40).
    """
    assert y.dtype == torch.float32 and all(x.dtype == torch.float32 for x in state)
    a, b, p = (x.cpu().double() for x in state)
    a_ref, b_ref, p_ref = state_ref
    tol = 2e-6 * (1 + p_ref.abs().max().item()) * (1 + math.sqrt(T))
    torch.testing.assert_close(y.cpu().double(), y_ref, rtol=0, atol=tol)
    # The state is compared through what it means: p the running max (absolute), A/B = a/b a
    # weighted mean of v like y (absolute), B = b e^p > 0 (relative, taken to the reference's p).
    torch.testing.assert_close(p, p_ref, rtol=0, atol=3 * tol)
    torch.testing.assert_close(a / b, a_ref / b_ref, rtol=0, atol=tol)
    torch.testing.assert_close(b * torch.exp(p - p_ref), b_ref, rtol=3 * tol, atol=0)


def assert_same(x, y):
    """Bitwise equal (the same arithmetic on the same values)."""
    assert x.shape == y.shape and torch.equal(x, y), f"max diff {(x - y).abs().max().item()}"


# ----------------------------------------------------------------------------------------------
# Against the reference
# ----------------------------------------------------------------------------------------------

def _grid():
    for dtype in DTYPES:
        for B in (1, 3):
            for T in (1, 7, 64, 1000):
                for C in (32, 96, 768):
                    # Long sequences cost ~2 s per program in the interpreter: keep T=1000 fast for
                    # B=1, C=96 (every dtype) and B=3, C=32 (fp32), the rest slow.
                    fast = T < 1000 or (B, C) == (1, 96) or (B, C, dtype) == (3, 32, torch.float32)
                    marks = () if fast else (pytest.mark.slow,)
                    yield pytest.param(B, T, C, dtype, marks=marks, id=f"B{B}-T{T}-C{C}-{str(dtype)[6:]}")


@pytest.mark.parametrize("B, T, C, dtype", list(_grid()))
def test_matches_reference(B, T, C, dtype):
    w, u, k, v = make_inputs(B, T, C, dtype)
    y, state = wkv_triton(w, u, k, v)
    assert y.shape == (B, T, C) and all(x.shape == (B, C) for x in state)
    assert_matches_reference(y, state, *reference(w, u, k, v), T)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 48, pytest.param(1000, marks=pytest.mark.slow)])
def test_extreme_values(T, dtype):
    """|k| up to 40 (e^k far beyond fp32 without the running max), decays from -e^-8 to -e^10,
    a large bonus u, and a starting state with a large p."""
    B, C = 2, 96
    w, u, k, v = make_inputs(B, T, C, dtype, k_scale=25.0, k_max=40.0, seed=3)
    u = u * 10
    v = (v.float() * 10).to(dtype)
    state = random_state(B, C)
    state[2].mul_(6)                                             # p up to ~+-100
    y, new_state = wkv_triton(w, u, k, v, state)
    assert torch.isfinite(y).all() and all(torch.isfinite(x).all() for x in new_state)
    assert_matches_reference(y, new_state, *reference(w, u, k, v, state), T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_initial_state(dtype):
    B, T, C = 2, 16, 96
    w, u, k, v = make_inputs(B, T, C, dtype)
    state = random_state(B, C)
    before = tuple(x.clone() for x in state)
    y, new_state = wkv_triton(w, u, k, v, state)
    assert_matches_reference(y, new_state, *reference(w, u, k, v, state), T)
    for x, x0 in zip(state, before):
        assert_same(x, x0)                                       # the input state is not modified


@pytest.mark.parametrize("C, block_c", [(96, 32), (100, 32), (5, 16), (768, 128)])
def test_several_channel_blocks(C, block_c):
    """A grid with several programs along C, the last one partly masked when C % block_c != 0."""
    B, T = 2, 20
    w, u, k, v = make_inputs(B, T, C)
    y, state = wkv_triton(w, u, k, v, block_c=block_c)
    assert_matches_reference(y, state, *reference(w, u, k, v), T)


# ----------------------------------------------------------------------------------------------
# Chunking and single steps: the state carries everything
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T, cuts", [(50, (13, 40)), pytest.param(600, (1, 299, 500), marks=pytest.mark.slow)])
def test_chunked_equals_whole(T, cuts, dtype):
    """Feeding the sequence in chunks with the state carried gives exactly the one-call result."""
    B, C = 3, 96
    w, u, k, v = make_inputs(B, T, C, dtype)
    y_whole, state_whole = wkv_triton(w, u, k, v)
    ys, state = [], None
    for lo, hi in zip((0,) + cuts, cuts + (T,)):
        y, state = wkv_triton(w, u, k[:, lo:hi], v[:, lo:hi], state)
        ys.append(y)
    assert_same(torch.cat(ys, dim=1), y_whole)
    for x, x_whole in zip(state, state_whole):
        assert_same(x, x_whole)


def test_token_steps_equal_sequence():
    """T=1 calls of wkv_triton and wkv_triton_step (also updating the state in place) reproduce
    the sequence call exactly."""
    B, T, C = 2, 6, 96
    w, u, k, v = make_inputs(B, T, C)
    y_whole, state_whole = wkv_triton(w, u, k, v)
    s_seq = s_step = None
    s_inplace = tuple(x.clone() for x in random_state(B, C))
    ptrs = [x.data_ptr() for x in s_inplace]
    s_inplace[0].zero_(); s_inplace[1].zero_(); s_inplace[2].fill_(P_INIT)    # a fresh state
    for t in range(T):
        y_seq, s_seq = wkv_triton(w, u, k[:, t:t + 1], v[:, t:t + 1], s_seq)
        y_step, s_step = wkv_triton_step(w, u, k[:, t], v[:, t], s_step)
        y_inplace, out = wkv_triton_step(w, u, k[:, t], v[:, t], s_inplace, out_state=s_inplace)
        assert all(x is x_in for x, x_in in zip(out, s_inplace))
        assert y_seq.shape == (B, 1, C) and y_step.shape == (B, C)
        assert_same(y_seq[:, 0], y_whole[:, t])
        assert_same(y_step, y_whole[:, t])
        assert_same(y_inplace, y_whole[:, t])
    for s in (s_seq, s_step, s_inplace):
        for x, x_whole in zip(s, state_whole):
            assert_same(x, x_whole)
    assert [x.data_ptr() for x in s_inplace] == ptrs


# ----------------------------------------------------------------------------------------------
# Layouts, edge cases, bad inputs
# ----------------------------------------------------------------------------------------------

def test_non_contiguous_inputs():
    """Slices (strided in T, offset in C), a [B, C, T] tensor transposed to [B, T, C], a strided
    w and a non-contiguous state are read in place and give the contiguous result."""
    B, T, C = 2, 12, 40
    w, u, k, v = make_inputs(B, T, C)
    state = random_state(B, C)
    y, new_state = wkv_triton(w, u, k, v, state)

    k_big = torch.zeros(B, 2 * T, C + 5, device=DEVICE)
    k_big[:, ::2, 3:3 + C] = k
    v_tc = v.transpose(1, 2).contiguous().transpose(1, 2)       # stride 1 along T, not C
    w_big = torch.zeros(2 * C, device=DEVICE)
    w_big[::2] = w
    state_t = tuple(x.t().contiguous().t() for x in state)      # column-major [B, C]
    k_slice = k_big[:, ::2, 3:3 + C]
    assert not k_slice.is_contiguous() and not v_tc.is_contiguous() and not state_t[0].is_contiguous()
    y2, new_state2 = wkv_triton(w_big[::2], u, k_slice, v_tc, state_t)
    assert_same(y2, y)
    for x, x2 in zip(new_state, new_state2):
        assert_same(x2, x)


def test_empty_sequence_passes_state_through():
    w, u, k, v = make_inputs(2, 0, 32)
    state = random_state(2, 32)
    y, new_state = wkv_triton(w, u, k, v, state)
    assert y.shape == (2, 0, 32)
    for x, x0 in zip(new_state, state):
        assert_same(x, x0)
    _, fresh = wkv_triton(w, u, k, v)
    assert (fresh[0] == 0).all() and (fresh[1] == 0).all() and (fresh[2] == P_INIT).all()


def _bad_inputs():
    """(name of the argument the message must name, function that calls with a bad one)."""
    B, T, C = 2, 3, 32
    w, u, k, v = make_inputs(B, T, C)
    s = random_state(B, C)
    return [
        ("v", lambda: wkv_triton(w, u, k, v[:, :2])),
        ("k", lambda: wkv_triton(w, u, k[0], v[0])),
        ("w", lambda: wkv_triton(w[:-1], u, k, v)),
        ("u", lambda: wkv_triton(w, u[None], k, v)),
        ("k", lambda: wkv_triton(w, u, k.to(torch.int32), v)),
        ("v", lambda: wkv_triton(w, u, k, v.double())),
        ("w", lambda: wkv_triton(w.long(), u, k, v)),
        ("w", lambda: wkv_triton(w.to("meta"), u, k, v)),
        ("state.b", lambda: wkv_triton(w, u, k, v, (s[0], s[1][:1], s[2]))),
        ("state.p", lambda: wkv_triton(w, u, k, v, (s[0], s[1], s[2].long()))),
        ("state", lambda: wkv_triton(w, u, k, v, s[:2])),
        ("k", lambda: wkv_triton_step(w, u, k, v[:, 0])),
        ("out_state.a", lambda: wkv_triton_step(w, u, k[:, 0], v[:, 0], s, out_state=(s[0].half(), s[1], s[2]))),
        ("block_c", lambda: wkv_triton(w, u, k, v, block_c=48)),
    ]


@pytest.mark.parametrize("case", range(len(_bad_inputs())))
def test_bad_inputs_raise_value_error(case):
    name, call = _bad_inputs()[case]
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        call()


@pytest.mark.skipif(is_interpreted(), reason="the compiled kernel only: the interpreter runs on CPU tensors")
def test_cpu_tensors_rejected_by_compiled_kernel():
    w, u, k, v = (x.cpu() for x in make_inputs(1, 2, 32))
    with pytest.raises(ValueError, match="CPU tensor"):
        wkv_triton(w, u, k, v)


def test_public_launch_config():
    """`launch_config` is the public default launch (bench/gpu_check.py reads it): a power-of-two
    block covering C within the limits, and the warps the GPU path uses for it."""
    assert launch_config(768, interpreted=False) == (128, 4)
    assert launch_config(20, interpreted=False) == (32, 1)
    assert launch_config(5, interpreted=False) == (16, 1)
    assert launch_config(96, interpreted=True) == (128, 1)
    assert launch_config(5000, interpreted=True) == (1024, 1)
    assert launch_config(96) == launch_config(96, interpreted=is_interpreted())
