"""Every C CPU op alone, in float32, against its torch reference, for every instruction-set build this
machine runs (AVX2 everywhere; AVX-512 where the CPU has it). Skipped with the reason where the C
kernels cannot be built (no compiler, no AVX2)."""
import pytest
import torch

from rwkv_kernels import cpu_c, fused, wkv_reference
from rwkv_kernels.wkv_reference import new_wkv_state

ISAS_HERE = cpu_c.supported_isas()


@pytest.fixture(params=ISAS_HERE or [None], ids=lambda isa: isa or "no-isa")
def ops(request):
    if request.param is None:
        pytest.skip("this CPU has no AVX2/FMA/F16C: the C kernels do not run here")
    try:
        return cpu_c.ops(request.param)
    except cpu_c.BuildError as exc:
        pytest.skip(f"C kernels unavailable: {exc}")


def dot_reference(x, W):
    return (x.double() @ W.double().T)


def assert_dot_close(y, x, W):
    """fp32 dot products of length I (|x|, |W| ~ N(0, 1)): error grows like sqrt(I) ulps of the sum."""
    I = W.shape[1]
    torch.testing.assert_close(y.double(), dot_reference(x, W), rtol=1e-5, atol=2e-6 * max(I, 1))


# -- matrix-vector products ------------------------------------------------------------------------

@pytest.mark.parametrize("O", [1, 3, 4, 5, 13, 130])
@pytest.mark.parametrize("I", [1, 7, 8, 9, 15, 16, 17, 33, 250])
def test_matvec_odd_sizes(ops, O, I):
    for B in (1, 2, 3, 9):
        x, W = torch.randn(B, I), torch.randn(O, I)
        assert_dot_close(ops.matvec_group([(x, W)])[0], x, W)


# 4-70 streams cover every copy of the tiles' block-prefetch loop (block_pf_rate: 4, 2, 1, -2, -3, -4
# lines per step in one build or the other)
@pytest.mark.parametrize("B", [1, 2, 4, 5, 8, 9, 12, 17, 33, 50, 70])
def test_matvec_any_number_of_streams(ops, B):
    x, W = torch.randn(B, 96), torch.randn(37, 96)
    assert_dot_close(ops.matvec_group([(x, W)])[0], x, W)


@pytest.mark.parametrize("n", [1, 2, 3, 8, 9, 19])
def test_matvec_groups_of_any_size_and_accumulate(ops, n):
    """Groups below, at and above the kernel's per-call limit (`ops.max_group`), with rows of
    different lengths; accumulate adds into the given outputs."""
    assert ops.max_group >= 1
    B = 3
    pairs = [(torch.randn(B, 20 + 3 * j), torch.randn(5 + 7 * j, 20 + 3 * j)) for j in range(n)]
    ys = ops.matvec_group(pairs)
    for y, (x, W) in zip(ys, pairs):
        assert_dot_close(y, x, W)
    base = [torch.randn(B, W.shape[0]) for _, W in pairs]
    outs = [b.clone() for b in base]
    assert ops.matvec_group(pairs, out=outs, accumulate=True) is outs
    for o, b, (x, W) in zip(outs, base, pairs):
        torch.testing.assert_close(o.double(), b.double() + dot_reference(x, W), rtol=1e-5, atol=1e-4)


def test_matvec_empty_shapes(ops):
    assert ops.matvec_group([(torch.randn(0, 8), torch.randn(4, 8))])[0].shape == (0, 4)
    assert ops.matvec_group([(torch.randn(2, 8), torch.randn(0, 8))])[0].shape == (2, 0)
    assert torch.equal(ops.matvec_group([(torch.randn(2, 0), torch.randn(3, 0))])[0], torch.zeros(2, 3))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_matvec_is_batch_invariant(ops, threads):
    """Stream 0's outputs are bit-identical alone and inside batches of 5, 17 and 33 streams, for
    any thread count (rows are split over threads dynamically), and whatever else is in the group."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(1)
        W, W2 = torch.randn(301, 773, generator=g), torch.randn(64, 773, generator=g)
        xs = torch.randn(33, 773, generator=g)
        alone = ops.matvec_group([(xs[:1].clone(), W)])[0]
        for B in (5, 17, 33):
            batch = xs[:B].clone()
            for pos in (0, B - 1):
                perm = batch.roll(pos, dims=0).contiguous()       # stream 0 at position `pos`
                y, _ = ops.matvec_group([(perm, W), (perm, W2)])
                assert torch.equal(y[pos], alone[0]), (B, pos)
    finally:
        torch.set_num_threads(saved)


def test_isa_builds_agree(ops):
    """Each build matches the reference; the AVX2 build also runs on an AVX-512 machine."""
    x, W = torch.randn(4, 771), torch.randn(67, 771)
    assert_dot_close(ops.matvec_group([(x, W)])[0], x, W)
    assert ops.isa in ISAS_HERE


# -- element-wise ops of a decode step -------------------------------------------------------------

SIZES = [(1, 1), (1, 7), (3, 33), (2, 768)]


@pytest.mark.parametrize("B,C", SIZES)
@pytest.mark.parametrize("n_mix", [1, 2, 3])
def test_ln_shift_mix(ops, B, C, n_mix):
    x, shift = torch.randn(B, C) * 3 + 1, torch.randn(B, C)
    ln_w, ln_b = torch.randn(C), torch.randn(C)
    mixes = [torch.rand(C) for _ in range(n_mix)]
    ref_shift = shift.clone()
    want = fused.ln_shift_mix_reference(x, ln_w, ln_b, 1e-5, ref_shift, mixes)
    got = ops.ln_shift_mix(x, ln_w, ln_b, 1e-5, shift, mixes)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shift, ref_shift, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("B,C", SIZES)
def test_wkv_step_gated(ops, B, C):
    g = torch.Generator().manual_seed(B * 1000 + C)
    w = -torch.exp(torch.empty(C).uniform_(-8, 10, generator=g))
    u = torch.randn(C, generator=g)
    state = [t.clone() for t in new_wkv_state(B, C)]
    ref_state = [t.clone() for t in state]
    for step in range(4):                                          # from the empty state onwards
        r, k, v = (torch.randn(B, C, generator=g) * s for s in (2, 5, 1))
        want = fused.wkv_step_gated_reference(w, u, r, k, v, *ref_state, backend="reference")
        got = ops.wkv_step_gated(w, u, r, k, v, *state)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(state, ref_state, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [1, 7, 33, 1000])
def test_relu_square(ops, n):
    k = torch.randn(n)
    want = fused.relu_square_reference_(k.clone())
    assert ops.relu_square_(k) is k
    assert torch.equal(k, want)


@pytest.mark.parametrize("n", [1, 7, 33, 1000])
def test_add_gated(ops, n):
    x, r, v = torch.randn(n), torch.randn(n) * 4, torch.randn(n)
    want = fused.add_gated_reference_(x.clone(), r, v)
    assert ops.add_gated_(x, r, v) is x
    torch.testing.assert_close(x, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("B,T,C", [(1, 1, 1), (2, 7, 33), (3, 40, 96)])
def test_wkv_seq(ops, B, T, C):
    g = torch.Generator().manual_seed(T)
    w = -torch.exp(torch.empty(C).uniform_(-8, 10, generator=g))
    u, k, v = torch.randn(C, generator=g), torch.randn(B, T, C, generator=g) * 5, torch.randn(B, T, C, generator=g)
    _, state = wkv_reference(w, u, k[:, :3], v[:, :3])              # a non-empty initial state
    before = [t.clone() for t in state]
    y_ref, s_ref = wkv_reference(w.double(), u.double(), k.double(), v.double(), [t.double() for t in state])
    y, s = ops.wkv_seq(w, u, k, v, state)
    tol = 1e-5 + 2.4e-7 * T
    torch.testing.assert_close(y.double(), y_ref, rtol=tol, atol=tol)
    torch.testing.assert_close([t.double() for t in s], list(s_ref), rtol=tol, atol=tol * float(s_ref[1].abs().max()))
    assert all(torch.equal(a, b) for a, b in zip(state, before))   # input state untouched


# -- sampling (rwkv_kernels/sampling.py, csrc/sample.h) ----------------------------------------------------

def _clear_rows(logits, inv_temp, u, rel=1e-6):
    """Rows where u * sum(w) is not within `rel` (of the sum) of a CDF boundary, where float32
    weights (exp within 2 ulp, sums of 16 lanes) could round across it: there the C token must equal
    the reference's exactly."""
    x = logits.double()
    w = torch.exp((x - x.max(-1, keepdim=True).values) * inv_temp)
    cdf = torch.cumsum(w, -1)
    t = u.double()[:, None] * cdf[:, -1:]
    return ((cdf - t).abs() > rel * cdf[:, -1:]).all(-1)


@pytest.mark.parametrize("V", [1, 7, 16, 37, 1000, 50277])
def test_sample_rows_matches_its_reference(ops, V):
    from rwkv_kernels.sampling import sample_rows_reference
    g = torch.Generator().manual_seed(V)
    checked = 0
    for inv_temp in (1.0, 1 / 0.7, 1 / 3.0, 1e4):
        logits = torch.randn(6, V, generator=g) * 4
        u = 1.0 - torch.rand(6, generator=g, dtype=torch.float64)
        got, want = ops.sample_rows(logits, inv_temp, u), sample_rows_reference(logits, inv_temp, u)
        clear = _clear_rows(logits, inv_temp, u)
        assert got[clear].tolist() == want[clear].tolist(), inv_temp
        assert ((got - want).abs() <= 1).all()                   # next to a boundary: a neighbour at most
        # each row alone gives its token: rows do not depend on each other
        assert [int(ops.sample_rows(logits[i:i + 1].contiguous(), inv_temp, u[i:i + 1])) for i in range(6)] == got.tolist()
        checked += int(clear.sum())
    assert checked >= 12
    # a huge 1/temperature is the argmax; u = 1 (the top of the CDF) is a valid token
    logits = torch.randn(3, V, generator=g)
    assert ops.sample_rows(logits, 1e4, torch.ones(3, dtype=torch.float64)).tolist() == logits.argmax(-1).tolist()


def test_sample_rows_names_the_first_non_finite_logit(ops):
    logits = torch.randn(4, 100)
    logits[1, 40], logits[1, 70] = float("nan"), float("inf")
    logits[2, 99] = float("-inf")
    logits[3, 0] = float("inf")
    got = ops.sample_rows(logits, 1.0, torch.full((4,), 0.5, dtype=torch.float64)).tolist()
    assert got[0] >= 0 and got[1:] == [-1 - 40, -1 - 99, -1 - 0]


def test_sampler_uses_the_c_rows_and_draws_from_the_softmax():
    """rwkv_engine.sample with plain temperature goes through rwkv_kernels.sample_rows (C here) and its
    tokens follow softmax(logits / T): counts over many draws against the probabilities."""
    from rwkv_engine.sampling import SamplingParams, sample
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    p = torch.softmax(logits[0] / 0.8, -1)
    g = torch.Generator().manual_seed(1)
    n = 20000
    counts = torch.bincount(torch.cat([sample(logits, SamplingParams(temperature=0.8), generator=g)
                                       for _ in range(n)]), minlength=5).double() / n
    assert (counts - p).abs().max() < 0.015, (counts, p)


def test_routed_sends_default_calls_to_another_build_and_restores_the_default(ops):
    """cpu_c.routed (bench.modes --against-src): inside the block ops() is the given build, after it (also
    after an exception) the default again."""
    default = cpu_c.ops()
    other = cpu_c.CpuOps(ops.lib, ops.isa)                # another CpuOps object over a build of this CPU
    with pytest.raises(RuntimeError, match="inside"):
        with cpu_c.routed(other):
            assert cpu_c.ops() is other
            raise RuntimeError("inside")
    assert cpu_c.ops() is default


@pytest.mark.skipif("avx512" not in ISAS_HERE, reason="the loop settings exist in the 512-bit build only")
def test_another_sources_build_runs_with_this_builds_loop_settings(tmp_path):
    """cpu_c.other_build (bench.modes --against-src; bench.products uses the same copy): the other source's
    512-bit build gets the loop settings this code's build runs with, not the defaults written in its
    own source, so an A/B of two sources times their code, not their settings."""
    import shutil
    src = tmp_path / "csrc"
    shutil.copytree(cpu_c.CSRC, src)
    header = src / "quant_ops.h"
    text = header.read_text()
    for old, new in (("static int q8_rows_wide = 1;", "static int q8_rows_wide = 4;"),
                     ("static int64_t one_row16_below = 8192;", "static int64_t one_row16_below = 0;"),
                     ("static int64_t pf16_wide = 8192;", "static int64_t pf16_wide = 0;"),
                     ("static int64_t pf32_wide = 8192;", "static int64_t pf32_wide = 0;")):
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    header.write_text(text)
    def settings(lib):
        for name in ("get_q8_rows", "get_wide16_one_row_below", "get_wide16_pf", "get_f32_pf"):
            getattr(lib, name).restype = cpu_c.I64
        return lib.get_q8_rows(), lib.get_wide16_one_row_below(), lib.get_wide16_pf(), lib.get_f32_pf()

    raw = cpu_c.build(str(src / "cpu_ops.c"), "avx512")
    assert settings(raw) == (4, 0, 0, 0)                      # the copy's own defaults, before any copy
    lib = cpu_c.ops("avx512").lib
    before = settings(lib)
    assert before == (1, 8192, 8192, 8192)
    try:
        lib.set_q8_rows(4)
        lib.set_wide16(1 << 20, 4096)
        lib.set_f32_pf(2048)
        other = cpu_c.other_build(src / "cpu_ops.c", "avx512").lib
        assert other is not lib
        assert settings(other) == (4, 1 << 20, 4096, 2048)
    finally:
        lib.set_q8_rows(before[0])
        lib.set_wide16(*before[1:3])
        lib.set_f32_pf(before[3])
    assert settings(lib) == before


# -- the vector exp (cpu_ops.c `vexp`, and the sampler's `weight_exp` in sample.h) --------------------------

def _exp_lanes(ops, x, variant):
    x = x.contiguous()
    out = torch.empty_like(x)
    ops.lib.exp_lanes(x.data_ptr(), out.data_ptr(), x.numel(), variant)
    return out


def test_vector_exp_is_within_2_ulp_and_saturates_as_documented(ops):
    """vexp: |relative error| < 2 ulp on [-87.3, 88.7] against float64, 0 below, +inf above, NaN stays NaN."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.linspace(-87.33, 88.72, 160000), torch.empty(16000).uniform_(-87.33, 88.72, generator=g)])
    y, want = _exp_lanes(ops, x, 0).double(), torch.exp(x.double())
    ulp = torch.abs(y - want) / (torch.finfo(torch.float32).eps * want.abs())
    assert float(ulp.max()) < 2.0, float(ulp.max())
    edges = torch.tensor([-87.34, -88.0, -100.0, -200.0, -1e30, float("-inf"), 88.73, 100.0, 1e30, float("inf"),
                          float("nan"), 0.0, -0.0, 1.0, -1.0, 2.0])
    got = _exp_lanes(ops, edges, 0)
    assert (got[:6] == 0).all() and torch.isinf(got[6:10]).all() and (got[6:10] > 0).all()
    assert torch.isnan(got[10]) and got[11] == 1 and got[12] == 1


def test_the_samplers_exp_gives_vexps_bits_where_it_is_used(ops):
    """weight_exp (the sampler's, for (x - max) / temperature: <= 0 or -inf, never NaN) gives exactly vexp's
    value for every such lane: the tokens do not depend on which of the two computes the weights."""
    g = torch.Generator().manual_seed(1)
    x = torch.cat([-torch.linspace(0, 200, 400000), -torch.empty(40000).exponential_(0.05, generator=g),
                   torch.tensor([0.0, -0.0, float("-inf"), -87.33654, -87.3365, -87.3366, -1e38, -3e38] * 2)])
    x = x[: x.numel() // 16 * 16]
    assert torch.equal(_exp_lanes(ops, x, 1).view(torch.int32), _exp_lanes(ops, x, 0).view(torch.int32))
