"""The dispatch table: what it picks, forcing and `backend=`, unsupported devices, the one warning
when the C build fails, CPU-feature detection per ISA, and the model following the table in both
modes (token-mode batch invariance included)."""
import os
import subprocess
import sys

import pytest
import torch

import rwkv_kernels
import rwkv_engine
from rwkv_kernels import cpu_c, dispatch, formats

needs_c = pytest.mark.skipif(not cpu_c.available(), reason=f"C kernels unavailable: {cpu_c.unavailable_reason()}")


def linear_key(x, w):
    fmt = dispatch.format_name(w)
    return dispatch.device_of(x, w), dispatch.dtype_name(x.dtype), fmt, dispatch.product_shape(x, fmt)


@needs_c
def test_table_picks_by_shape_dtype_and_format():
    W = torch.randn(8, 16)
    assert dispatch.choose("linear", linear_key(torch.randn(3, 16), W)) == "c"          # token, [B, in]
    assert dispatch.choose("linear", linear_key(torch.randn(40, 1, 16), W)) == "c"      # token, [B, 1, in]
    assert dispatch.choose("linear", linear_key(torch.randn(2, 5, 16), W)) == "c"       # 10 prompt rows: short
    S = dispatch.SHORT_ROWS
    assert dispatch.choose("linear", linear_key(torch.randn(1, S, 16), W)) == "c"       # SHORT_ROWS rows: still short
    assert dispatch.choose("linear", linear_key(torch.randn(1, S + 1, 16), W)) == "torch"   # a prompt: GEMM
    assert dispatch.choose("linear", linear_key(torch.randn(2, S // 2 + 1, 16), W)) == "torch"  # S + 2 rows
    assert dispatch.choose("linear", linear_key(torch.randn(3, 16).half(), W.half())) == "torch"
    for fmt in ("float16", "bfloat16", "int8"):
        assert dispatch.choose("linear", ("cpu", "float32", fmt, "short")) == "quant_c"
        assert dispatch.choose("linear", ("cpu", "float32", fmt, "sequence")) == "quant_gemm"
    assert dispatch.choose("wkv", ("cpu", "float32", "-", "*")) == "c"
    assert dispatch.choose("sample_rows", ("cpu", "float32", "-", "contiguous")) == "c"
    assert dispatch.choose("sample_rows", ("cuda", "float32", "-", "contiguous")) == "reference"
    assert dispatch.choose("wkv", ("cuda", "float16", "-", "*")) == "triton"
    assert dispatch.choose("ln_shift_mix", ("cpu", "float32", "-", "strided")) == "reference"
    assert dispatch.choose("ln_shift_mix", ("cpu", "mixed", "-", "contiguous")) == "reference"


def test_weight_format_of_tensors_and_packed_objects():
    class Packed:
        format = "int8"
    assert dispatch.format_name(torch.zeros(2, 2, dtype=torch.bfloat16)) == "bfloat16"
    assert dispatch.format_name(Packed()) == "int8"


def test_unknown_combination_and_backend_are_clear_errors():
    class Packed:
        shape, device, dtype = (3, 4), torch.device("cpu"), torch.int8
    record = formats.WeightFormat("int4", None, 0.5, torch.float16, pack=None, dequantize=None, reference=None,
                                  serves=(formats.Serve("cpu", "float32", "*", "int4_missing"),), packed_type=Packed)
    formats.register(record)
    try:
        rule = dispatch.Rule("linear", "cpu", "float32", "int4", "*", "int4_missing")
        assert dispatch.TABLE.index(rule) < next(i for i, r in enumerate(dispatch.TABLE)
                                                  if r.op == "linear" and r.device == "*")
        with pytest.raises(ValueError, match="linear implementation 'int4_missing' is not registered"):
            rwkv_kernels.linear(torch.randn(2, 4), Packed())
    finally:
        formats.unregister("int4")
    assert not any(r.weights == "int4" for r in dispatch.TABLE)
    with pytest.raises(ValueError, match="no wkv implementation for cpu/float32/-/x"):
        saved = list(dispatch.TABLE)
        dispatch.TABLE[:] = [r for r in saved if r.op != "wkv"]
        try:
            dispatch.choose("wkv", ("cpu", "float32", "-", "x"))
        finally:
            dispatch.TABLE[:] = saved
    with pytest.raises(ValueError, match="unknown linear backend 'gpu'"):
        rwkv_kernels.linear(torch.randn(2, 4), torch.randn(3, 4), backend="gpu")
    with pytest.raises(ValueError, match="unknown op 'nope'"):
        with dispatch.force(nope="c"):
            pass


@pytest.mark.parametrize("device", ["meta"])
def test_unsupported_device_raises_before_any_kernel(device):
    x, W = torch.empty(1, 8, device=device), torch.empty(4, 8, device=device)
    with pytest.raises(ValueError, match="device 'meta' are not supported"):
        rwkv_kernels.linear(x, W)
    with pytest.raises(ValueError, match="device 'meta'"):
        rwkv_kernels.wkv_step_gated(*(torch.empty(8, device=device),) * 2, *(torch.empty(1, 8, device=device),) * 6)
    with pytest.raises(ValueError, match="device 'meta'"):
        rwkv_kernels.wkv(torch.empty(8, device=device), torch.empty(8, device=device),
                    torch.empty(1, 2, 8, device=device), torch.empty(1, 2, 8, device=device))


@needs_c
def test_force_and_backend_select_the_implementation(monkeypatch):
    calls = []
    spy = lambda pairs, out=None, accumulate=False: calls.append(len(pairs)) or \
        rwkv_kernels.linear.__globals__["linear_reference_impl"](pairs, out, accumulate)
    x, W = torch.randn(2, 16), torch.randn(8, 16)
    with dispatch.registered("linear", "spy", spy):
        with dispatch.force(linear="spy"):
            assert dispatch.choose("linear", linear_key(x, W)) == "spy"
            y = rwkv_kernels.linear(x, W)
            rwkv_kernels.linear_group((x, W), (x, W))
        assert calls == [1, 2]                                  # a group is one call of the implementation
        assert dispatch.choose("linear", linear_key(x, W)) == "c"   # restored after the block
        torch.testing.assert_close(y, x @ W.T)
        assert rwkv_kernels.linear(x, W, backend="spy") is not None and calls == [1, 2, 1]
    with pytest.raises(ValueError, match="unknown linear backend 'spy'"):       # gone after its block
        rwkv_kernels.linear(x, W, backend="spy")


def test_a_registration_lasts_its_block_only():
    """`registered` puts back what the name meant before (another callable, or nothing), even when the
    block raises; what decides (`registrations`) is then as it was."""
    before = dispatch.registrations()
    real = dispatch.implementation("wkv_step", "reference")
    spy = lambda *a: real(*a)
    with pytest.raises(RuntimeError, match="inside"):
        with dispatch.registered("wkv_step", "reference", spy), dispatch.registered("wkv_step", "spy", spy):
            assert dispatch.implementation("wkv_step", "reference") is spy
            assert dispatch.registrations() != before
            raise RuntimeError("inside")
    assert dispatch.implementation("wkv_step", "reference") is real
    assert dispatch.registrations() == before
    with pytest.raises(ValueError, match="wkv_step implementation 'spy' is not registered"):
        dispatch.unregister_impl("wkv_step", "spy")


def test_linear_entry_points_agree_across_implementations():
    x3, x2, W = torch.randn(2, 3, 33), torch.randn(5, 33), torch.randn(19, 33)
    for backend in ["torch", "reference"] + (["c"] if cpu_c.available() else []):
        torch.testing.assert_close(rwkv_kernels.linear(x3, W, backend=backend), x3 @ W.T, rtol=1e-5, atol=1e-4)
        out = torch.randn(5, 19)
        want = out + x2 @ W.T
        rwkv_kernels.linear_accumulate_(x2, W, out, backend=backend)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-4)
        a, b = rwkv_kernels.linear_group((x2, W), (x3, W), backend=backend)
        torch.testing.assert_close(b, x3 @ W.T, rtol=1e-5, atol=1e-4)


def run_python(code, **env):
    full = {**os.environ, "PYTHONPATH": os.getcwd(), **env}
    return subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True,
                          env=full, timeout=120)


def test_failed_c_build_warns_once_and_falls_back(tmp_path):
    code = ("import torch, rwkv_kernels\n"
            "x, W = torch.randn(2, 16), torch.randn(8, 16)\n"
            "for _ in range(3): assert torch.allclose(rwkv_kernels.linear(x, W), x @ W.T, atol=1e-5)\n"
            "rwkv_kernels.relu_square_(torch.randn(4))\n"
            "print(rwkv_kernels.dispatch.choose('linear', ('cpu', 'float32', 'float32', 'token')))\n")
    r = run_python(code, CC="/bin/false", RWKV_ENGINE_CACHE=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "torch"
    assert r.stderr.count("C CPU kernels are unavailable") == 1, r.stderr
    assert "false failed on cpu_ops.c" in r.stderr


def test_cpu_features_are_read_and_can_be_simulated(monkeypatch):
    real = cpu_c.cpu_features()
    monkeypatch.setenv("RWKV_ENGINE_CPU_FEATURES", "sse2,avx2,fma,f16c")
    assert cpu_c.supported_isas() == ["avx2"]
    monkeypatch.setenv("RWKV_ENGINE_CPU_FEATURES", "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512_vnni")
    assert cpu_c.supported_isas() == ["avx512", "avx2"]
    monkeypatch.setenv("RWKV_ENGINE_ISA", "avx2")
    assert cpu_c.best_isa() == "avx2"
    monkeypatch.setenv("RWKV_ENGINE_CPU_FEATURES", "sse2")
    assert cpu_c.supported_isas() == [] and cpu_c.best_isa() is None
    monkeypatch.setenv("RWKV_ENGINE_ISA", "avx9")
    with pytest.raises(ValueError, match="RWKV_ENGINE_ISA='avx9'"):
        cpu_c.best_isa()
    monkeypatch.delenv("RWKV_ENGINE_CPU_FEATURES")
    monkeypatch.delenv("RWKV_ENGINE_ISA")
    assert cpu_c.cpu_features() == real
    if os.path.exists("/proc/cpuinfo") and "avx2" in open("/proc/cpuinfo").read():
        assert "avx2" in real and "avx2" in cpu_c.supported_isas()


def test_build_refuses_an_isa_the_cpu_lacks(monkeypatch):
    monkeypatch.setenv("RWKV_ENGINE_CPU_FEATURES", "avx2,fma,f16c")
    with pytest.raises(cpu_c.BuildError, match="lacks avx512"):
        cpu_c.build.__wrapped__(cpu_c.SOURCE, "avx512")
    with pytest.raises(ValueError, match="unknown ISA level 'sse'"):
        cpu_c.build.__wrapped__(cpu_c.SOURCE, "sse")


@needs_c
def test_simulated_avx2_machine_runs_the_avx2_build(tmp_path):
    code = ("import torch, rwkv_kernels\nfrom rwkv_kernels import cpu_c\n"
            "x, W = torch.randn(3, 37), torch.randn(9, 37)\n"
            "assert torch.allclose(rwkv_kernels.linear(x, W), x @ W.T, atol=1e-4)\n"
            "print(cpu_c.ops().isa, sorted(p.name.split('-')[1] for p in (cpu_c._cache_dir()).glob('*.so')))\n")
    r = run_python(code, RWKV_ENGINE_CPU_FEATURES="avx2,fma,f16c", RWKV_ENGINE_CACHE=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["avx2", "['avx2']"]


# -- the model follows the table in both modes -----------------------------------------------------

def test_token_mode_follows_the_models_wkv_backend(tiny_model, monkeypatch):
    """`RWKV.wkv_backend` reaches the decode step too (the Triton test in test_model.py relies on it)."""
    seen = []
    real = dispatch.implementation("wkv_step", "reference")
    with dispatch.registered("wkv_step", "reference", lambda *a: seen.append(1) or real(*a)):
        try:
            ref, s_ref = tiny_model.forward(torch.tensor([[5], [6]]))
            tiny_model.wkv_backend = "reference"
            got, s_got = tiny_model.forward(torch.tensor([[5], [6]]))
        finally:
            tiny_model.wkv_backend = None
    assert len(seen) == tiny_model.config.n_layer
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_model_with_every_op_forced_to_its_reference_matches(tiny_model):
    x = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    want, s_want = tiny_model.forward(x)
    want_step, _ = tiny_model.forward(torch.tensor([[9], [10]]), s_want)
    refs = dict(linear="reference", wkv="reference", wkv_step="reference", wkv_step_gated="composed",
                ln_shift_mix="reference", relu_square_="reference", add_gated_="reference")
    with dispatch.force(**refs):
        got, s_got = tiny_model.forward(x)
        got_step, _ = tiny_model.forward(torch.tensor([[9], [10]]), s_got)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_step, want_step, rtol=1e-4, atol=1e-4)


@needs_c
@pytest.mark.parametrize("B", [5, 17, 33])
def test_model_decode_step_is_batch_invariant(tiny_model, B):
    """A stream's logits and state are bit-identical decoded alone or inside a batch of B streams."""
    g = torch.Generator().manual_seed(B)
    prompts = torch.randint(0, tiny_model.vocab_size, (B, 6), generator=g)
    _, states = tiny_model.forward(prompts)
    nxt = torch.randint(0, tiny_model.vocab_size, (B, 1), generator=g)
    for j in (0, B // 2, B - 1):
        alone, s_alone = tiny_model.forward(nxt[j:j + 1], states.select(j))
        batch, s_batch = tiny_model.forward(nxt, states.clone())
        assert torch.equal(batch[j], alone[0]), j
        assert torch.equal(s_batch.att_p[:, j], s_alone.att_p[:, 0])
        assert torch.equal(s_batch.ffn_x[:, j], s_alone.ffn_x[:, 0])


def test_model_on_meta_device_raises_instead_of_crashing():
    """Issue 9 point 4, kernel side: a model whose tensors are on `meta` reaches the dispatch table in
    both modes and gets a ValueError there (before, the C WKV got a null pointer and segfaulted)."""
    from rwkv_engine.checkpoint import synthetic_state_dict
    from rwkv_engine.config import RWKVConfig
    from rwkv_engine.model import RWKV
    cfg = RWKVConfig(n_layer=2, n_embd=32, vocab_size=100, name="")
    model = RWKV(cfg, synthetic_state_dict(cfg, seed=1), device="meta")
    for tokens in ([[1]], [[1, 2, 3]]):
        with pytest.raises(ValueError, match="device 'meta' are not supported"):
            model.forward(torch.tensor(tokens))
