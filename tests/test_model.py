"""Invariants of the forward pass and the state."""
import pytest
import torch

import rwkv_kernels
import rwkv_engine
from rwkv_kernels import cpu_c, dispatch
from rwkv_engine import State


def ids(B, T, vocab=1000, seed=0):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def test_sequence_mode_equals_token_mode(tiny_model):
    x = ids(2, 33)
    seq, s_seq = tiny_model.forward(x, all_logits=True)
    state = tiny_model.new_state(2)
    steps = []
    for t in range(33):
        logits, state = tiny_model.forward(x[:, t:t + 1], state)
        steps.append(logits)
    torch.testing.assert_close(torch.stack(steps, 1), seq, rtol=1e-5, atol=1e-5)
    for a, b in zip(state.tensors().values(), s_seq.tensors().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_chunked_prompt_with_carried_state_equals_one_call(tiny_model):
    x = ids(1, 50, seed=1)
    whole, s_whole = tiny_model.forward(x)
    state = tiny_model.new_state(1)
    for lo, hi in [(0, 17), (17, 18), (18, 50)]:
        logits, state = tiny_model.forward(x[:, lo:hi], state)
    torch.testing.assert_close(logits, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state.att_p, s_whole.att_p, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not cpu_c.available(), reason="C kernels unavailable")
def test_short_prompt_chunk_runs_the_c_products_and_matches_the_gemm(tiny_model, monkeypatch):
    """A chunk of at most dispatch.SHORT_ROWS rows streams the weights through the C products (no
    GEMM packing: its layers in the C sequence step, its head on the C linear kernel); the same chunk
    through the GEMM agrees, and with more rows in the call (a longer chunk holding it) each row's
    products are unchanged: the C products are row-invariant."""
    fn, needs = dispatch._impls[("linear", "c")]
    rows_seen = []

    def spy(pairs, out=None, accumulate=False):
        rows_seen.extend(x.shape[0] for x, _ in pairs)
        return fn(pairs, out, accumulate)
    monkeypatch.setitem(dispatch._impls, ("linear", "c"), (spy, needs))
    x = ids(1, 20, seed=3)
    short, s_short = tiny_model.forward(x, all_logits=True)
    assert 20 in rows_seen                                  # the head's product of 20 rows ran on the C kernel
    assert dispatch.choose("sequence_layers", ("cpu", "float32", "float32", "short")) == "c"
    with dispatch.force(linear="torch"):
        gemm, s_gemm = tiny_model.forward(x, all_logits=True)
    torch.testing.assert_close(short, gemm, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_short.att_a, s_gemm.att_a, rtol=1e-5, atol=1e-5)
    W = tiny_model.blocks[0].att_key
    xs = torch.randn(dispatch.SHORT_ROWS, W.shape[1], generator=torch.Generator().manual_seed(4))
    few = rwkv_kernels.linear(xs[None, :5], W)[0]
    many = rwkv_kernels.linear(xs[None], W)[0]
    assert torch.equal(few, many[:5])


def test_batched_streams_equal_streams_run_alone(tiny_model):
    x = ids(3, 12, seed=2)
    batched, state = tiny_model.forward(x)
    nxt = torch.tensor([[5], [6], [7]])
    batched2, _ = tiny_model.forward(nxt, state)
    for i in range(3):
        alone, s = tiny_model.forward(x[i:i + 1])
        alone2, _ = tiny_model.forward(nxt[i:i + 1], s)
        torch.testing.assert_close(batched[i], alone[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(batched2[i], alone2[0], rtol=1e-5, atol=1e-5)


def test_logits_shapes_and_list_input(tiny_model):
    logits, state = tiny_model.forward([1, 2, 3])
    assert logits.shape == (1, 1000) and logits.dtype == torch.float32
    all_logits, _ = tiny_model.forward(ids(2, 4), all_logits=True)
    assert all_logits.shape == (2, 4, 1000)
    assert isinstance(state, State) and state.att_a.dtype == torch.float32


def test_state_save_load_round_trip_is_bit_exact(tiny_model, tmp_path):
    _, state = tiny_model.forward(ids(2, 9))
    state.save(tmp_path / "s.safetensors")
    loaded = State.load(tmp_path / "s.safetensors")
    for k, v in state.tensors().items():
        assert torch.equal(v, getattr(loaded, k)) and v.dtype == getattr(loaded, k).dtype
    a, _ = tiny_model.forward(torch.tensor([[4], [4]]), state)
    b, _ = tiny_model.forward(torch.tensor([[4], [4]]), loaded)
    assert torch.equal(a, b)


def test_state_clone_select_reset(tiny_model):
    _, state = tiny_model.forward(ids(3, 6, seed=4))
    fork = state.clone()
    tiny_model.forward(torch.tensor([[1], [2], [3]]), state)          # advances state in place
    assert not torch.equal(fork.att_a, state.att_a)
    one = fork.select(1)
    assert one.batch_size == 1 and torch.equal(one.att_x[:, 0], fork.att_x[:, 1])
    fork.reset(0)
    fresh = tiny_model.new_state(1)
    for k, v in fork.tensors().items():
        assert torch.equal(v[:, 0], getattr(fresh, k)[:, 0])
        assert not torch.equal(v[:, 1], getattr(fresh, k)[:, 0])          # stream 1 untouched
    assert State.cat([one, one]).batch_size == 2
    with pytest.raises(IndexError, match="stream 5 out of range"):
        fork.select(5)


def test_state_load_rejects_other_files(tmp_path):
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="state keys"):
        State.load(tmp_path / "other.safetensors")
    (tmp_path / "junk").write_bytes(b"not a state")
    with pytest.raises(ValueError, match="not a saved state"):
        State.load(tmp_path / "junk")


@pytest.mark.parametrize("bad, message", [
    (torch.tensor([[1000]]), "token id 1000 out of range"),
    (torch.tensor([[-1]]), "token id -1 out of range"),
    (torch.zeros(1, 0, dtype=torch.long), "shape \\[B, T\\] with B, T >= 1"),
    (torch.tensor([[1.5]]), "tokens must be a LongTensor"),
])
def test_bad_tokens(tiny_model, bad, message):
    with pytest.raises(ValueError, match=message):
        tiny_model.forward(bad)


def test_state_of_wrong_batch_is_rejected(tiny_model):
    with pytest.raises(ValueError, match="expected \\[3, 2, 96\\] for 2 streams"):
        tiny_model.forward(ids(2, 3), tiny_model.new_state(1))


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model name 'rwkv-4-pile-999m'"):
        rwkv_engine.load("rwkv-4-pile-999m")


def test_registered_name_loads_synthetic_weights_and_says_so():
    m = rwkv_engine.load("rwkv-4-tiny")
    assert m.synthetic and "synthetic" in repr(m)
    again = rwkv_engine.load("rwkv-4-tiny")                            # reused from the cache
    assert again.source == m.source
    assert torch.equal(again.head, m.head)


def test_16bit_weights_on_cpu_stay_close_to_fp32(tiny_pth, tiny_model):
    x = ids(1, 20, seed=5)
    ref, _ = tiny_model.forward(x)
    bf, _ = rwkv_engine.load(str(tiny_pth), dtype="bfloat16").forward(x)
    assert bf.dtype == torch.float32
    assert float((bf - ref).abs().max()) < 0.1 * float(ref.abs().max())


def test_float16_rescaling_keeps_a_growing_residual_finite():
    """Output matrices scaled up make the residual stream exceed float16's 65504: without the
    rescale the logits overflow; halving x every 2 layers (weights scaled to match) keeps them
    finite and equal to the float32 model's, since the final LayerNorm removes the scale."""
    from rwkv_engine.checkpoint import synthetic_state_dict
    from rwkv_engine.config import RWKVConfig
    from rwkv_engine.model import RWKV
    cfg = RWKVConfig(n_layer=12, n_embd=32, vocab_size=100)
    sd = {k: (v * 1e4 if k.endswith(("ffn.value.weight", "att.output.weight")) else v)
          for k, v in synthetic_state_dict(cfg, seed=2).items()}
    x = ids(1, 200, vocab=100)
    ref, _ = RWKV(cfg, sd).forward(x, all_logits=True)
    plain, _ = RWKV(cfg, sd, dtype="float16", rescale_every=0).forward(x, all_logits=True)
    assert not torch.isfinite(plain).all()
    scaled, _ = RWKV(cfg, sd, dtype="float16", rescale_every=2).forward(x, all_logits=True)
    assert torch.isfinite(scaled).all()
    assert float((scaled - ref).abs().max()) < 0.05
    assert RWKV(cfg, sd, dtype="float16").rescale_every == 6 and RWKV(cfg, sd).rescale_every == 0


def test_engine_with_triton_wkv_matches_cpu_path(tiny_pth, tiny_model):
    """The engine's CUDA code path (Triton WKV for sequences and decode steps, state updated in
    place) run here through Triton's interpreter on CPU tensors."""
    pytest.importorskip("triton")
    triton_model = rwkv_engine.load(str(tiny_pth))
    triton_model.wkv_backend = "triton"
    x = ids(2, 12, seed=9)
    ref, s_ref = tiny_model.forward(x)
    got, s_got = triton_model.forward(x)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for _ in range(3):
        ref, s_ref = tiny_model.forward(torch.tensor([[3], [4]]), s_ref)
        got, s_got = triton_model.forward(torch.tensor([[3], [4]]), s_got)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_got.att_p, s_ref.att_p, rtol=1e-5, atol=1e-5)


def test_load_options_build_the_same_model_as_the_keywords(tiny_pth):
    """rwkv_engine.load, RWKV and the pipeline take one LoadOptions; the keyword API stays."""
    import dataclasses
    from rwkv_engine import LoadOptions
    from rwkv_engine.checkpoint import synthetic_state_dict
    from rwkv_engine.model import RWKV
    x = ids(1, 9)
    by_keywords = rwkv_engine.load(str(tiny_pth), dtype="bfloat16", rescale_every=3)
    by_options = rwkv_engine.load(str(tiny_pth), options=LoadOptions(dtype="bfloat16", rescale_every=3))
    assert by_options.dtype == torch.bfloat16 and by_options.rescale_every == 3 and by_options.source == str(tiny_pth)
    assert torch.equal(by_keywords.forward(x)[0], by_options.forward(x)[0])
    with pytest.raises(TypeError, match="either options= or"):
        rwkv_engine.load(str(tiny_pth), dtype="float16", options=LoadOptions())
    with pytest.raises(dataclasses.FrozenInstanceError):
        LoadOptions().dtype = "float16"
    with pytest.raises(ValueError, match="rescale_every must be an int >= 0"):
        LoadOptions(rescale_every=-1)
    cfg = by_keywords.config
    sd = synthetic_state_dict(cfg, seed=4)
    a, b = RWKV(cfg, sd, LoadOptions(layers=range(0, 1))), RWKV(cfg, sd, layers=range(0, 1))
    assert a.layers == b.layers == range(0, 1) and len(a.blocks) == 1
    with pytest.raises(TypeError, match="either options= or layers"):
        RWKV(cfg, sd, LoadOptions(), layers=range(0, 1))
    with pytest.raises(TypeError, match="options must be a rwkv_engine.LoadOptions"):
        RWKV(cfg, sd, "cpu")
