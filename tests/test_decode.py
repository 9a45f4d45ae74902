"""rwkv_kernels.decode_layers: a whole decode step through the layers in one C call, against the same step
composed of the model's ops (dispatched one by one), for every weight format and every
instruction-set build this machine runs; and when dispatch must not take the C path."""
import time
import warnings

import pytest
import torch

import rwkv_kernels
import rwkv_engine
from rwkv_kernels import cpu_c, decode, dispatch, formats
from rwkv_engine.checkpoint import synthetic_state_dict
from rwkv_engine.config import RWKVConfig

needs_c = pytest.mark.skipif(not cpu_c.available(), reason=f"C kernels unavailable: {cpu_c.unavailable_reason()}")
FORMATS = tuple(formats.c_codes())      # every format the C step takes: float32 ... int8, q5_0, q4_1, +cols


def _model(fmt, n_embd=40, rescale_every=0, seed=3):
    """n_embd 40: not a multiple of any vector width (16, 8) nor of the int8 block (32)."""
    cfg = RWKVConfig(n_layer=3, n_embd=n_embd, vocab_size=300, name="")
    sd = synthetic_state_dict(cfg, seed=seed)
    return rwkv_engine.RWKV(cfg, sd, weights=None if fmt == "float32" else fmt, rescale_every=rescale_every)


def _run(model, tokens, impl, isa=None):
    """Decode tokens [B, T] one step at a time; -> (logits [T, B, V], final state)."""
    state, out = model.new_state(tokens.shape[0]), []
    for t in range(tokens.shape[1]):
        x = model.embed(tokens[:, t:t + 1])
        s5 = (state.att_x, state.att_a, state.att_b, state.att_p, state.ffn_x)
        if impl == "c":
            x = decode.decode_layers_c(model._decode, x, s5, isa=isa)
        else:
            with dispatch.force(decode_layers="composed"):
                x = rwkv_kernels.decode_layers(model._decode, x, s5)
        out.append(model.head_logits(x))
    return torch.stack(out), state


@needs_c
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("B", [1, 3, 5])
def test_fused_step_is_bit_identical_to_the_composed_ops(fmt, B):
    """Same kernels in the same order: every logit and every state value identical, over 6 steps."""
    model = _model(fmt)
    tokens = torch.randint(0, 300, (B, 6))
    got, s_got = _run(model, tokens, "c")
    want, s_want = _run(model, tokens, "composed")
    assert torch.equal(got, want)
    for name, t in s_got.tensors().items():
        assert torch.equal(t, s_want.tensors()[name]), name


@needs_c
@pytest.mark.parametrize("fmt", [f for f in FORMATS if formats.get(f).dtype is None])
def test_fused_step_is_batch_invariant(fmt):
    """A stream's logits and state from the C step are the same bits alone as in a batch of 5."""
    model = _model(fmt)
    tokens = torch.randint(0, 300, (5, 4), generator=torch.Generator().manual_seed(1))
    batched, s_batched = _run(model, tokens, "c")
    for b in (0, 3):
        alone, s_alone = _run(model, tokens[b:b + 1], "c")
        assert torch.equal(alone[:, 0], batched[:, b])
        for name, t in s_alone.tensors().items():
            assert torch.equal(t[:, 0], s_batched.tensors()[name][:, b]), name


@needs_c
def test_the_low_bit_formats_take_the_c_step():
    for fmt in ("q5_0", "q4_1", "q5_0+cols", "q4_1+cols", "int8+cols"):
        assert dispatch.choose("decode_layers", ("cpu", "float32", fmt, "contiguous")) == "c"


@needs_c
def test_fused_step_honours_rescale_every():
    model = _model("float32", rescale_every=2)
    tokens = torch.randint(0, 300, (2, 4))
    assert torch.equal(_run(model, tokens, "c")[0], _run(model, tokens, "composed")[0])


@needs_c
@pytest.mark.parametrize("isa", cpu_c.supported_isas())
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_isa_build_agrees_with_the_torch_reference(isa, fmt):
    """Each instruction-set build (AVX2 on every x86-64-v3 CPU, AVX-512 where present) against the
    step composed of the torch references (dispatch.force: reference products and element-wise ops)."""
    model = _model(fmt, n_embd=72)
    tokens = torch.randint(0, 300, (2, 5))
    got, _ = _run(model, tokens, "c", isa=isa)
    refs = dict(linear="quant_torch" if fmt != "float32" else "reference", ln_shift_mix="reference",
                wkv_step_gated="composed", relu_square_="reference", add_gated_="reference")
    with dispatch.force(**refs):
        want, _ = _run(model, tokens, "composed")
    tol = 2e-5 if formats.get(fmt).dtype is not None else 5e-2      # the block formats: x is quantised too
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * float(want.abs().max()))


@needs_c
def test_model_token_mode_runs_the_whole_step_in_one_call(monkeypatch):
    """Token mode on the CPU is one decode_token C call: neither the layers' own step nor the head's
    product runs beside it."""
    model = _model("int8")
    calls = []
    real = decode.decode_token_c
    monkeypatch.setitem(dispatch._impls, ("decode_token", "c"),
                        (lambda *a, **k: calls.append(1) or real(*a, **k), True))
    for op in ("decode_layers", "linear"):
        for name in [n for o, n in dispatch._impls if o == op]:
            monkeypatch.setitem(dispatch._impls, (op, name), (lambda *a, _op=op, **k: pytest.fail(f"{_op} ran"),
                                                             dispatch._impls[(op, name)][1]))
    dispatch._choice_cache.clear()
    logits, _ = model.forward(torch.tensor([[5], [7]]))
    assert calls == [1] and logits.shape == (2, 300)


def _run_tokens(model, tokens, impl, isa=None):
    """model.forward one token at a time through decode_token's `impl`; -> (logits [T, B, V], state)."""
    state, out = model.new_state(tokens.shape[0]), []
    for t in range(tokens.shape[1]):
        s5 = (state.att_x, state.att_a, state.att_b, state.att_p, state.ffn_x)
        if impl == "c":
            out.append(decode.decode_token_c(model._token_step, tokens[:, t:t + 1], s5, isa=isa))
        else:
            with dispatch.force(decode_token=impl):
                out.append(model.forward(tokens[:, t:t + 1], state)[0])
    return torch.stack(out), state


@needs_c
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("B", [1, 3])
def test_whole_token_step_is_bit_identical_to_the_composed_ops(fmt, B):
    """decode_token in C (the embedding rows widened from the format's 16-bit table, the layers, the final
    LayerNorm, the head) against the same step as the model's ops: every logit and state value."""
    model = _model(fmt)
    assert isinstance(model.emb, torch.Tensor) and model.emb.dtype == formats.get(fmt).embedding_dtype
    tokens = torch.randint(0, 300, (B, 5), generator=torch.Generator().manual_seed(B))
    got, s_got = _run_tokens(model, tokens, "c")
    want, s_want = _run_tokens(model, tokens, "composed")
    assert torch.equal(got, want)
    for name, t in s_got.tensors().items():
        assert torch.equal(t, s_want.tensors()[name]), name
    # and the per-piece path the pipeline stages run (embed, run_blocks, head_logits) has the same bits
    assert torch.equal(got, _run(model, tokens, "c")[0])


@needs_c
@pytest.mark.parametrize("isa", cpu_c.supported_isas())
def test_whole_token_step_with_a_lazily_normalised_embedding(isa, tmp_path):
    """A memory-mapped checkpoint's embedding is looked up row by row (rwkv_engine's LazyEmbedding, ln0
    applied as it is read): the C step takes the rows from Python, with the same bits as composed."""
    cfg = RWKVConfig(n_layer=2, n_embd=48, vocab_size=300, name="")
    path = tmp_path / "tiny.pth"
    torch.save(synthetic_state_dict(cfg, seed=5), path)
    model = rwkv_engine.load(str(path), weights="bfloat16")
    assert not isinstance(model.emb, torch.Tensor)
    tokens = torch.randint(0, 300, (2, 4), generator=torch.Generator().manual_seed(2))
    got, _ = _run_tokens(model, tokens, "c", isa=isa)
    with dispatch.force(decode_token="composed"):
        want, _ = _run_tokens(model, tokens, "composed", isa=isa)
    if isa == cpu_c.ops().isa:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


@needs_c
@pytest.mark.parametrize("impl", ["c", "composed"])
@pytest.mark.parametrize("bad", [300, -1])
def test_whole_token_step_refuses_a_token_outside_the_vocabulary_and_changes_nothing(impl, bad):
    model = _model("int8")
    state = model.new_state(2)
    model.forward(torch.tensor([[3], [4]]), state)
    before = {k: v.clone() for k, v in state.tensors().items()}
    with dispatch.force(decode_token=impl), pytest.raises(ValueError, match=f"token id {bad} out of range \\[0, 300\\)"):
        model.forward(torch.tensor([[5], [bad]]), state)
    for name, t in state.tensors().items():
        assert torch.equal(t, before[name]), name


@needs_c
def test_whole_token_step_follows_a_replaced_head_and_embedding():
    """The C step holds raw pointers to the head and the embedding: replacing either must be seen."""
    model = _model("float32")
    tok = torch.tensor([[5], [7]])
    model.forward(tok)
    model.head = model.head * 0.5
    model.emb = model.emb.flip(0).contiguous()
    with dispatch.force(decode_token="composed"):
        want, _ = model.forward(tok)
    got, _ = model.forward(tok)
    assert torch.equal(got, want)
    model.ln_out_w = model.ln_out_w.half()                       # not a layout the C step takes
    assert not model._token_step.c_usable() and "ln_out_w" in model._token_step.unusable


@needs_c
@pytest.mark.parametrize("how", ["forced linear", "wkv_backend", "strided state", "bfloat16 compute"])
def test_fused_step_is_bypassed_when_it_would_not_honour_the_request(monkeypatch, how):
    """A forced component op, an explicit WKV backend, a non-contiguous state or another compute dtype
    must run the composed ops: the C step would silently ignore them."""
    model = _model("float32") if how != "bfloat16 compute" else \
        rwkv_engine.RWKV(RWKVConfig(2, 32, vocab_size=300, name=""),
                         synthetic_state_dict(RWKVConfig(2, 32, vocab_size=300, name=""), seed=1), dtype="bfloat16")
    for op in ("decode_layers", "decode_token"):
        monkeypatch.setitem(dispatch._impls, (op, "c"), (lambda *a, **k: pytest.fail("the fused C step ran"), True))
    dispatch._choice_cache.clear()
    tok = torch.tensor([[5], [7]])
    if how == "forced linear":
        with dispatch.force(linear="reference"):
            model.forward(tok)
    elif how == "wkv_backend":
        model.wkv_backend = "numpy"
        model.forward(tok)
    elif how == "strided state":
        state = model.new_state(4)
        half = type(state)(**{k: v[:, ::2] for k, v in state.tensors().items()})
        assert not half.att_x.is_contiguous()
        model.forward(tok, half)
    else:
        model.forward(tok)


@needs_c
def test_plan_rejects_a_layer_of_the_wrong_shape():
    model = _model("float32")
    blk = model.blocks[1]
    bad = decode.DecodeLayers(model.blocks, model.config.n_embd, 1e-5)
    blk_ffn_key = blk.ffn_key
    try:
        blk.ffn_key = blk_ffn_key[:, :-1]
        with pytest.raises(ValueError, match="layer 1 ffn_key"):
            bad.c_plan()
    finally:
        blk.ffn_key = blk_ffn_key


# -- the vector exp inside the element-wise kernels ----------------------------------------------------

@needs_c
@pytest.mark.parametrize("isa", cpu_c.supported_isas())
def test_gates_use_an_exp_accurate_to_a_few_ulp_with_ieee_limits(isa):
    """add_gated computes x + v / (1 + exp(-r)): over r in [-100, 100] and the limits (0 and inf beyond
    float32's range, NaN propagated) it matches float64 math within 4 float32 ulps."""
    ops = cpu_c.ops(isa)
    r = torch.cat([torch.linspace(-100, 100, 20001), torch.tensor([-88.8, -87.3, 88.7, 88.8, 1e30, -1e30])])
    v = torch.ones_like(r)
    got = ops.add_gated_(torch.zeros_like(r), r, v)
    want = (1 / (1 + torch.exp(-r.double()))).float()
    torch.testing.assert_close(got, want, rtol=4 * 2 ** -23, atol=1e-38)
    nan = ops.add_gated_(torch.zeros(3), torch.tensor([float("nan"), float("inf"), -float("inf")]), torch.ones(3))
    assert torch.isnan(nan[0]) and nan[1] == 1 and nan[2] == 0


# -- the thread pool's answer to a busy core ------------------------------------------------------------

def _probe_until_a_worker_runs(lib, ran, sleep_us):
    """pool_probe until a worker thread takes a chunk (it may be slow to wake); -> stalls before, after."""
    for _ in range(50):
        before = lib.pool_stalls()
        after = lib.pool_probe(64, 2, sleep_us, ran.data_ptr())
        if not bool(ran.all()):
            return before, after
    raise AssertionError("no worker thread ever took a chunk")


@needs_c
def test_pool_runs_alone_after_two_close_stalls_then_uses_threads_again():
    """A worker that holds a chunk for 5 ms (as if another process took its core) is a stall; a second
    stall soon after means a busy core: the next jobs run on the caller alone; once the stall history
    is reset (as after the solo period), workers take chunks again."""
    lib = cpu_c.ops().lib
    lib.pool_reset_stalls()
    ran = torch.zeros(64, dtype=torch.int64)
    before, after = _probe_until_a_worker_runs(lib, ran, 5000)
    assert after >= before + 1                   # the caller waited > 400 us for the sleeping chunk
    before, after = _probe_until_a_worker_runs(lib, ran, 5000)
    assert after >= before + 1
    lib.pool_probe(64, 2, 0, ran.data_ptr())
    assert bool(ran.all())                       # solo: every chunk on the caller
    lib.pool_reset_stalls()
    for _ in range(200):
        lib.pool_probe(64, 2, 0, ran.data_ptr())
        if not bool(ran.all()):
            break
    assert not bool(ran.all()), "the pool never used its worker again"


@needs_c
def test_a_lone_stall_does_not_stop_the_threads():
    """One stall (a page fault, a vCPU taken for a moment by the hypervisor) is not a busy core. Tried
    up to 3 times: a spontaneous stall of a noisy machine next to the forced one would be a busy core."""
    lib = cpu_c.ops().lib
    ran = torch.zeros(64, dtype=torch.int64)
    for attempt in range(3):
        lib.pool_reset_stalls()
        _probe_until_a_worker_runs(lib, ran, 5000)
        time.sleep(0.15)                         # longer than the busy window: the next stall is alone
        _probe_until_a_worker_runs(lib, ran, 5000)
        for _ in range(200):                     # still threaded: a worker takes chunks again
            lib.pool_probe(64, 2, 0, ran.data_ptr())
            if not bool(ran.all()):
                break
        if not bool(ran.all()):
            break
    lib.pool_reset_stalls()
    assert not bool(ran.all()), "a lone stall switched the pool to the caller alone"


@needs_c
def test_a_replaced_weight_is_used_and_an_unfit_layer_runs_composed(monkeypatch):
    """The C plan holds raw pointers: replacing a layer's tensor must rebuild it (the new weights are
    used, the old memory is never read), and a layer the C step cannot take runs the table's fallback
    (the composed ops), saying so once per process."""
    monkeypatch.setattr(dispatch, "_warned", set())
    model = _model("float32")
    tok = torch.tensor([[5], [7]])
    model.forward(tok)                                       # the plan is built
    blk = model.blocks[1]
    blk.att_output = blk.att_output * 0.5                    # a new tensor
    with dispatch.force(decode_layers="composed"):
        want, _ = model.forward(tok)
    got, _ = model.forward(tok)
    assert torch.equal(got, want)
    blk.att_key = blk.att_key.t().contiguous().t()           # the same values, not contiguous
    assert not model._decode.c_usable() and "att_key" in model._decode.unusable
    with dispatch.force(decode_layers="composed"):
        want, _ = model.forward(tok)
    with warnings.catch_warnings(record=True) as caught:      # the whole step's, then the layers' fallback
        warnings.simplefilter("always")
        got, _ = model.forward(tok)
    said = [str(w.message) for w in caught]
    assert len(said) == 2 and all("att_key" in m for m in said), said
    assert "decode_token runs its slower fallback 'composed'" in said[0]
    assert "decode_layers runs its slower fallback 'composed'" in said[1]
    assert torch.equal(got, want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.forward(tok)                                   # once per process


@needs_c
@pytest.mark.parametrize("raw_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("weights", ["float32", "float16", "bfloat16"])
def test_c_step_computes_the_lazy_embedding_rows_bit_for_bit(raw_dtype, weights):
    """The lazily normalised table (LayerNorm of each raw row rounded to the format's row dtype, rounded
    again): the C step's rows against rwkv_engine's Python lookup, every raw dtype x row dtype, on
    values that need rounding (float32 raw rows with 23 significant bits)."""
    from rwkv_engine.weights import LazyEmbedding
    model = _model("float32" if weights == "float32" else weights)
    g = torch.Generator().manual_seed(7)
    raw = (torch.randn(300, 40, generator=g) * 3 + 0.25).to(raw_dtype)
    ln_w, ln_b = torch.rand(40, generator=g) + 0.5, torch.randn(40, generator=g) * 0.1
    model.emb = LazyEmbedding(raw, ln_w, ln_b, 1e-5, weights)
    tokens = torch.randint(0, 300, (3, 3), generator=g)
    got, _ = _run_tokens(model, tokens, "c")
    want, _ = _run_tokens(model, tokens, "composed")
    assert list(model._token_step._head[0])[:1] == [decode.EMB_LN0]
    assert torch.equal(got, want)


@needs_c
def test_c_step_takes_rows_of_any_indexable_embedding():
    """An embedding that is neither a table nor lazily normalised is looked up in Python, then the rest
    of the step is the one call; a lookup that gives the wrong shape is a one-line error."""
    model = _model("int8")
    table = model.emb

    class Rows:
        shape = table.shape

        def __getitem__(self, ids):
            return table[ids]

    model.emb = Rows()
    tokens = torch.randint(0, 300, (2, 3), generator=torch.Generator().manual_seed(3))
    got, _ = _run_tokens(model, tokens, "c")
    assert list(model._token_step._head[0])[:1] == [decode.EMB_GIVEN]
    model.emb = table
    want, _ = _run_tokens(model, tokens, "composed")
    assert torch.equal(got, want)
    Rows.__getitem__ = lambda self, ids: table[ids][:, :-1]
    model.emb = Rows()
    with pytest.raises(ValueError, match=r"the embedding gave torch.float32 \[2, 39\], expected float32 \[2, 40\]"):
        model.forward(torch.tensor([[1], [2]]))


@needs_c
def test_whole_token_step_reports_an_embedding_plan_the_c_step_refuses():
    """A corrupt embedding description reaching C is its own one-line error (not a token id error), and
    nothing changes."""
    model = _model("int8")
    state = model.new_state(1)
    model.forward(torch.tensor([[3]]), state)
    before = {k: v.clone() for k, v in state.tensors().items()}
    plan = model._token_step
    plan.c_plan()[0][0] = 7                                      # an embedding mode decode_step.h does not know
    try:
        with dispatch.force(decode_token="c"), pytest.raises(ValueError, match="refused the embedding"):
            model.forward(torch.tensor([[5]]), state)
    finally:
        plan._head = None                                       # rebuilt at the next step
    for k, v in state.tensors().items():
        assert torch.equal(v, before[k]), k


# -- sequence mode: a short chunk through the layers in one C call ------------------------------------

@needs_c
@pytest.mark.parametrize("isa", cpu_c.supported_isas())
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("B, T", [(1, 2), (3, 7), (5, 4), (3, 50), (decode.STEP_ROWS + 1, 2)])
def test_short_sequence_in_c_is_its_decode_steps_bit_for_bit(isa, fmt, B, T):
    """sequence_layers in C: each token gets a decode step's work (the products over all B * T rows at
    once, in calls of at most STEP_ROWS rows, the state carried): x after the layers and the state are
    exactly those of T decode_layers steps."""
    model = _model(fmt, rescale_every=2 if fmt == "float32" else 0)
    tokens = torch.randint(0, 300, (B, T), generator=torch.Generator().manual_seed(B * T))
    state = model.new_state(B)
    s5 = (state.att_x, state.att_a, state.att_b, state.att_p, state.ffn_x)
    x = model.embed(tokens)
    got = decode.sequence_layers_c(model._decode, x, s5, isa=isa)
    assert got.shape == (B, T, model.config.n_embd) and not torch.equal(got, x)
    steps = model.new_state(B)
    s5_steps = (steps.att_x, steps.att_a, steps.att_b, steps.att_p, steps.ffn_x)
    want = torch.stack([decode.decode_layers_c(model._decode, model.embed(tokens[:, t:t + 1]), s5_steps, isa=isa)
                        for t in range(T)], 1)
    assert torch.equal(got, want)
    for name, t in state.tensors().items():
        assert torch.equal(t, steps.tensors()[name]), name


@needs_c
@pytest.mark.parametrize("fmt", ["float32", "int8", "q4_k"])
def test_short_prompt_gives_the_logits_and_state_of_its_tokens_one_by_one(fmt):
    """model.forward on a prompt of at most SHORT_ROWS tokens (the C sequence step, then the head on the
    decode kernels): every position's logits and the final state have the bits of token-by-token decode."""
    model = _model(fmt)
    tokens = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(4))
    assert dispatch.choose("sequence_layers", ("cpu", "float32", fmt, "short")) == "c"
    logits, state = model.forward(tokens, all_logits=True)
    one = model.new_state(2)
    want = torch.stack([model.forward(tokens[:, t:t + 1], one)[0] for t in range(9)], 1)
    assert torch.equal(logits, want)
    for name, t in state.tensors().items():
        assert torch.equal(t, one.tensors()[name]), name


@needs_c
def test_sequence_layers_takes_c_for_short_chunks_only_and_composed_when_a_part_is_forced():
    model = _model("q4_k")
    key = lambda T: decode._sequence_key(model._decode, torch.zeros(2, T, 40),
                                         tuple(model.new_state(2).tensors().values()))
    S = dispatch.short_rows("q4_k")                                              # the record's, for this build
    assert S == dict(formats.get("q4_k").short_rows)[cpu_c.best_isa()] >= dispatch.SHORT_ROWS
    assert dispatch.choose("sequence_layers", key(S // 2)) == "c"                # S rows: short
    assert dispatch.choose("sequence_layers", key(S // 2 + 1)) == "composed"     # S + 2 rows: the GEMM's
    with dispatch.rows_independent():
        assert dispatch.choose("sequence_layers", key(S)) == "c"                 # the server's prefill
    seen = []
    real = dispatch.implementation("sequence_layers", "composed")
    with dispatch.registered("sequence_layers", "composed", lambda *a: seen.append(1) or real(*a)):
        tokens = torch.randint(0, 300, (2, 5))
        model.forward(tokens)
        assert seen == []
        with dispatch.force(linear="quant_torch"):
            model.forward(tokens)
        assert seen == [1]
        model.forward(torch.randint(0, 300, (1, S + 1)))                        # a long prompt: GEMM
        assert seen == [1, 1]


@needs_c
def test_composed_sequence_is_close_to_the_c_one():
    """The two sequence implementations compute the same function (the composed one with torch's
    LayerNorm and one WKV scan): logits within float32 rounding of each other."""
    model = _model("float32")
    tokens = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(7))       # 24 rows: short
    assert dispatch.choose("sequence_layers", decode._sequence_key(model._decode, model.embed(tokens),
                                                                   tuple(model.new_state(2).tensors().values()))) == "c"
    got, _ = model.forward(tokens, all_logits=True)
    with dispatch.force(sequence_layers="composed"):
        want, _ = model.forward(tokens, all_logits=True)
    assert not torch.equal(got, want)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


@needs_c
def test_short_sequence_on_rows_of_a_larger_state_writes_them_back():
    """A pipeline stage's micro-batch is rows of the batch's state (strided views): the C sequence step
    runs on contiguous copies and writes them back, with the bits of a contiguous state."""
    model = _model("bfloat16")
    tokens = torch.randint(0, 300, (2, 6), generator=torch.Generator().manual_seed(9))
    big = model.new_state(4)
    model.forward(torch.randint(0, 300, (4, 3)), big)                       # a state that is not all zeros
    rows = tuple(t[:, 1:3] for t in (big.att_x, big.att_a, big.att_b, big.att_p, big.ffn_x))
    assert not rows[0].is_contiguous()
    alone = tuple(t.clone().contiguous() for t in rows)
    others = tuple(t[:, [0, 3]].clone() for t in (big.att_x, big.att_a, big.att_b, big.att_p, big.ffn_x))
    x = model.embed(tokens)
    got = decode.sequence_layers_c(model._decode, x, rows)
    want = decode.sequence_layers_c(model._decode, x, alone)
    assert torch.equal(got, want)
    for r, a in zip(rows, alone):
        assert torch.equal(r, a)
    for t, o in zip((big.att_x, big.att_a, big.att_b, big.att_p, big.ffn_x), others):
        assert torch.equal(t[:, [0, 3]], o)                                  # the other rows untouched
