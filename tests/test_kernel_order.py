"""The decode kernels' arithmetic, bit for bit, on every instruction-set build this machine runs:
  * int8: the float order documented in csrc/quant_ops.h (dotn_q8), emulated here with exact integer
    block dots and correctly rounded float32 operations, must equal every build's result exactly; so
    the AVX2 and AVX-512 builds (which run the same order by construction) give identical int8 results;
  * a simulated AVX2-only CPU (RWKV_ENGINE_CPU_FEATURES) gets the AVX2 build and the same int8 bits;
  * 16-bit: a product is the float32 kernel's product of its widened weights, bit for bit;
  * batch invariance at odd shapes (rows not a multiple of the 4-row tile, inputs not a multiple of 32 or
    of the vector width, B from 1 past every stream tile) for every format, thread counts 1 and 2."""
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from rwkv_kernels import cpu_c, quant

REPO = Path(__file__).resolve().parent.parent
ISAS = quant.supported_isas() if cpu_c.available() else []
needs_c = pytest.mark.skipif(not ISAS, reason="no C compiler / AVX2 here")
f32 = np.float32


def _round32(q):
    """The float32 nearest to the rational q (ties to even): what one IEEE float32 operation returns."""
    f = f32(float(q))                                            # may be off by one ulp (double rounding)
    best = None
    for c in (np.nextafter(f, f32(-np.inf)), f, np.nextafter(f, f32(np.inf))):
        d = abs(Fraction(float(c)) - q)
        even = int(np.array(c, dtype=np.float32).view(np.int32)) % 2 == 0
        if best is None or d < best[0] or (d == best[0] and even):
            best = (d, c)
    return best[1]


def _fma32(a, b, c):
    return _round32(Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c)))


def _hsum8(v):
    """((v0 + v4) + (v2 + v6)) + ((v1 + v5) + (v3 + v7)) in float32"""
    u = [f32(v[k] + v[k + 4]) for k in range(4)]
    return f32(f32(u[0] + u[2]) + f32(u[1] + u[3]))


def int8_emulated(x, w):
    """y [B, O] float32 by the int8 kernel's documented order (csrc/quant_ops.h, "int8 blocks"): per row,
    16 lane accumulators, block j going to lane j mod 16 in order of j, each block's exact integer dot
    times its rounded scale product sw_j * dx_j fused into its lane; then hsum8 of lanes 0-7 + 8-15."""
    qx, dx = quant.quantize_rows_reference(x)
    qx, dx = qx.numpy().astype(np.int64), dx.numpy().astype(np.float32)
    qw, sw = w.rows().numpy().astype(np.int64), w.scale.float().numpy().astype(np.float32)
    B, O, nb = x.shape[0], qw.shape[0], qw.shape[1] // 32
    y = np.zeros((B, O), dtype=np.float32)
    for b in range(B):
        for o in range(O):
            dots = (qx[b].reshape(nb, 32) * qw[o].reshape(nb, 32)).sum(-1)      # exact integers
            acc = [f32(0)] * 16
            for j in range(nb):
                acc[j % 16] = _fma32(dots[j], f32(sw[o, j] * dx[b, j]), acc[j % 16])
            y[b, o] = _hsum8([f32(acc[k] + acc[k + 8]) for k in range(8)])
    return torch.from_numpy(y)


# nb = 1, 3, 9, 10, 16 (one whole group of 16), 20, 24 (a last group of 8), 29 (of 13), 35 (of 3);
# O not multiples of 4; B past the 4-stream tile
SHAPES = [(2, 3, 1), (3, 5, 70), (1, 7, 288), (2, 6, 300), (1, 9, 512), (4, 2, 640), (5, 6, 768), (6, 5, 900),
          (3, 4, 1100)]


@needs_c
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("B, O, I", SHAPES)
def test_int8_kernel_follows_its_documented_float_order_exactly(isa, B, O, I):
    g = torch.Generator().manual_seed(O * I)
    x = torch.randn(B, I, generator=g) * torch.logspace(-1, 1, I)
    w = quant.pack(torch.randn(O, I, generator=g), "int8")
    y = quant.matvec_group([(x, w)], isa=isa)[0]
    assert torch.equal(y, int8_emulated(x, w))


def test_the_emulation_is_the_int8_product():
    """The emulation itself against the float64 reference (so the test above checks the right thing)."""
    x, wf = torch.randn(3, 300), torch.randn(6, 300)
    w = quant.pack(wf, "int8")
    ref = quant.matvec_reference(x, w)
    assert torch.allclose(int8_emulated(x, w), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@needs_c
def test_simulated_avx2_only_cpu_gives_the_same_int8_bits(tmp_path):
    """A process that sees only AVX2/FMA/F16C runs the AVX2 build; its int8 results equal this process's
    default build (on an AVX-512 machine: the two builds agree bit for bit)."""
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(5, 300, generator=g), quant.pack(torch.randn(37, 300, generator=g), "int8")
    torch.save({"x": x, "q": w.q, "s": w.scale}, tmp_path / "in.pt")
    code = ("import sys, torch; from rwkv_kernels import quant; d = torch.load(sys.argv[1]); "
            "w = quant.Int8Weight(d['q'], d['s'], 300); assert quant._lib().isa_level() == 256; "
            "torch.save(quant.matvec_group([(d['x'], w)])[0], sys.argv[2])")
    env = {**os.environ, "RWKV_ENGINE_CPU_FEATURES": "avx2,fma,f16c"}
    env.pop("RWKV_ENGINE_ISA", None)
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    avx2 = torch.load(tmp_path / "out.pt")
    for isa in ISAS:
        assert torch.equal(quant.matvec_group([(x, w)], isa=isa)[0], avx2), isa


def _product(fmt, isa):
    if fmt == "float32":
        ops = cpu_c.ops(isa)
        return lambda x, w: ops.matvec_group([(x, w)])[0]
    return lambda x, w: quant.matvec_group([(x, w)], isa=isa)[0]


@needs_c
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ["float32", "float16", "bfloat16", "int8"])
@pytest.mark.parametrize("O, I", [(13, 300), (6, 37), (1, 33)])
@pytest.mark.parametrize("threads", [1, 2])
def test_each_stream_is_bit_identical_alone_and_in_a_batch_of_17(isa, fmt, O, I, threads):
    g = torch.Generator().manual_seed(O + I)
    w = quant.pack(torch.randn(O, I, generator=g) / I ** 0.5, fmt)
    xs = torch.randn(17, I, generator=g)
    run = _product(fmt, isa)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        batched = run(xs, w)
        for B in range(1, 18):                                   # 1 past every stream tile (4, 3, 2, 1)
            part = run(xs[:B].contiguous(), w)
            assert torch.equal(part, batched[:B]), B
        for b in (0, 5, 16):
            assert torch.equal(run(xs[b:b + 1].contiguous(), w)[0], batched[b]), b
    finally:
        torch.set_num_threads(saved)
    ref = quant.matvec_reference(xs, w)
    assert torch.allclose(batched, ref, rtol=1e-4, atol=1e-4 * (1 + float(ref.abs().max())))


# rows below and above the 8 KB (4096 16-bit weights) where AMD's 512-bit build walks a single stream's
# rows one at a time; inputs not a multiple of 8 or 16 (the zero-padded last block); B past every tile
WIDENED_SHAPES = [(1, 7, 300), (1, 5, 37), (2, 9, 70), (3, 6, 1100), (4, 5, 15), (5, 13, 768), (17, 6, 300),
                  (1, 6, 4100), (6, 5, 4100)]


@needs_c
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ["float16", "bfloat16"])
@pytest.mark.parametrize("B, O, I", WIDENED_SHAPES)
def test_a_16bit_product_is_the_float32_product_of_its_widened_weights_bit_for_bit(isa, fmt, B, O, I):
    """The 16-bit loops are the float32 tiles with each weight widened (exactly) in registers: the same
    float order, so the same bits as the float32 kernel run on `w.float()`, in every build."""
    g = torch.Generator().manual_seed(B * O * I)
    w = quant.pack(torch.randn(O, I, generator=g) / I ** 0.5, fmt)
    x = torch.randn(B, I, generator=g) * torch.logspace(-1, 1, I)
    y16 = _product(fmt, isa)(x, w)
    y32 = _product("float32", isa)(x, w.float())
    assert torch.equal(y16, y32)
