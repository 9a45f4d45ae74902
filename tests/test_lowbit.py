"""rwkv_kernels.lowbit: the 5- and 4-bit block formats and the outlier treatment (per-column scales, "+cols"),
records of rwkv_kernels.formats: their C kernels against the float64 reference on every build this CPU runs
at odd shapes, batch invariance, the simulated AVX2-only CPU, quantise-at-load against converted files,
bounded load memory and bad files."""
import json
import os
import subprocess
import sys

import pytest
import torch

import rwkv_engine
import rwkv_kernels
from rwkv_kernels import cpu_c, formats, lowbit, quant
from rwkv_engine import CheckpointError
from rwkv_engine.checkpoint import synthetic_state_dict
from rwkv_engine.convert import main as convert_main
from helpers import assert_exact_in_every_build_and_batch, assert_prompt_products

ISAS = cpu_c.supported_isas() if cpu_c.available() else []
BLOCKS = tuple(lowbit.SPECS)
ALL = tuple(lowbit.RECORDS)
# rows not a multiple of the 4-row tile, inputs not a multiple of the block or group, B from 1 past the tile
SHAPES = [(1, 1, 32), (3, 37, 70), (2, 9, 33), (5, 130, 768), (17, 6, 300), (1, 64, 3072)]
needs_c = pytest.mark.skipif(not ISAS, reason="no C compiler / AVX2 here: the torch paths are tested")


def pack(w, fmt):
    return formats.get(fmt).pack(w)


def _data(B, O, I, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, I, generator=g), torch.randn(O, I, generator=g) / I ** 0.5


def _outlier_matrix(O, I, seed=0):
    """x with a few channels 16x the others and W with those columns 16x smaller (a LayerNorm gain
    outlier and the matrix that reads it), plus one column 8x larger."""
    x, w = _data(4, O, I, seed)
    x[:, 3] *= 16
    x[:, I // 2] *= 16
    w[:, 3] /= 16
    w[:, I // 2] /= 16
    w[:, 1] *= 8
    return x, w


def _accumulation_bound(x, w):
    """fp32 accumulation error bound for y = x W^T: a few ulps of sum |x| |w| per output."""
    return 4e-7 * (x.abs().double() @ w.dequantize().abs().double().T).float() * (1 + x.shape[1] ** 0.5) + 1e-30


def _format_bound(x, packed):
    """|x W^T - kernel| bound from the format: each stored weight is off by <= d/2 (one level of its
    block, times its column scale), each activation (x col) by <= its block's d_x / 2."""
    I = x.shape[1]
    col = packed.col.double() if packed.col is not None else torch.ones(I, dtype=torch.float64)
    if isinstance(packed, lowbit.Int8ColsWeight):
        step = packed.scale.double()
    else:                               # the "_0" formats: one step where a weight was clamped
        step = packed.d.double().abs() * (1 if packed.spec.has_min else 2)
    sw = step.repeat_interleave(lowbit.BLOCK, 1)[:, :I] * col                                # [O, I]
    xs = x.double() * col
    _, dx = formats.quantize_rows_reference(xs.float())
    sx = dx.double().repeat_interleave(lowbit.BLOCK, 1)[:, :I] / col                       # [B, I]
    aw = packed.dequantize().abs().double()
    return (x.abs().double() @ sw.T / 2 + sx @ (aw + sw / 2).T / 2).float() * 1.01 + 1e-6


# ---------------------------------------------------------------------------------------------
# formats

@pytest.mark.parametrize("fmt", BLOCKS)
@pytest.mark.parametrize("O, I", [(7, 32), (5, 70), (64, 768)])
def test_quantisation_error_is_within_half_a_step_per_weight(fmt, O, I):
    w = torch.randn(O, I) * torch.logspace(-3, 1, I)           # magnitudes spread over 4 decades
    p = lowbit.quantize(w, fmt).check()
    spec = lowbit.SPECS[fmt]
    step = p.d.float().abs().repeat_interleave(lowbit.BLOCK, 1)[:, :I]
    assert p.shape == (O, I) and p.qs.shape == (O, (-(-I // spec.group) * spec.group) // 2)
    err = (p.dequantize() - w).abs()
    within = err <= step / 2 * 1.001 + 1e-7
    if not spec.has_min:                # the weight opposite the block's largest one may sit at
        top = p.values()[:, :I] == spec.levels      # q = 2^bits (clamped to 2^bits - 1): one step
        within |= top & (err <= step * 1.001 + 1e-7)
    if spec.super_block:                # q4_k may clip a block's ends (see the next test): the weights
        m = p.m.repeat_interleave(lowbit.BLOCK, 1)[:, :I]     # inside its grid are within half a step
        within |= (w < m - 1e-7) | (w > m + spec.levels * step + 1e-7)
    assert bool(within.all())
    assert int(p.values().max()) <= spec.levels
    assert p.nbytes == O * (-(-I // spec.group) * spec.group) * spec.bytes_per_weight


@pytest.mark.parametrize("fmt", BLOCKS)
def test_values_and_high_bits_round_trip(fmt):
    w = torch.randn(3, 96)
    p = lowbit.quantize(w, fmt)
    q = p.values()
    assert torch.equal((lowbit._pack_nibbles_k if lowbit.SPECS[fmt].super_block else lowbit._pack_nibbles)(q), p.qs)
    if p.qh is not None:
        pack_high = lowbit._pack_high_k if lowbit.SPECS[fmt].super_block else lowbit._pack_high
        assert torch.equal(pack_high(q), p.qh) and int(q.max()) >= 16       # the 5th bit is used
    # the "_0" formats map the block's largest-magnitude weight to q = 0 exactly (ggml's choice)
    if not lowbit.SPECS[fmt].has_min:
        blocks = w.view(3, 3, 32)
        at = blocks.abs().argmax(-1, keepdim=True)
        assert bool((q[:, :96].reshape(3, 3, 32).gather(-1, at) == 0).all())


def test_quantise_in_row_slices_equals_all_at_once():
    w = torch.randn(37, 70)
    for fmt in ("q5_0+cols", "q4_1", "q4_k+cols"):
        a, b = pack(w, fmt), pack(w, fmt)
        c = lowbit.quantize(w, fmt.split("+")[0], fmt.endswith("+cols"), rows_per_step=5)
        for x, y in ((a, b), (a, c)):
            assert len(x.parts()) == len(y.parts()) and all(torch.equal(t, u) for t, u in zip(x.parts(), y.parts()))


def test_bad_input_gives_one_line_errors():
    with pytest.raises(ValueError, match="unknown weight format 'q3_0'"):
        formats.get("q3_0")
    with pytest.raises(ValueError, match="NaN or Inf"):
        lowbit.quantize(torch.full((2, 32), float("nan")), "q4_1")
    with pytest.raises(ValueError, match="NaN or Inf"):
        pack(torch.full((2, 32), float("inf")), "q5_0+cols")
    p = lowbit.quantize(torch.randn(4, 64), "q5_0")
    Q5, Q5C = lowbit.TYPES["q5_0"], lowbit.TYPES["q5_0+cols"]
    with pytest.raises(ValueError, match="q5_0 qh must be torch.uint8"):
        Q5(p.qs, p.d, p.d, 64).check()
    with pytest.raises(ValueError, match="nibbles must be uint8"):
        Q5(p.qs, p.qh, p.d, 300).check()
    with pytest.raises(ValueError, match="column scales must be float32"):
        Q5C(p.qs, p.qh, p.d, torch.ones(63), 64).check()
    with pytest.raises(ValueError, match="corrupt column scales"):
        Q5C(p.qs, p.qh, p.d, torch.full((64,), 3.0), 64).check()
    d = p.d.clone()
    d[0, 0] = float("inf")
    with pytest.raises(ValueError, match="corrupt q5_0 scales"):
        Q5(p.qs, p.qh, d, 64).check()
    q = lowbit.quantize(torch.randn(4, 64), "q4_1")
    m = q.m.clone()
    m[1, 1] = float("nan")
    with pytest.raises(ValueError, match="corrupt q4_1 minimums"):
        lowbit.TYPES["q4_1"](q.qs, q.d, m, 64).check()


def _k_bytes(D, Dmin, sc, mn):
    """One q4_k super-block's 16 bytes, written from the layout's definition (lowbit_ops.h)."""
    head = torch.tensor([D, Dmin], dtype=torch.float16).view(torch.uint8).tolist()
    low = [s | ((m & 3) << 6) for s, m in zip(sc, mn)]
    high = [(mn[2 * k] >> 2) | ((mn[2 * k + 1] >> 2) << 4) for k in range(4)]
    return head + low + high


def test_super_block_scales_read_as_the_layout_says():
    """q4_k's 16 bytes per 8 blocks, written by hand: every block's step D sc and offset -Dmin mn, in the
    Python reader, the C kernels (a row of ones in one block at a time) and the C dequantiser."""
    sc, mn = [1, 63, 17, 32, 5, 48, 62, 33], [0, 63, 1, 62, 21, 42, 7, 56]
    sb = torch.tensor([_k_bytes(0.25, 0.125, sc, mn) * 2], dtype=torch.uint8)       # 2 super-blocks
    qs = torch.full((1, 256), 0x35, dtype=torch.uint8)      # q = 5 (weights 8c..8c+3), 3 (8c+4..8c+7)
    p = lowbit.TYPES["q4_k"](qs, sb, 512).check()
    want_d = torch.tensor([0.25 * s for s in sc] * 2)
    want_m = torch.tensor([-0.125 * m for m in mn] * 2)
    assert torch.equal(p.d[0], want_d) and torch.equal(p.m[0], want_m)
    q = torch.tensor(([5.0] * 4 + [3.0] * 4) * 4 * 16)
    assert torch.equal(p.dequantize()[0], q * want_d.repeat_interleave(32) + want_m.repeat_interleave(32))
    if not ISAS:
        return
    for isa in ISAS:
        out = torch.empty(1, 512)
        assert torch.equal(lowbit.dequantize_rows(p, 0, 1, out, isa=isa), p.dequantize())
        x = torch.zeros(16, 512)
        for j in range(16):
            x[j, 32 * j:32 * (j + 1)] = 1.0               # x's block j all ones: d_x = 1 / 127, q = 127
        y = lowbit.matvec_group([(x, p)], isa=isa)[0][:, 0]
        # 127 (ones) times (d q + m) per weight, 32 weights, times d_x = 1 / 127: one block's sum
        expect = q.view(16, 32).sum(1) * want_d + 32 * want_m
        assert torch.allclose(y, expect, rtol=1e-6), isa


def test_super_block_search_never_does_worse_than_covering_the_range():
    """Per block, the kept scale and min give a sum of squared errors no larger than the pair that
    covers the block's whole range (mn = ceil(-lo / Dmin), sc = ceil((hi - m) / 15 / D)), computed here in
    float64 from the stored D and Dmin, and strictly smaller on many blocks; the C quantiser and the
    float32 reference give the same bits."""
    w = torch.randn(48, 1024) * torch.logspace(-2, 0, 1024)
    w[3, 40] = 9.0                      # a heavy weight, the case where clipping the rest pays
    p = lowbit.quantize(w, "q4_k")
    qs, qh, sb = lowbit._quantize_rows_k_reference(w, 1024)
    assert torch.equal(qs, p.qs) and torch.equal(sb, p.sb) and qh is None
    blocks = w.double().view(48, 4, 8, 32)
    D, Dmin = (t.double()[..., None] for t in p._super()[:2])
    lo, hi = blocks.amin(-1).clamp(max=0), blocks.amax(-1)
    m = -Dmin * torch.ceil(-lo / Dmin).clamp(0, 63)
    d = D * torch.ceil((hi - m) / 15 / D).clamp(1, 63)
    q = torch.round((blocks - m[..., None]) / d[..., None]).clamp(0, 15)
    covering = (q * d[..., None] + m[..., None] - blocks).pow(2).sum(-1).view(48, 32)
    kept = (p.dequantize().double() - w.double()).pow(2).view(48, 32, 32).sum(-1)
    assert bool((kept <= covering * (1 + 1e-5) + 1e-12).all())
    assert float((kept < covering * 0.999).float().mean()) > 0.3
    assert float(kept.sum() / covering.sum()) < 0.95


def test_super_block_fifth_bits_read_as_the_layout_says():
    """q5_k's 5th bits: bit 2c + h of byte 4l + i of a super-block's 32 bytes is weight 8c + 4h + i of
    block l (one bit set by hand at a time), in the Python reader, the C kernels and the C dequantiser."""
    sb = torch.tensor([_k_bytes(1.0, 0.5, [1] * 8, [0] * 8)], dtype=torch.uint8)    # d = 1, m = 0
    qs = torch.zeros(1, 128, dtype=torch.uint8)
    for c, h, l, i in ((0, 0, 0, 0), (1, 1, 3, 1), (3, 1, 7, 3), (2, 0, 4, 2)):
        qh = torch.zeros(1, 32, dtype=torch.uint8)
        qh[0, 4 * l + i] = 1 << (2 * c + h)
        k = 4 * h + i
        p = lowbit.TYPES["q5_k"](qs, qh, sb, 256).check()
        want = torch.zeros(256)
        want[32 * l + 8 * c + k] = 16.0
        assert torch.equal(p.dequantize()[0], want)
        for isa in ISAS:
            out = torch.empty(1, 256)
            assert torch.equal(lowbit.dequantize_rows(p, 0, 1, out, isa=isa)[0], want)
            x = torch.zeros(1, 256)
            x[0, 32 * l + 8 * c + k] = 1.0                  # d_x = 1 / 127, q = 127: y = 16
            assert torch.allclose(lowbit.matvec_group([(x, p)], isa=isa)[0][0], torch.tensor([16.0]), rtol=1e-6), isa


def test_super_block_corruption_gives_one_line_errors():
    p = lowbit.quantize(torch.randn(4, 256), "q4_k")
    K = lowbit.TYPES["q4_k"]
    with pytest.raises(ValueError, match="super-block scales must be uint8 \\[4, 16\\]"):
        K(p.qs, p.sb[:, :8], 256).check()
    with pytest.raises(ValueError, match="nibbles must be uint8"):
        K(p.qs[:, :64], p.sb, 256).check()
    p5 = lowbit.quantize(torch.randn(4, 256), "q5_k")
    with pytest.raises(ValueError, match="q5_k qh must be torch.uint8 \\[4, 32\\]"):
        lowbit.TYPES["q5_k"](p5.qs, p5.qh[:, :16], p5.sb, 256).check()
    with pytest.raises(TypeError, match="q5_k takes 4 arguments"):
        lowbit.TYPES["q5_k"](p5.qs, p5.sb, 256)
    for D, Dmin in ((float("nan"), 0.1), (0.0, 0.1), (0.5, float("inf")), (0.5, -0.25)):
        sb = p.sb.clone()
        sb[2, :4] = torch.tensor([D, Dmin], dtype=torch.float16).view(torch.uint8)
        with pytest.raises(ValueError, match="corrupt q4_k scales"):
            K(p.qs, sb, 256).check()


# ---------------------------------------------------------------------------------------------
# the outlier treatment

def test_column_scales_are_powers_of_two_that_undo_small_and_large_columns():
    x, w = _outlier_matrix(40, 96)
    col = lowbit.column_scales(w)
    assert float(col[3]) == 1 / 16 and float(col[48]) == 1 / 16 and float(col[1]) == 8
    assert float((col == 1).float().mean()) > 0.8
    m, _ = torch.frexp(col)
    assert bool((m == 0.5).all())


@pytest.mark.parametrize("fmt", [f for f in ALL if f.endswith(lowbit.OUTLIER_SUFFIX)])
def test_scaled_columns_give_the_unscaled_product_within_the_format_bound(fmt):
    """y = (x col) (W / col)^T: the folding is exact (powers of two), so the product with scaled
    columns is x W^T within the format's rounding bound, on the C kernel and the GEMM path."""
    x, w = _outlier_matrix(40, 96)
    p = pack(w, fmt).check()
    assert p.col is not None and float(p.col[3]) == 1 / 16
    exact = (x.double() @ w.double().T).float()
    y = lowbit.matvec_reference(x, p)
    assert bool(((y - exact).abs() <= _format_bound(x, p)).all())
    if ISAS:
        assert torch.allclose(quant.dequantized_linear(x, p), lowbit.gemm(x, p), atol=1e-5)
        yc = lowbit.matvec_group([(x, p)])[0]
        assert bool(((yc - y).abs() <= _accumulation_bound(x, p)).all())


@pytest.mark.parametrize("fmt", ("q4_1", "q5_0", "int8"))
def test_column_scales_shrink_the_error_on_outlier_channels(fmt):
    x, w = _outlier_matrix(64, 256)
    exact = (x.double() @ w.double().T).float()
    plain = pack(w, fmt)
    scaled = pack(w, fmt + lowbit.OUTLIER_SUFFIX)
    ref = quant.matvec_reference
    err_plain = float((ref(x, plain) - exact).pow(2).mean())
    err_scaled = float((lowbit.matvec_reference(x, scaled) - exact).pow(2).mean())
    assert err_scaled < err_plain / 2, (err_scaled, err_plain)


# ---------------------------------------------------------------------------------------------
# C kernels against the references, on every build this CPU runs

@needs_c
def test_int8_cols_weights_of_minus_128_are_exact_in_every_build_and_batch():
    """As for plain int8 (tests/test_quant.py): a packed file may hold -128, which our quantiser never
    writes; the int8+cols kernels (|w| from vpsignb(w, w), which reads 0x80 as 128 unsigned, times x
    with w's sign) compute it exactly: the reference, one stream against the tiles, the builds alike."""
    x, w = _data(9, 11, 300, seed=4)
    packed = pack(w, "int8+cols")
    q = packed.q.clone()
    q.view(-1)[::5] = -128
    packed = type(packed)(q, packed.scale, packed.col, packed.in_features).check()
    assert_exact_in_every_build_and_batch(lowbit.matvec_group, x, packed, lowbit.matvec_reference(x, packed),
                                          _accumulation_bound(x, packed), ISAS, (2, 4, 5, 9))


@needs_c
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("B, O, I", [(1, 13, 300), (5, 9, 768), (16, 8, 1100)])
def test_int8_cols_is_the_int8_kernel_on_x_times_col(isa, B, O, I):
    """int8+cols runs the int8 kernels with x multiplied by the column scales as it is quantised: its
    products have the bits of the int8 product of x col (computed apart, exact: powers of two) with the
    same stored blocks, alone and in a group beside a low-bit product (the decode step's one call gives
    the per-op bits: tests/test_decode.py)."""
    x, w = _outlier_matrix(O, I, seed=B)
    x = torch.cat([x] * 4)[:B].contiguous()
    packed = pack(w, "int8+cols")
    assert not bool((packed.col == 1).all())
    plain = formats.Int8Weight(packed.q, packed.scale, I)
    want = quant.matvec_group([((x * packed.col).contiguous(), plain)], isa=isa)[0]
    assert torch.equal(lowbit.matvec_group([(x, packed)], isa=isa)[0], want)
    other = pack(w, "q4_1")
    got = lowbit.matvec_group([(x, other), (x, packed)], isa=isa)
    assert torch.equal(got[1], want) and torch.equal(got[0], lowbit.matvec_group([(x, other)], isa=isa)[0])


@needs_c
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ALL)
@pytest.mark.parametrize("B, O, I", SHAPES)
def test_matvec_matches_reference(isa, fmt, B, O, I):
    x, w = _data(B, O, I)
    packed = pack(w, fmt)
    y = lowbit.matvec_group([(x, packed)], isa=isa)[0]
    ref = lowbit.matvec_reference(x, packed)                  # the kernel's arithmetic, in float64
    assert bool(((y - ref).abs() <= _accumulation_bound(x, packed)).all())
    exact = (x.double() @ w.double().T).float()
    assert bool(((y - exact).abs() <= _format_bound(x, packed) + _accumulation_bound(x, packed)).all())


@needs_c
@pytest.mark.parametrize("isa", ISAS)
def test_group_with_accumulate_and_mixed_formats(isa):
    x1, w1 = _data(3, 40, 96, seed=1)
    x2, w2 = _data(3, 96, 40, seed=2)
    p1, p2 = pack(w1, "q5_0+cols"), pack(w2, "q4_1")
    out = [torch.randn(3, 40), torch.randn(3, 96)]
    before = [o.clone() for o in out]
    lowbit.matvec_group([(x1, p1), (x2, p2)], out=out, accumulate=True, isa=isa)
    for o, b, x, p in zip(out, before, (x1, x2), (p1, p2)):
        assert bool(((o - b - lowbit.matvec_reference(x, p)).abs() <= _accumulation_bound(x, p) + 1e-5).all())


@needs_c
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ALL)
def test_each_stream_is_bit_identical_whatever_the_batch_and_threads(isa, fmt):
    x, w = _data(17, 100, 768)
    packed = pack(w, fmt)
    batched = lowbit.matvec_group([(x, packed)], isa=isa)[0]
    for b in (0, 7, 16):
        alone = lowbit.matvec_group([(x[b:b + 1].contiguous(), packed)], isa=isa)[0]
        assert torch.equal(alone[0], batched[b])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(lowbit.matvec_group([(x, packed)], isa=isa)[0], batched)
    finally:
        torch.set_num_threads(threads)


@needs_c
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ALL)
@pytest.mark.parametrize("O, I", [(7, 300), (5, 70), (3, 1100)])
def test_stream_tiles_give_each_stream_its_single_stream_bits(isa, fmt, O, I):
    """Several streams run tiles of one row x up to 4 streams that unpack each row's bytes once for the
    tile: every stream's output has exactly the bits (compared as integers, so -0 and +0 differ) of its
    output alone, for every batch size, with the tails of each layout (300 and 70 in: 4-bit pairs and
    int8 single blocks after the groups of 8; 1100: 5-bit padding to 1280)."""
    x, w = _data(9, O, I, seed=8)
    x[2, : min(I, 40)] *= 30                               # blocks whose x quantises to +-127
    packed = pack(w, fmt)
    alone = torch.cat([lowbit.matvec_group([(x[b:b + 1].contiguous(), packed)], isa=isa)[0] for b in range(9)])
    for B in (2, 3, 4, 5, 6, 9):
        batched = lowbit.matvec_group([(x[:B].contiguous(), packed)], isa=isa)[0]
        assert torch.equal(batched.view(torch.int32), alone[:B].view(torch.int32)), B
    y0 = torch.randn(9, O)
    y = lowbit.matvec_group([(x, packed)], out=[y0.clone()], accumulate=True, isa=isa)[0]
    assert torch.equal(y, y0 + alone)


@pytest.mark.skipif(len(ISAS) < 2, reason="this CPU runs only the avx2 build: nothing to compare it with")
@pytest.mark.parametrize("fmt", ALL)
@pytest.mark.parametrize("B, O, I", [(1, 37, 70), (5, 130, 768), (17, 9, 300), (3, 5, 3072)])
def test_avx2_and_avx512_builds_give_the_same_bits(fmt, B, O, I):
    """The integer block dots are exact in both (maddubs + madd on AVX2, vpdpbusd on AVX-512 VNNI), the
    float order is the same: so every output is bitwise the same in every build."""
    x, w = _data(B, O, I, seed=3)
    x[0, : min(I, 40)] *= 30                               # blocks whose x quantises to +-127
    packed = pack(w, fmt)
    ys = {isa: lowbit.matvec_group([(x, packed)], isa=isa)[0] for isa in ISAS}
    q = {isa: lowbit.quantize_rows(x, packed.col, isa=isa) for isa in ISAS}
    for isa in ISAS[1:]:
        assert torch.equal(ys[isa], ys[ISAS[0]]), (isa, ISAS[0])
        assert all(torch.equal(a, b) for a, b in zip(q[isa], q[ISAS[0]]))


@needs_c
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("B, I", [(1, 32), (4, 70), (3, 768)])
def test_activation_quantisation_matches_torch_exactly(isa, B, I):
    x = torch.randn(B, I) * torch.logspace(-2, 2, I)
    x[0, :min(I, 32)] = 0                                      # an all-zero block: scale 0, values 0
    col = torch.exp2(torch.randint(-3, 4, (I,)).float())
    for c in (None, col):
        q, d, s = lowbit.quantize_rows(x, c, isa=isa)
        q_ref, d_ref = formats.quantize_rows_reference(x * c if c is not None else x)
        assert torch.equal(q, q_ref) and torch.equal(d, d_ref)
        assert torch.equal(s, d_ref * q_ref.view(B, -1, 32).sum(-1).float())


@needs_c
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ALL)
def test_dequantise_rows_is_exact(isa, fmt):
    _, w = _data(1, 50, 70)
    packed = pack(w, fmt)
    out = torch.empty(30, 70)
    lowbit.dequantize_rows(packed, 10, 40, out, isa=isa)
    assert torch.equal(out, packed.dequantize_stored()[10:40])


@needs_c
@pytest.mark.parametrize("fmt", ("q4_1+cols", "q5_0", "q4_k+cols", "q5_k"))
def test_gemm_in_slices_matches_the_dequantised_matrix(fmt, monkeypatch):
    x, w = _data(20, 300, 70)
    packed = pack(w, fmt)
    want = quant.dequantized_linear(x, packed)
    assert torch.allclose(lowbit.gemm(x, packed), want, atol=1e-5)
    monkeypatch.setattr(quant, "GEMM_SLICE", 64 * 70)            # 64 rows per slice: 5 slices
    assert torch.allclose(lowbit.gemm(x, packed), want, atol=1e-5)


SIMULATED = """
import torch
from rwkv_kernels import cpu_c, formats, lowbit
assert cpu_c.ops().isa == "avx2" and cpu_c.ops().lib.isa_level() == 256
pack = lambda w, fmt: formats.get(fmt).pack(w)
g = torch.Generator().manual_seed(0)
for fmt in lowbit.RECORDS:
    x, w = torch.randn(3, 70, generator=g), torch.randn(37, 70, generator=g)
    p = pack(w, fmt)
    y, ref = lowbit.matvec_group([(x, p)])[0], lowbit.matvec_reference(x, p)
    assert float((y - ref).abs().max()) < 1e-4, fmt
print("ok")
"""


@needs_c
def test_simulated_avx2_only_cpu_runs_the_avx2_build():
    env = dict(os.environ, RWKV_ENGINE_CPU_FEATURES="avx2,fma,f16c", PYTHONPATH=os.getcwd())
    out = subprocess.run([sys.executable, "-c", SIMULATED], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# ---------------------------------------------------------------------------------------------
# rwkv_kernels.linear dispatches on the weight's format

@pytest.mark.parametrize("fmt", ("q4_1", "q5_0+cols", "int8+cols", "q4_k", "q5_k+cols"))
def test_linear_dispatch_decode_and_prompt_shapes(fmt):
    x, w = _data(4, 40, 96)
    packed = pack(w, fmt)
    y = rwkv_kernels.linear(x, packed)                                # token mode: [B, C]
    assert y.shape == (4, 40)
    assert bool(((y - lowbit.matvec_reference(x, packed)).abs() <= _accumulation_bound(x, packed) + 1e-6).all())
    xs = torch.randn(2, 100, 96)                                 # a prompt: [B, T, C]
    assert_prompt_products(xs, packed, "lowbit_gemm")
    out = torch.ones(4, 40)
    rwkv_kernels.linear_accumulate_(x, packed, out)
    assert torch.allclose(out, 1 + y, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# models and packed files

@pytest.fixture(scope="module")
def tokens(tiny_cfg):
    return torch.randint(0, tiny_cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))


def _kl(ref, other):
    lp, lq = torch.log_softmax(ref.double(), -1), torch.log_softmax(other.double(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


@pytest.mark.parametrize("fmt", ("q4_1", "q5_0+cols", "q4_k", "q5_k+cols"))
def test_packed_model_is_near_fp32_and_batch_invariant(tiny_pth, tokens, fmt):
    ref = rwkv_engine.load(str(tiny_pth)).forward(tokens, all_logits=True)[0]
    model = rwkv_engine.load(str(tiny_pth), weights=fmt)
    assert model.weight_format == fmt and model.blocks[0].att_key.format == fmt
    logits = model.forward(tokens, all_logits=True)[0]
    assert _kl(ref, logits) < 5e-2
    batched = model.new_state(2)
    one = model.new_state(1)
    for t in range(4):
        yb, _ = model.forward(tokens[:, t:t + 1], batched)
        y1, _ = model.forward(tokens[1:, t:t + 1], one)
        assert torch.equal(yb[1], y1[0])


@pytest.fixture(scope="module")
def q5_file(tiny_pth, tmp_path_factory):
    out = tmp_path_factory.mktemp("lowbit") / "tiny-q5_0+cols.safetensors"
    assert convert_main([str(tiny_pth), str(out), "--weights", "q5_0+cols"]) == 0
    return out


def test_converted_file_equals_quantised_at_load(tiny_pth, q5_file, tokens):
    at_load = rwkv_engine.load(str(tiny_pth), weights="q5_0+cols")
    from_file = rwkv_engine.load(str(q5_file))
    assert from_file.weight_format == "q5_0+cols"
    a, b = at_load.blocks[1].ffn_value, from_file.blocks[1].ffn_value
    assert formats.get("q5_0+cols").file_parts == ("", ".qh", ".d", ".col") and len(a.parts()) == len(b.parts()) == 4
    assert all(torch.equal(t, u) for t, u in zip(a.parts(), b.parts()))
    assert not b.qs.untyped_storage().resizable()                 # mapped, not copied
    assert torch.equal(at_load.forward(tokens, all_logits=True)[0], from_file.forward(tokens, all_logits=True)[0])
    assert q5_file.stat().st_size < tiny_pth.stat().st_size * 0.5     # (the float16 embedding dominates here)


@pytest.mark.parametrize("fmt", ("int8+cols", "q4_1", "q4_k", "q5_k+cols"))
def test_file_round_trip(tiny_pth, tmp_path, tokens, fmt):
    out = tmp_path / f"tiny-{fmt}.safetensors"
    assert convert_main([str(tiny_pth), str(out), "--weights", fmt]) == 0
    at_load, from_file = rwkv_engine.load(str(tiny_pth), weights=fmt), rwkv_engine.load(str(out))
    assert from_file.weight_format == fmt and type(from_file.head) is lowbit.TYPES[fmt]
    assert all(torch.equal(t, u) for t, u in zip(at_load.head.parts(), from_file.head.parts()))
    assert torch.equal(at_load.forward(tokens)[0], from_file.forward(tokens)[0])


def _rewrite(src, dst, edit):
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(src), "pt") as f:
        meta, sd = f.metadata(), {k: f.get_tensor(k).clone() for k in f.keys()}
    edit(sd, meta)
    save_file(sd, str(dst), metadata=meta)
    return dst


def _set(key, value):
    def edit(sd, meta):
        sd[key].view(-1)[3] = value
    return edit


def _drop(key):
    def edit(sd, meta):
        del sd[key]
    return edit


def _meta(field, value):
    def edit(sd, meta):
        meta[field] = value
    return edit


@pytest.mark.parametrize("edit, message", [
    (_set("blocks.1.att.value.weight.d", float("nan")), "blocks.1.att.value.weight: corrupt q5_0\\+cols scales"),
    (_set("blocks.0.ffn.key.weight.col", 3.0), "blocks.0.ffn.key.weight: corrupt column scales"),
    (_drop("head.weight.qh"), "q5_0\\+cols matrix head.weight has no scales"),
    (_drop("head.weight.col"), "q5_0\\+cols matrix head.weight has no scales"),
    (_meta("rwkv_engine.weights", "q5_0"), "a q5_0 file has an unexpected tensor blocks.0.att.key.weight.col"),
    (_meta("rwkv_engine.weights", "q4_1+cols"), "q4_1\\+cols matrix blocks.0.att.key.weight has no scales"),
    (_meta("rwkv_engine.weights", "q9_9"), "unknown weight format 'q9_9'"),
    (_meta("rwkv_engine.in_features", "[1, 2]"), "rwkv_engine.in_features must be a JSON object"),
])
def test_corrupt_or_mismatched_packed_files_are_refused_in_one_line(q5_file, tmp_path, edit, message):
    path = _rewrite(q5_file, tmp_path / "bad.safetensors", edit)
    with pytest.raises(CheckpointError, match=message) as info:
        rwkv_engine.load(str(path))
    assert "\n" not in str(info.value)


def test_a_packed_file_loads_only_in_its_own_format(q5_file, tmp_path, capsys):
    with pytest.raises(ValueError, match="q5_0\\+cols checkpoint loads with weights='q5_0\\+cols', not 'q4_1'"):
        rwkv_engine.load(str(q5_file), weights="q4_1")
    assert convert_main([str(q5_file), str(tmp_path / "again.safetensors"), "--weights", "q4_1"]) == 2
    assert "already a packed (q5_0+cols) checkpoint" in capsys.readouterr().err


def test_unknown_format_names_the_choices(tiny_pth):
    with pytest.raises(ValueError, match="unknown weight format 'q3'.*q5_0.*q4_1\\+cols"):
        rwkv_engine.load(str(tiny_pth), weights="q3")


# ---------------------------------------------------------------------------------------------
# bench.quality --outliers with its strength and count

def test_quality_outliers_table_takes_strength_and_count(tiny_cfg, monkeypatch, tmp_path, capsys):
    from bench import quality
    from rwkv_engine import config
    monkeypatch.setenv("RWKV_ENGINE_CACHE", str(tmp_path))
    monkeypatch.setitem(config.MODELS, "rwkv-4-tiny", tiny_cfg)
    out = tmp_path / "q.json"
    assert quality.main(["--model", "rwkv-4-tiny", "--outliers", "--outlier-strength", "12", "--outlier-channels", "2",
                         "--formats", "int8,int8+cols,q4_1+cols", "--prompt-tokens", "16", "--new-tokens", "3",
                         "--no-sim", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "synthetic weights" in text and "2 channels 12x" in text
    rows = [line.split() for line in text.splitlines() if line.split() and line.split()[0] in ("int8", "int8+cols", "q4_1+cols")]
    assert [r[0] for r in rows] == ["int8", "int8+cols", "q4_1+cols"] and all(len(r) == 8 for r in rows)
    result = json.loads(out.read_text())
    assert result["outlier_strength"] == 12 and result["outlier_channels"] == 2
    plain, odd = result["plain"]["formats"], result["formats"]
    for fmt in ("int8", "int8+cols", "q4_1+cols"):
        assert float(rows[[r[0] for r in rows].index(fmt)][-1]) == pytest.approx(odd[fmt]["mean_kl"] / plain[fmt]["mean_kl"], rel=0.01)
    sd = torch.load(quality.checkpoint_path("rwkv-4-tiny", None, True, strength=12, channels=2), weights_only=True)
    gain = sd["blocks.0.ln1.weight"] / synthetic_state_dict(tiny_cfg)["blocks.0.ln1.weight"]
    assert int(torch.isclose(gain, torch.tensor(12.0)).sum()) == 2


# ---------------------------------------------------------------------------------------------
# bench: the CLI choices and the fit check come from the records

@pytest.mark.parametrize("fmt", ALL)
def test_bench_accepts_the_formats_and_counts_their_bytes(fmt):
    import bench.cli
    import bench.models
    assert fmt in bench.cli.WEIGHT_FORMATS
    per_weight = formats.get(fmt).bytes_per_weight
    assert bench.models.bytes_per_weight(weights=fmt) == per_weight
    assert per_weight < formats.get("int8").bytes_per_weight or fmt.startswith("int8")
    n = bench.models.n_params("rwkv-4-pile-169m")
    assert bench.models.estimate("rwkv-4-pile-169m", 8, weights=fmt)["params_bytes"] == int(n * per_weight)
    ok, why = bench.models.fits("rwkv-4-pile-169m", tokens=8, weights=fmt, budget_bytes=1)
    assert not ok and "needs" in why
    from bench.generate import build_parser
    assert build_parser().parse_args(["--model", "rwkv-4-pile-169m", "--weights", fmt]).weights == fmt
