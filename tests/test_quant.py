"""rwkv_kernels.quant: the packed formats, every C kernel build this CPU runs against its torch reference,
batch invariance, the instruction-set choice, and bad input."""
import pytest
import torch

import rwkv_kernels
from rwkv_kernels import cpu_c, formats, quant
from helpers import assert_exact_in_every_build_and_batch, assert_prompt_products

ISAS = quant.supported_isas() if cpu_c.available() else []
FORMATS16 = ("float16", "bfloat16")
PACKED = (*FORMATS16, "int8")
SHAPES = [(1, 1, 32), (3, 37, 70), (2, 9, 33), (5, 130, 768), (1, 64, 3072)]
needs_c = pytest.mark.skipif(not ISAS, reason="no C compiler / AVX2 here: the torch paths are tested")


def _data(B, O, I, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, I, generator=g), torch.randn(O, I, generator=g) / I ** 0.5


def _accumulation_bound(x, w):
    """fp32 accumulation error bound for y = x W^T: a few ulps of sum |x| |w| per output."""
    return 4e-7 * (x.abs().double() @ quant.dequantize(w).abs().double().T).float() * (1 + x.shape[1] ** 0.5) + 1e-30


def _format_bound(x, w, fmt):
    """|x W^T - x Q(W)^T| bound from the format: 16-bit rounding is relative (2^-11, 2^-8); int8 rounds
    each weight by <= scale/2 and, in the kernel, each activation by <= its block scale/2."""
    ax, aw = x.abs().double(), w.abs().double()
    if fmt in FORMATS16:
        return {"float16": 2 ** -11, "bfloat16": 2 ** -8}[fmt] * (ax @ aw.T).float() * 1.01 + 1e-6
    packed = quant.pack(w, "int8")
    B, I = x.shape
    Ip, nb = packed.q.shape[1], packed.q.shape[1] // quant.BLOCK
    sw = packed.scale.double().repeat_interleave(quant.BLOCK, 1)[:, :I]                    # [O, I]
    _, dx = quant.quantize_rows_reference(x)
    sx = dx.double().repeat_interleave(quant.BLOCK, 1)[:, :I]                               # [B, I]
    bound = ax @ sw.T / 2 + sx @ (aw + sw / 2).T / 2
    return bound.float() * 1.01 + 1e-6


# ---------------------------------------------------------------------------------------------
# formats

@pytest.mark.parametrize("O, I", [(7, 32), (5, 70), (64, 768)])
def test_int8_quantisation_error_is_within_half_a_step_per_weight(O, I):
    w = torch.randn(O, I) * torch.logspace(-3, 1, I)           # magnitudes spread over 4 decades
    p = quant.quantize_int8(w)
    p.check()
    step = p.scale.float().repeat_interleave(quant.BLOCK, 1)[:, :I]
    assert p.q.shape == (O, -(-I // 32) * 32) and p.shape == (O, I)
    assert bool(((p.dequantize() - w).abs() <= step / 2 * 1.0001).all())
    assert int(p.q.abs().max()) <= 127


def test_int8_blocks_confine_an_outlier_to_its_block():
    w = torch.randn(4, 96) * 0.02
    w[1, 40] = 50.0
    p = quant.quantize_int8(w)
    err = (p.dequantize() - w).abs()
    assert float(err[1, 64:].max()) < 1e-3 and float(err[1, :32].max()) < 1e-3     # other blocks intact
    assert float(err[1, 32:64].max()) > 1e-2                                        # its own block coarse


def test_int8_zero_block_gets_a_positive_scale_and_zero_values():
    w = torch.zeros(2, 64)
    w[0, 40] = 127 * 2 ** -7                                   # scale 2^-7: exact in float16
    p = quant.quantize_int8(w)
    assert bool((p.scale.float() > 0).all()) and torch.equal(p.dequantize(), w)


def test_quantise_in_row_slices_equals_all_at_once():
    w = torch.randn(37, 70)
    a, b = quant.quantize_int8(w), quant.quantize_int8(w, rows_per_step=5)
    assert torch.equal(a.q, b.q) and torch.equal(a.scale, b.scale)


def test_16bit_pack_rounds_to_nearest_even():
    """Bit patterns worked out by hand: float16 keeps 10 fraction bits (ulp 2^-10 at 1), bfloat16 7."""
    u16, u7 = 2.0 ** -11, 2.0 ** -8                             # half an ulp of each at 1.0
    w = torch.tensor([[1.0, 1 + u16, 1 + 3 * u16, -2.5, 65504.0, 65520.0, 1 + u7, 1 + 3 * u7]])
    f16 = quant.pack(w, "float16").view(torch.int16).tolist()[0]
    assert f16[:6] == [0x3C00, 0x3C00, 0x3C02, -0x3F00, 0x7BFF, 0x7C00]   # ties to even; 65520 -> inf
    bf16 = quant.pack(w, "bfloat16").view(torch.int16).tolist()[0]
    assert bf16[0] == 0x3F80 and bf16[3] == -0x3FE0 and bf16[6:] == [0x3F80, 0x3F82]
    assert quant.format_of(quant.pack(w, "int8")) == "int8" and quant.format_of(w.half()) == "float16"
    assert formats.get("int8").bytes_per_weight == 1.0625 and formats.get("bfloat16").bytes_per_weight == 2


def test_bad_input_gives_one_line_errors():
    with pytest.raises(ValueError, match="unknown weight format 'int4'"):
        quant.pack(torch.randn(4, 32), "int4")
    w = torch.randn(4, 32)
    w[2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        quant.quantize_int8(w)
    p = quant.quantize_int8(torch.randn(4, 64))
    for bad in (float("nan"), 0.0, -1.0, float("inf")):
        s = p.scale.clone()
        s[1, 1] = bad
        with pytest.raises(ValueError, match="corrupt int8 scales"):
            quant.Int8Weight(p.q, s, 64).check()
    with pytest.raises(ValueError, match="scales must be float16"):
        quant.Int8Weight(p.q, p.scale.float(), 64).check()
    with pytest.raises(ValueError, match="int8 values must be"):
        quant.Int8Weight(p.q, p.scale, 20).check()


# ---------------------------------------------------------------------------------------------
# C kernels against the references, on every build this CPU runs

@needs_c
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", PACKED)
@pytest.mark.parametrize("B, O, I", SHAPES)
def test_matvec_matches_reference(isa, fmt, B, O, I):
    x, w = _data(B, O, I)
    packed = quant.pack(w, fmt)
    y = quant.matvec_group([(x, packed)], isa=isa)[0]
    ref = quant.matvec_reference(x, packed)                   # the kernel's arithmetic, in float64
    assert bool(((y - ref).abs() <= _accumulation_bound(x, packed)).all())
    exact = (x.double() @ w.double().T).float()               # the float32 matrix it stands for
    assert bool(((y - exact).abs() <= _format_bound(x, w, fmt) + _accumulation_bound(x, packed)).all())


@needs_c
@pytest.mark.parametrize("isa", ISAS)
def test_group_with_accumulate_and_mixed_shapes(isa):
    x1, w1 = _data(3, 40, 96, seed=1)
    x2, w2 = _data(3, 96, 40, seed=2)
    p1, p2 = quant.pack(w1, "int8"), quant.pack(w2, "float16")
    out = [torch.randn(3, 40), torch.randn(3, 96)]
    before = [o.clone() for o in out]
    quant.matvec_group([(x1, p1), (x2, p2)], out=out, accumulate=True, isa=isa)
    for o, b, x, p in zip(out, before, (x1, x2), (p1, p2)):
        assert bool(((o - b - quant.matvec_reference(x, p)).abs() <= _accumulation_bound(x, p) + 1e-5).all())


@needs_c
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", PACKED)
def test_each_stream_is_bit_identical_whatever_the_batch(isa, fmt):
    x, w = _data(33, 100, 768)
    packed = quant.pack(w, fmt)
    batched = quant.matvec_group([(x, packed)], isa=isa)[0]
    for b in (0, 7, 32):
        alone = quant.matvec_group([(x[b:b + 1].contiguous(), packed)], isa=isa)[0]
        assert torch.equal(alone[0], batched[b])
    assert torch.equal(quant.matvec_group([(x[:5].contiguous(), packed)], isa=isa)[0], batched[:5])


@needs_c
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", FORMATS16)
@pytest.mark.parametrize("O, I", [(9, 91), (37, 1000), (6, 2067)])
def test_16bit_stream_tiles_give_each_stream_its_single_stream_bits(isa, fmt, O, I):
    """Several streams run tiles of 4 rows x up to 3 streams that widen each weight once for the tile:
    every stream's output is bitwise its output alone, whatever the batch size, with every tail of the
    row loop (91 = 2 x 32 + 16 + 8 + 3; 1000 ends in 8; 2067 in 16 + 3) and partial tiles of rows."""
    x, w = _data(33, O, I, seed=6)
    packed = quant.pack(w, fmt)
    alone = torch.cat([quant.matvec_group([(x[b:b + 1].contiguous(), packed)], isa=isa)[0] for b in range(33)])
    for B in (2, 3, 4, 5, 7, 11, 13, 33):         # from 4 streams: each copy of the block-prefetch loop
        assert torch.equal(quant.matvec_group([(x[:B].contiguous(), packed)], isa=isa)[0], alone[:B]), B
    y0 = torch.randn(33, O)
    y = quant.matvec_group([(x, packed)], out=[y0.clone()], accumulate=True, isa=isa)[0]
    assert torch.equal(y, y0 + alone)
    assert bool(((alone - quant.matvec_reference(x, packed)).abs() <= _accumulation_bound(x, packed)).all())


@needs_c
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("O, I", [(9, 77), (37, 1000), (130, 2080), (11, 1270), (6, 411)])
def test_int8_stream_tiles_give_each_stream_its_single_stream_bits(isa, O, I):
    """Several streams run tiles of 4 rows x up to 4 streams (512-bit build) that share each weight load
    and each stream's x across the tile: every stream's output is bitwise its output alone, whatever the
    batch size and the stream's place in a tile, with odd block counts (77 and 2080 in), a last group of
    exactly 8 blocks (1270 in: 2 groups of 16 and one of 8, its last block padded; 169m's rows of 768
    end so, and both builds give that group its own path), a group of 13 blocks (411 in: x's interleave
    moves 8 blocks in registers and 5 a dword at a time) and rows that do not fill a tile of 4 (9, 37,
    130, 11, 6 out)."""
    x, w = _data(17, O, I, seed=5)
    x[3, : min(I, 40)] *= 30                                  # blocks whose x quantises to +-127
    packed = quant.pack(w, "int8")
    alone = torch.cat([quant.matvec_group([(x[b:b + 1].contiguous(), packed)], isa=isa)[0] for b in range(17)])
    for B in (2, 3, 4, 5, 8, 12, 16, 17):            # 8 and 12: the prefetch spread over 4 tiles
        batched = quant.matvec_group([(x[:B].contiguous(), packed)], isa=isa)[0]
        assert torch.equal(batched, alone[:B]), B
    y0 = torch.randn(17, O)
    y = quant.matvec_group([(x, packed)], out=[y0.clone()], accumulate=True, isa=isa)[0]
    assert torch.equal(y, y0 + alone)
    assert bool(((alone - quant.matvec_reference(x, packed)).abs() <= _accumulation_bound(x, packed)).all())


@needs_c
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("negative", [False, True])
@pytest.mark.parametrize("O, I", [(9, 77), (37, 768), (13, 3072)])
def test_int8_stream_tiles_of_non_negative_x_give_the_single_stream_bits(isa, negative, O, I):
    """Where no stream's x is negative (the FFN's value product: a squared ReLU, with exact zeros) the
    AVX2 tiles leave out the sign handling: every stream still gets its single-stream bits (the
    one-stream loop keeps its XOR with x's sign masks) and the reference's value; with one negative value
    in one stream (the check is over the whole batch) the tiles take the signed path, with the same bits."""
    x, w = _data(17, O, I, seed=8)
    x = torch.relu(x) ** 2
    x[5, : min(I, 40)] *= 30                                   # blocks whose x quantises to 127
    if negative:
        x[11, I // 2] = -0.5
    packed = quant.pack(w, "int8")
    alone = torch.cat([quant.matvec_group([(x[b:b + 1].contiguous(), packed)], isa=isa)[0] for b in range(17)])
    for B in (2, 3, 16, 17):
        assert torch.equal(quant.matvec_group([(x[:B].contiguous(), packed)], isa=isa)[0], alone[:B]), B
    assert bool(((alone - quant.matvec_reference(x, packed)).abs() <= _accumulation_bound(x, packed)).all())


@needs_c
@pytest.mark.parametrize("O, I", [(9, 768), (6, 77)])
def test_int8_weights_of_minus_128_are_exact_in_every_build_and_batch(O, I):
    """Our quantiser writes int8 values in [-127, 127], but a packed file may hold -128 (the check does
    not scan every value). Every kernel still computes it exactly: against the reference, one stream and
    every tile give the same bits, and the builds agree (the AVX2 sign step's -(-128) would wrap to
    -128 where x < 0, a silently wrong product)."""
    x, w = _data(17, O, I, seed=9)
    packed = quant.pack(w, "int8")
    q = packed.q.clone()
    q.view(-1)[::7] = -128                                     # every 7th value, where x is of either sign
    packed = type(packed)(q, packed.scale, packed.in_features).check()
    assert_exact_in_every_build_and_batch(quant.matvec_group, x, packed, quant.matvec_reference(x, packed),
                                          _accumulation_bound(x, packed), ISAS, (2, 3, 16, 17))


@needs_c
@pytest.mark.parametrize("isa", ISAS)
def test_int8_one_row_and_four_row_loops_give_the_same_bits(isa):
    """The 512-bit int8 single-stream loop walks 1 row at a time on every CPU (quant_ops.h's default;
    set_q8_rows(4) walks 4): the float order per row is the same, so each stream's outputs alone are
    bitwise the same either way, and the same as in a batch (the stream tiles); on AVX2 the setting is
    ignored."""
    from rwkv_kernels import cpu_c
    lib = cpu_c.ops(isa).lib
    assert lib.get_q8_rows() == 1
    x, w = _data(5, 131, 1000, seed=4)
    packed = quant.pack(w, "int8")
    before = lib.get_q8_rows()
    try:
        ys = []
        for rows in (1, 4):
            lib.set_q8_rows(rows)
            assert lib.get_q8_rows() == (rows if isa == "avx512" else 1)
            ys.append(torch.cat([quant.matvec_group([(x[b:b + 1].contiguous(), packed)], isa=isa)[0]
                                 for b in range(5)]))
        batched = quant.matvec_group([(x, packed)], isa=isa)[0]
    finally:
        lib.set_q8_rows(before)
    assert torch.equal(ys[0], ys[1]) and torch.equal(ys[0], batched)
    assert bool(((ys[0] - quant.matvec_reference(x, packed)).abs() <= _accumulation_bound(x, packed)).all())


@needs_c
@pytest.mark.parametrize("isa", ISAS)
def test_float32_row_prefetch_setting_gives_the_same_bits(isa):
    """The 512-bit build's float32 products below 4 streams prefetch each row 8 KB ahead on every CPU
    (quant_ops.h's default; set_f32_pf changes it); with or without, every stream's bits are the same,
    alone or with others (B from 1 to 5: below and past the 4 streams where the prefetch stops)."""
    from rwkv_kernels import cpu_c
    ops = cpu_c.ops(isa)
    lib = ops.lib
    if isa == "avx512":
        assert lib.get_f32_pf() == 8192
    else:
        assert lib.get_f32_pf() == -1                       # the AVX2 build's distance is fixed
    before = lib.get_f32_pf()
    x, w = _data(5, 133, 1000, seed=9)
    try:
        ys = []
        for setting in (0, 8192, 2048):
            lib.set_f32_pf(setting)
            if isa == "avx512":
                assert lib.get_f32_pf() == setting
            ys.append([ops.matvec_group([(x[:B].contiguous(), w)])[0] for B in range(1, 6)])
    finally:
        lib.set_f32_pf(max(before, 0))
    for run in ys:
        for B in range(1, 6):
            assert torch.equal(run[B - 1], ys[0][4][:B]), B
    ref = x.double() @ w.double().T
    assert torch.allclose(ys[0][4].double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@needs_c
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ["float16", "bfloat16"])
def test_16bit_one_row_and_four_row_loops_give_the_same_bits(isa, fmt):
    """The 512-bit 16-bit loop walks rows under 8 KB one at a time, prefetching 8 KB ahead, on every CPU
    (quant_ops.h's defaults; set_wide16 changes them, e.g. to 4 rows prefetching 2 KB ahead): the float
    order per row is the same, so the outputs are bitwise the same, for one stream and several; on AVX2
    the setting is ignored."""
    from rwkv_kernels import cpu_c
    lib = cpu_c.ops(isa).lib
    if isa == "avx512":
        assert (lib.get_wide16_one_row_below(), lib.get_wide16_pf()) == (8192, 8192)
    before = lib.get_wide16_one_row_below(), lib.get_wide16_pf()
    x, w = _data(5, 133, 1000, seed=7)
    packed = quant.pack(w, fmt)
    try:
        ys = []
        for setting in ((1 << 30, 0), (0, 2048), (1 << 30, 4096), (0, 0)):
            lib.set_wide16(*setting)
            if isa == "avx512":
                assert (lib.get_wide16_one_row_below(), lib.get_wide16_pf()) == setting
            ys.append(quant.matvec_group([(x, packed)], isa=isa)[0])
            ys.append(quant.matvec_group([(x[2:3].contiguous(), packed)], isa=isa)[0])
    finally:
        lib.set_wide16(*before)
    for k in range(2, len(ys), 2):
        assert torch.equal(ys[0], ys[k]) and torch.equal(ys[1], ys[k + 1])
    assert torch.equal(ys[1][0], ys[0][2])
    assert bool(((ys[0] - quant.matvec_reference(x, packed)).abs() <= _accumulation_bound(x, packed)).all())


@needs_c
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("B, I", [(1, 32), (4, 70), (3, 768)])
def test_activation_quantisation_matches_torch_exactly(isa, B, I):
    x = torch.randn(B, I) * torch.logspace(-2, 2, I)
    x[0, :min(I, 32)] = 0                                      # an all-zero block: scale 0, values 0
    q, d = quant.quantize_rows(x, isa=isa)
    q_ref, d_ref = quant.quantize_rows_reference(x)
    assert torch.equal(q, q_ref) and torch.equal(d, d_ref)


@needs_c
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", PACKED)
def test_dequantise_rows_is_exact(isa, fmt):
    _, w = _data(1, 50, 70)
    packed = quant.pack(w, fmt)
    out = torch.empty(30, 70)
    quant.dequantize_rows(packed, 10, 40, out, isa=isa)
    assert torch.equal(out, quant.dequantize(packed)[10:40])


@needs_c
@pytest.mark.parametrize("fmt", PACKED)
def test_gemm_in_slices_matches_the_dequantised_matrix(fmt, monkeypatch):
    x, w = _data(70, 300, 96)
    packed = quant.pack(w, fmt)
    monkeypatch.setattr(quant, "GEMM_SLICE", 64 * 96)          # several slices of 64 rows
    y = quant.gemm(x, packed)
    ref = quant.dequantized_linear(x, packed)
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# which build runs

def test_isa_choice_follows_the_cpu_flags(monkeypatch):
    zen3 = {"avx2", "fma", "f16c", "sse4_2"}
    zen4 = zen3 | {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16"}
    assert quant.supported_isas(zen3) == ["avx2"] and quant.best_isa(zen3) == "avx2"
    assert quant.supported_isas(zen4) == ["avx512", "avx2"] and quant.best_isa(zen4) == "avx512"
    assert quant.best_isa({"avx2", "fma"}) is None                 # no F16C: no build at all
    assert quant.best_isa(zen3 | {"avx512f"}) == "avx2"            # AVX-512F without VNNI/BW
    monkeypatch.setenv("RWKV_ENGINE_CPU_FEATURES", "avx2,fma,f16c")
    assert quant.cpu_features() == {"avx2", "fma", "f16c"} and quant.best_isa() == "avx2"


@needs_c
def test_each_build_is_cached_under_its_isa_and_runs_its_instructions():
    for isa in ISAS:
        lib = quant.library(isa)
        assert f"cpu_ops-{isa}-" in lib._name
        assert lib.isa_level() == {"avx2": 256, "avx512": 512}[isa]


def _python(code, **env):
    import os
    import subprocess
    import sys
    full = {k: v for k, v in os.environ.items() if not k.startswith("RWKV_ENGINE_") or k == "RWKV_ENGINE_CACHE"}
    return subprocess.run([sys.executable, "-W", "error::RuntimeWarning:rwkv_kernels.dispatch", "-c", code],
                          capture_output=True, text=True, env={**full, "PYTHONPATH": os.getcwd(), **env}, timeout=120)


@needs_c
def test_one_isa_choice_read_once_at_first_use_for_every_kernel():
    """The quant kernels and the other C kernels are one library with one ISA choice: the environment
    is read at the first use (not at import) and never again."""
    code = ("import os, torch, rwkv_kernels\nfrom rwkv_kernels import cpu_c, quant\n"
            "os.environ['RWKV_ENGINE_CPU_FEATURES'] = 'avx2,fma,f16c'      # after import: still counts\n"
            "x, w = torch.randn(2, 64), quant.pack(torch.randn(8, 64), 'int8')\n"
            "rwkv_kernels.linear(x, w)\n"
            "os.environ['RWKV_ENGINE_ISA'] = 'avx512'                      # after first use: ignored\n"
            "os.environ['RWKV_ENGINE_NO_C_KERNELS'] = '1'\n"
            "assert quant._lib() is cpu_c.ops().lib and cpu_c.available()\n"
            "print(cpu_c.ops().isa, quant._lib().isa_level())\n")
    r = _python(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["avx2", "256"]
    r = _python("import os, rwkv_kernels\nos.environ['RWKV_ENGINE_NO_C_KERNELS'] = '1'\n"
                "from rwkv_kernels import cpu_c\nprint(cpu_c.available())")
    assert r.returncode == 0 and r.stdout.split() == ["False"], r.stderr


# ---------------------------------------------------------------------------------------------
# rwkv_kernels.linear dispatches on the weight's type

@pytest.mark.parametrize("fmt", PACKED)
def test_linear_dispatch_decode_and_prompt_shapes(fmt):
    x, w = _data(4, 40, 96)
    packed = quant.pack(w, fmt)
    tol = _format_bound(x, w, fmt) + 1e-5
    exact = x @ w.T
    y = rwkv_kernels.linear(x, packed)                                # token mode: [B, C]
    assert y.shape == (4, 40) and bool(((y - exact).abs() <= tol).all())
    xs = torch.randn(2, 100, 96)                                 # a prompt: [B, T, C]
    assert_prompt_products(xs, packed, "quant_gemm")
    r, k = rwkv_kernels.linear_group((x, packed), (x, packed))
    assert torch.equal(r, k) and torch.equal(r, y)
    out = torch.ones(4, 40)
    rwkv_kernels.linear_accumulate_(x, packed, out)
    assert torch.allclose(out, 1 + y, atol=1e-6)


@pytest.mark.parametrize("I", [32, 300, 512, 768, 900, 1100, 3072])
def test_int8_interleaved_groups_put_each_dword_where_the_kernels_read_it(I):
    """formats.interleave_blocks against the layout written out by hand (csrc/quant_ops.h): in each row,
    group G of m <= 16 blocks at byte 512 G, dword g of its block l at byte 4 (g m + l); and back."""
    g = torch.Generator().manual_seed(I)
    w = torch.randn(3, I, generator=g)
    p = quant.pack(w, "int8")
    rows = p.rows()
    Ip = rows.shape[1]
    nb = Ip // 32
    want = torch.empty_like(rows)
    for j in range(nb):
        G, l = divmod(j, 16)
        m = min(16, nb - 16 * G)
        for d in range(8):
            at = 512 * G + 4 * (d * m + l)
            want[:, at:at + 4] = rows[:, 32 * j + 4 * d:32 * j + 4 * d + 4]
    assert torch.equal(p.q, want)
    assert torch.equal(formats.deinterleave_blocks(p.q), rows)
    assert torch.equal(p.dequantize(), (rows.float().view(3, nb, 32) * p.scale.float()[..., None]).view(3, Ip)[:, :I])
    # the values themselves are round(w / scale) in row order
    blocks = torch.nn.functional.pad(w, (0, Ip - I)).view(3, nb, 32)
    q_rows = (blocks / p.scale.float()[..., None]).round().clamp(-127, 127).to(torch.int8).view(3, Ip)
    assert torch.equal(q_rows, rows)
