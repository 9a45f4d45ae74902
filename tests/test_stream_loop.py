"""One per-stream loop (generation.StreamLoop) behind the library's stream(), the server's scheduler
and the pipeline: the same prompts, seeds and parameters give the same tokens, text and finish
reason through all three; the server's stop token is its tokenizer's, not a constant."""
import socket
import threading

import pytest
import torch

import rwkv_engine
from rwkv_engine import SamplingParams
from rwkv_engine.generation import StreamLoop, TextStream
from rwkv_engine.serve import Job, Scheduler

MODEL = "rwkv-4-tiny"                        # the GPT-NeoX tokenizer: text and stop strings
PROMPTS = ["The dragons of the valley", "In a shocking finding, scientists", "1, 2, 3,"]
CASES = [  # (sampling, seed, stop strings)
    (dict(temperature=0), 0, ()),
    (dict(temperature=1.0), 3, ()),
    (dict(temperature=0.8, top_k=40), 5, ("e",)),
    (dict(temperature=1.0, top_p=0.9), 7, (" the", "a")),
    (dict(temperature=1.0, repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.2), 11, ("o",)),
    (dict(temperature=0, repetition_penalty=2.0), 0, ()),
]
MAX_TOKENS = 10
REASON = {"stop_token": "stop", "stop_string": "stop", "length": "length"}     # the library's -> the API's


class WithEos:
    """The model with a tokenizer whose end-of-text token is `eos` (to make a stop token happen)."""

    def __init__(self, model, eos):
        self.model, self.tokenizer = model, _Tokenizer(model.tokenizer, eos)

    def __getattr__(self, name):
        return getattr(self.model, name)


class _Tokenizer:
    def __init__(self, tokenizer, eos):
        self.tokenizer, self.eos_id = tokenizer, eos

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


@pytest.fixture(scope="module")
def model():
    return rwkv_engine.load(MODEL)


def library(model, ids, sampling, seed, stop, eos):
    run = model.stream(ids, MAX_TOKENS, sampling=SamplingParams(**sampling), seed=seed, stop_strings=stop,
                       stop_tokens=[eos])
    steps = list(run)
    return ([s.ids[0] for s in steps if s.ids[0] >= 0], "".join(s.text[0] for s in steps),
            REASON[run.result.stop_reason[0]])


def scheduled(scheduler, ids, sampling, seed, stop):
    events, done = [], threading.Event()
    job = Job(prompt=list(ids), max_tokens=MAX_TOKENS, sampling=SamplingParams(**sampling), seed=seed, stop=stop,
              emit=lambda e: (events.append(e), e.finish_reason and done.set()))
    scheduler.submit(job)
    assert done.wait(60)
    assert events[-1].error is None, events[-1].error
    return ([e.token for e in events if e.token is not None], "".join(e.text for e in events),
            events[-1].finish_reason)


def cases(model):
    """Every prompt x case, and one whose stop token is the 4th token greedy decoding gives."""
    tok = model.tokenizer
    out = [(tok.encode(p), sampling, seed, stop, tok.eos_id) for p in PROMPTS for sampling, seed, stop in CASES]
    ids = tok.encode(PROMPTS[0])
    fourth = model.generate(ids, 4, temperature=0).tokens[0][3]
    out.append((ids, dict(temperature=0), 0, (), fourth))
    return out


def test_library_and_scheduler_give_the_same_tokens_text_and_finish(model):
    want = [library(model, *c) for c in cases(model)]
    assert any(r[2] == "stop" for r in want) and any(r[2] == "length" for r in want)
    assert want[-1][2] == "stop" and len(want[-1][0]) == 3             # ended at its stop token
    by_eos = {}
    try:
        for c, expected in zip(cases(model), want):
            ids, sampling, seed, stop, eos = c
            if eos not in by_eos:
                by_eos[eos] = Scheduler(WithEos(model, eos), max_batch=4).start()
            assert scheduled(by_eos[eos], ids, sampling, seed, stop) == expected, (sampling, seed, stop)
    finally:
        for s in by_eos.values():
            s.stop()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_pipeline_gives_the_library_s_tokens_text_and_finish(model, monkeypatch):
    """A one-rank pipeline in this process (PipelinedRWKV, its stage and decode_interleaved): its
    generate and stream run the same loop; decode_interleaved the same tokens without stops."""
    from rwkv_engine import pipeline
    for var, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    pipe = pipeline.load(MODEL, backend="gloo", threads=torch.get_num_threads())
    try:
        for c in cases(model):
            assert library(pipe, *c) == library(model, *c), c[1:4]
        ids = model.tokenizer.encode(PROMPTS[1])
        for sampling, seed, _ in CASES:
            params = SamplingParams(**sampling)
            got = pipeline.decode_interleaved(pipe, [ids, ids[::-1]], MAX_TOKENS, sampling=params, seed=seed)
            assert got["tokens"] == model.generate([ids, ids[::-1]], MAX_TOKENS, sampling=params, seed=seed).tokens
    finally:
        pipe.close()


def test_a_finished_stream_takes_no_token_and_counts_none():
    """The penalty bookkeeping of one stream: its generated tokens count, a stop token does not, and
    once finished the stream reports nothing more."""
    counts = torch.zeros(1, 10)
    loop = StreamLoop(SamplingParams(presence_penalty=1.0), 3, counts=counts, stop_tokens={9})
    assert [loop.take(t) for t in (4, 4)] == [(4, None, None), (4, None, None)]
    assert loop.take(9) == (None, None, "stop_token") and loop.done
    assert counts[0, 4] == 2 and counts[0, 9] == 0 and loop.tokens == [4, 4]
    text = StreamLoop(SamplingParams(), 2, text=TextStream(rwkv_engine.tokenizer()))
    ids = rwkv_engine.tokenizer().encode(" hello world")
    assert [text.take(t) for t in ids] == [(ids[0], " hello", None), (ids[1], " world", "length")]


def test_the_scheduler_needs_a_model_that_states_it_decodes_a_batch():
    with pytest.raises(ValueError, match="batched_token_mode, state_copy"):
        Scheduler(object())
