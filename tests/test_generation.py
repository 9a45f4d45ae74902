"""The shared sampler and generation loop, and the tokenizer."""
import pytest
import torch

import rwkv_engine
from rwkv_engine import NonFiniteLogitsError, SamplingParams, sample
from rwkv_engine.generation import generate, stream

DRAGON = ("\nIn a shocking finding, scientist discovered a herd of dragons living in a remote, previously "
          "unexplored valley, in Tibet. Even more surprising to the researchers was the fact that the "
          "dragons spoke perfect Chinese.")


@pytest.fixture(scope="module")
def model():
    return rwkv_engine.load("rwkv-4-tiny")                   # full 20B vocab, so text works


def test_tokenizer_facts():
    tok = rwkv_engine.tokenizer()
    assert tok.vocab_size == 50277
    assert tok.encode("<|endoftext|>") == [0]
    assert len(tok.encode(DRAGON)) == 41                      # as the paper's benchmark prompt
    assert tok.decode(tok.encode(DRAGON)) == DRAGON


def test_greedy_generation_is_the_argmax_chain(model):
    res = generate(model, [1, 2, 3], max_new_tokens=8, temperature=0)
    logits, state = model.forward([1, 2, 3])
    expect = []
    for _ in range(8):
        expect.append(int(logits.argmax()))
        logits, state = model.forward([[expect[-1]]], state)
    assert res.tokens[0] == expect
    assert res.prompt_tokens == 3 and len(res.step_s) == 7 and res.prefill_s > 0


def test_same_seed_same_text_and_different_seed_differs(model):
    a = generate(model, DRAGON, max_new_tokens=20, seed=123)
    b = generate(model, DRAGON, max_new_tokens=20, seed=123)
    c = generate(model, DRAGON, max_new_tokens=20, seed=124)
    assert a.text == b.text and a.tokens == b.tokens
    assert a.tokens != c.tokens


def test_stream_yields_what_generate_returns(model):
    pieces = [step.text[0] for step in stream(model, DRAGON, max_new_tokens=15, seed=5)]
    res = generate(model, DRAGON, max_new_tokens=15, seed=5)
    assert "".join(pieces) == res.text[0]
    assert rwkv_engine.tokenizer().decode(res.tokens[0]) == res.text[0]


def test_stop_token_and_stop_string(model):
    free = generate(model, [5], max_new_tokens=10, temperature=0)
    stop_at = free.tokens[0][4]
    res = generate(model, [5], max_new_tokens=10, temperature=0, stop_tokens=[stop_at])
    assert res.tokens[0] == free.tokens[0][:free.tokens[0].index(stop_at)]
    assert res.stop_reason == ["stop_token"]
    text = free.text[0]
    needle = text[len(text) // 2: len(text) // 2 + 3]
    res = generate(model, [5], max_new_tokens=10, temperature=0, stop_strings=[needle])
    assert res.text[0] == text[: text.find(needle)] and res.stop_reason == ["stop_string"]


def test_batched_generation_equals_streams_alone(model):
    prompts = torch.tensor([[10, 11, 12], [20, 21, 22]])
    both = generate(model, prompts, max_new_tokens=6, temperature=0)
    for i in range(2):
        assert generate(model, prompts[i], max_new_tokens=6, temperature=0).tokens[0] == both.tokens[i]


def test_top_k_1_and_tiny_top_p_are_greedy():
    logits = torch.randn(4, 100)
    greedy = logits.argmax(-1)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample(logits, SamplingParams(top_k=1), generator=g), greedy)
    assert torch.equal(sample(logits, SamplingParams(top_p=1e-6), generator=g), greedy)


def test_temperature_and_top_k_restrict_the_support():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]])
    g = torch.Generator().manual_seed(0)
    draws = {int(sample(logits, SamplingParams(top_k=2), generator=g)) for _ in range(200)}
    assert draws == {3, 4}
    draws = {int(sample(logits, SamplingParams(temperature=100.0), generator=g)) for _ in range(400)}
    assert draws == {0, 1, 2, 3, 4}                          # near-uniform at high temperature


def test_penalties_change_the_greedy_choice():
    logits = torch.tensor([[5.0, 4.0, -1.0]])
    counts = torch.tensor([[2.0, 0.0, 0.0]])
    assert int(sample(logits, SamplingParams(temperature=0), counts)) == 0
    assert int(sample(logits, SamplingParams(temperature=0, repetition_penalty=2.0), counts)) == 1
    assert int(sample(logits, SamplingParams(temperature=0, presence_penalty=1.5), counts)) == 1
    assert int(sample(logits, SamplingParams(temperature=0, frequency_penalty=0.4), counts)) == 0
    assert int(sample(logits, SamplingParams(temperature=0, frequency_penalty=0.6), counts)) == 1


def test_repetition_penalty_in_the_loop_avoids_repeats(model):
    res = generate(model, [7], max_new_tokens=30, temperature=0, repetition_penalty=1e6)
    assert len(set(res.tokens[0])) == 30


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1), "temperature=-1"),
    (dict(top_p=0), "top_p=0"),
    (dict(top_p=1.5), "top_p=1.5"),
    (dict(top_k=-2), "top_k=-2"),
    (dict(repetition_penalty=0), "repetition_penalty=0"),
])
def test_invalid_sampling_parameters(model, kwargs, message):
    with pytest.raises(ValueError, match=f"invalid sampling parameter {message}"):
        generate(model, [1], max_new_tokens=2, **kwargs)


@pytest.mark.parametrize("prompt, kwargs, message", [
    ([], {}, "empty prompt"),
    ("", {}, "empty prompt"),
    ([60000], {}, "token id 60000 out of range"),
    ([1], dict(max_new_tokens=0), "max_new_tokens must be an int >= 1"),
    (["a", "a b c"], {}, "batch prompts must be equally long"),
])
def test_invalid_generation_inputs(model, prompt, kwargs, message):
    kwargs.setdefault("max_new_tokens", 3)
    with pytest.raises(ValueError, match=message):
        generate(model, prompt, **kwargs)


def test_generation_continues_from_a_given_state(model):
    ids = rwkv_engine.tokenizer().encode(DRAGON)
    full = generate(model, ids, max_new_tokens=5, temperature=0)
    _, state = model.forward(ids[:-1])
    cont = generate(model, ids[-1:], max_new_tokens=5, temperature=0, state=state)
    assert cont.tokens == full.tokens


def test_multinomial_draws_follow_the_distribution():
    from rwkv_engine.sampling import multinomial
    probs = torch.tensor([[0.0, 0.1, 0.0, 0.6, 0.3]])
    g = torch.Generator().manual_seed(1)
    draws = torch.stack([multinomial(probs, g) for _ in range(4000)]).flatten()
    freq = torch.bincount(draws, minlength=5).float() / 4000
    assert freq[0] == 0 and freq[2] == 0                     # zero-probability tokens never drawn
    torch.testing.assert_close(freq, probs[0], atol=0.03, rtol=0)


# ---------------------------------------------------------------------------------------------
# Non-finite logits and the parameters that cause them (issue 9, case 3)

class FixedLogits:
    """A model whose logits are given per step (step i: row i of `table`, clamped to the last)."""
    tokenizer = None
    device = torch.device("cpu")

    def __init__(self, table):
        self.table, self.calls = table, 0
        self.vocab_size = table.shape[-1]

    def new_state(self, batch_size=1, max_len=None):
        return None

    def forward(self, tokens, state=None):
        row = self.table[min(self.calls, len(self.table) - 1)]
        self.calls += 1
        return row.expand(tokens.shape[0], -1).clone(), state


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("temperature", [0, 1.0])
def test_non_finite_logits_raise_naming_the_step(bad, temperature):
    table = torch.zeros(4, 10)
    table[:, 3] = 1.0
    table[2, 5] = bad                                   # the third sample sees it
    with pytest.raises(rwkv_engine.NonFiniteLogitsError, match=r"step 2: logits are not finite: stream 0, token 5"):
        generate(FixedLogits(table), [1], max_new_tokens=4, temperature=temperature, seed=0)


def test_non_finite_logits_were_not_token_v_minus_1():
    """The inverse-CDF sampler used to clamp NaN draws to the last token id."""
    logits = torch.full((1, 10), float("nan"))
    with pytest.raises(ValueError, match="not finite"):
        sample(logits, SamplingParams())
    # plain temperature (the C rows) names the first bad stream and token, as the torch path does
    logits = torch.zeros(3, 10)
    logits[1, 7], logits[2, 1] = float("inf"), float("nan")
    for params in (SamplingParams(temperature=0.9), SamplingParams(temperature=0.9, top_p=0.5)):
        with pytest.raises(rwkv_engine.NonFiniteLogitsError, match="logits are not finite: stream 1, token 7 is inf"):
            sample(logits, params)


def test_overflow_after_temperature_is_caught():
    logits = torch.tensor([[3e38, -3e38, 0.0]])
    # the torch path (top-p) divides by the temperature first: 3e38 / 0.5 overflows, and is caught
    with pytest.raises(rwkv_engine.NonFiniteLogitsError, match="after temperature"):
        sample(logits, SamplingParams(temperature=0.5, top_p=0.9))
    # plain temperature sampling (rwkv_kernels.sample_rows) subtracts the maximum first: no overflow, and
    # the other weights are exp(-1.2e39) = exp(-3e38 / 0.5) = 0, so the maximum is certain
    g = torch.Generator().manual_seed(0)
    assert [int(sample(logits, SamplingParams(temperature=0.5), generator=g)) for _ in range(20)] == [0] * 20


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=1e-45), "temperature=1e-45"),
    (dict(temperature=float("nan")), "temperature=nan"),
    (dict(temperature=float("inf")), "temperature=inf"),
    (dict(presence_penalty=float("inf")), "presence_penalty=inf"),
    (dict(frequency_penalty=float("-inf")), "frequency_penalty=-inf"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty=inf"),
    (dict(top_p=float("nan")), "top_p=nan"),
    (dict(top_k=1.5), "top_k=1.5"),
    (dict(top_k=True), "top_k=True"),
    (dict(temperature="1"), "temperature='1'"),
])
def test_parameters_that_make_logits_non_finite_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=f"invalid sampling parameter {message}"):
        SamplingParams(**kwargs)


def test_smallest_temperature_still_samples():
    from rwkv_engine.sampling import MIN_TEMPERATURE
    logits = torch.tensor([[0.0, 50.0, 49.0]])
    assert int(sample(logits, SamplingParams(temperature=MIN_TEMPERATURE))) == 1


# ---------------------------------------------------------------------------------------------
# Silent coercions (issue 9, case 9)

@pytest.mark.parametrize("tokens", [[1.5, 2.0], [[2.0]], torch.tensor([[1.0, 2.0]]), [True, False]])
def test_forward_refuses_non_integer_tokens(model, tokens):
    with pytest.raises(ValueError, match="floats and bools are refused"):
        model.forward(tokens)


@pytest.mark.parametrize("bad", [-1, 0.5, 1.0, True, "6"])
def test_rescale_every_must_be_a_non_negative_int(bad):
    with pytest.raises(ValueError, match=f"rescale_every must be an int >= 0 .*got {bad!r}"):
        rwkv_engine.load("rwkv-4-tiny", rescale_every=bad)


def test_generate_returns_its_result_and_stream_exposes_it(model):
    run = stream(model, [1, 2], max_new_tokens=5, temperature=0)
    steps = list(run)
    res = generate(model, [1, 2], max_new_tokens=5, temperature=0)
    assert run.result.tokens == res.tokens and [s.ids[0] for s in steps] == res.tokens[0]
    assert run.result.decode_s == pytest.approx(sum(run.result.step_s))


def test_invalid_arguments_fail_when_stream_is_called(model):
    with pytest.raises(ValueError, match="max_new_tokens"):
        stream(model, [1], max_new_tokens=0)                # before iterating
    with pytest.raises(ValueError, match="stop_tokens must be ints"):
        stream(model, [1], stop_tokens=[1.5])


def test_the_rows_draws_are_each_generators_own_draw_bit_for_bit():
    """The batched sampler's u (one torch.rand per generator, the arithmetic once for all rows) is, row by
    row, the u that sample() draws alone from the same generator."""
    from rwkv_engine.sampling import _uniform, _uniform_rows
    for step in range(20):
        together = _uniform_rows([torch.Generator().manual_seed(100 * step + i) for i in range(7)], "cpu")
        alone = torch.cat([_uniform(1, torch.Generator().manual_seed(100 * step + i), "cpu") for i in range(7)])
        assert together.dtype == torch.float64 and torch.equal(together, alone)
        assert bool((together > 0).all() and (together <= 1).all())


def test_temperature_rows_sampled_together_equal_each_row_alone():
    """sample_temperature_rows (the server's batched sampling) gives each row the token sample()
    draws for it alone with the same generator; a NaN row gets sample()'s error, the rest go on."""
    from rwkv_engine.sampling import sample_temperature_rows
    logits = torch.randn(6, 50277, generator=torch.Generator().manual_seed(3)) * 4
    logits[4, 123] = float("nan")
    for temperature in (1.0, 0.7):
        got = sample_temperature_rows(logits, temperature, [torch.Generator().manual_seed(10 + i) for i in range(6)])
        for i in range(6):
            g = torch.Generator().manual_seed(10 + i)
            if i == 4:
                with pytest.raises(NonFiniteLogitsError) as e:
                    sample(logits[i:i + 1], SamplingParams(temperature=temperature), None, g)
                assert type(got[i]) is NonFiniteLogitsError and str(got[i]) == str(e.value)
            else:
                assert got[i] == int(sample(logits[i:i + 1], SamplingParams(temperature=temperature), None, g))
    assert len(set(got) - {got[4]}) > 1
    with pytest.raises(ValueError, match="temperature > 0"):
        sample_temperature_rows(logits, 0, [torch.Generator()] * 6)
