"""The CPU WKV kernel against the float64 plain-loop reference."""
import pytest
import torch

import rwkv_kernels
from rwkv_kernels import wkv_cpu, wkv_cpu_step, wkv_numpy, wkv_reference
from rwkv_kernels.wkv_cpu import wkv_cpu_c


def make_inputs(B, T, C, seed=0, k_scale=5.0):
    g = torch.Generator().manual_seed(seed)
    time_decay = torch.empty(C).uniform_(-8, 10, generator=g)           # trained-model extremes
    w = -torch.exp(time_decay)
    u = torch.randn(C, generator=g) * 2
    k = torch.randn(B, T, C, generator=g) * k_scale
    v = torch.randn(B, T, C, generator=g)
    return w, u, k, v


def assert_state_close(s, ref, rtol):
    a, b, p = s
    ra, rb, rp = ref
    torch.testing.assert_close(p.double(), rp, rtol=rtol, atol=1e-5)
    # a and b are scaled by e^{-p}; compare them as they are, relative to b's scale (b >= e^0 once a token is seen)
    torch.testing.assert_close(a.double(), ra, rtol=rtol, atol=rtol * float(rb.abs().max()))
    torch.testing.assert_close(b.double(), rb, rtol=rtol, atol=rtol * float(rb.abs().max()))


# "c" names the C loop itself (never the numpy fallback): without the build it fails, it does not
# quietly test numpy twice
@pytest.mark.parametrize("impl", [wkv_cpu_c, lambda w, u, k, v: wkv_numpy(w, u, k, v, None)], ids=["c", "numpy"])
@pytest.mark.parametrize("B,T,C", [(1, 1, 1), (1, 1, 768), (2, 7, 33), (3, 64, 96), (1, 1000, 64), (2, 4096, 16)])
def test_wkv_cpu_matches_float64_reference(B, T, C, impl):
    w, u, k, v = make_inputs(B, T, C)
    y_ref, s_ref = wkv_reference(w.double(), u.double(), k.double(), v.double())
    y, s = impl(w, u, k, v)
    assert y.dtype == torch.float32 and y.shape == (B, T, C)
    # a and b are float32 running sums of up to T terms: worst-case rounding grows linearly in T
    # (a few float32 ulps per step; |v| ~ 1). The official implementations share this bound.
    tol = 1e-5 + 2.4e-7 * T
    torch.testing.assert_close(y.double(), y_ref, rtol=tol, atol=tol)
    assert_state_close(s, s_ref, rtol=tol)


def test_wkv_chunked_equals_whole():
    w, u, k, v = make_inputs(2, 150, 40)
    y, s = wkv_cpu(w, u, k, v)
    state, ys = None, []
    for lo, hi in [(0, 1), (1, 64), (64, 65), (65, 150)]:
        yc, state = wkv_cpu(w, u, k[:, lo:hi], v[:, lo:hi], state)
        ys.append(yc)
    assert torch.equal(torch.cat(ys, dim=1), y)
    for got, want in zip(state, s):
        assert torch.equal(got, want)


def test_wkv_step_equals_sequence():
    w, u, k, v = make_inputs(3, 20, 24)
    y, (a, b, p) = wkv_cpu(w, u, k, v)
    sa, sb, sp = rwkv_kernels.new_wkv_state(3, 24)
    for t in range(20):
        yt = wkv_cpu_step(w, u, k[:, t].contiguous(), v[:, t].contiguous(), sa, sb, sp)
        torch.testing.assert_close(yt, y[:, t], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close((sa, sb, sp), (a, b, p), rtol=1e-6, atol=1e-6)


def test_wkv_input_state_is_not_modified():
    w, u, k, v = make_inputs(1, 5, 8)
    _, s = wkv_cpu(w, u, k, v)
    before = [t.clone() for t in s]
    wkv_cpu(w, u, k, v, s)
    assert all(torch.equal(x, y) for x, y in zip(before, s))


def test_wkv_100k_tokens_extreme_values_stay_finite_and_bounded():
    # y_t is a weighted average of v_0..v_t, so it must stay inside [min v, max v]; any overflow
    # of the unscaled sums would show up as Inf/NaN or a value outside that range.
    B, T, C = 1, 100_000, 8
    w, u, k, v = make_inputs(B, T, C, seed=3, k_scale=15.0)
    w[:4] = -torch.exp(torch.tensor([-8.0, -20.0, 10.0, 12.0]))       # decay ~0 and huge
    k[:, ::1000] = 80.0                                                  # e^80 overflows fp32
    y, (a, b, p) = wkv_cpu(w, u, k, v)
    assert torch.isfinite(y).all() and torch.isfinite(a).all() and torch.isfinite(b).all()
    assert (y >= v.amin(dim=1, keepdim=True) - 1e-4).all() and (y <= v.amax(dim=1, keepdim=True) + 1e-4).all()
    # the last stretch, continued from the carried state, matches the float64 reference
    tail = 2000
    _, s_mid = wkv_cpu(w, u, k[:, :-tail], v[:, :-tail])
    y_ref, _ = wkv_reference(w.double(), u.double(), k[:, -tail:].double(), v[:, -tail:].double(),
                             tuple(t.double() for t in s_mid))
    torch.testing.assert_close(y[:, -tail:].double(), y_ref, rtol=1e-3, atol=1e-3)


def test_dispatch_rule_picks_cpu_and_rejects_unknown_backend():
    w, u, k, v = make_inputs(1, 3, 4)
    y, _ = rwkv_kernels.wkv(w, u, k, v)
    assert torch.equal(y, wkv_cpu(w, u, k, v)[0])
    with pytest.raises(ValueError, match="unknown WKV backend 'gpu'"):
        rwkv_kernels.wkv(w, u, k, v, backend="gpu")


def test_linear_cpu_matches_torch():
    x = torch.randn(5, 7, 33)
    W = torch.randn(19, 33)
    torch.testing.assert_close(rwkv_kernels.linear(x, W), rwkv_kernels.linear_reference(x, W), rtol=1e-5, atol=1e-5)
    x1 = torch.randn(1, 1, 33)
    torch.testing.assert_close(rwkv_kernels.linear(x1, W), rwkv_kernels.linear_reference(x1, W), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("B,O,I", [(1, 768, 768), (1, 13, 37), (3, 7, 8), (8, 129, 250), (2, 4, 3)])
def test_decode_matvec_kernel_matches_reference(B, O, I):
    from rwkv_kernels import cpu_c
    if not cpu_c.available():
        pytest.skip(f"C kernels unavailable: {cpu_c.unavailable_reason()}")
    x, W = torch.randn(B, I), torch.randn(O, I)
    W2, x2 = torch.randn(O + 5, I), torch.randn(B, I)
    y, y2 = cpu_c.ops().matvec_group([(x, W), (x2, W2)])
    torch.testing.assert_close(y, x @ W.T, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(y2, x2 @ W2.T, rtol=1e-5, atol=1e-4)
    a, b = rwkv_kernels.linear_group((x, W), (x2, W2))
    assert torch.equal(a, y) and torch.equal(b, y2)
