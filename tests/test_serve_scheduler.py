"""The serving scheduler and prefix cache in-process (no HTTP): batch invariance of logits and
tokens, prefix-cache hits equal to cold runs, load-independent prompt chunking, failures."""
import threading
import time

import pytest
import torch

from rwkv_engine import SamplingParams
from rwkv_engine.serve import Job, PrefixCache, QueueFull, Scheduler
from rwkv_engine.serve.prefix_cache import prefix_keys
from rwkv_engine.state import State

TIMEOUT = 60


class Recorder:
    """The model, with every forward's token shape (B, T) logged."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def forward(self, tokens, state):
        self.calls.append(tuple(tokens.shape))
        return self.model.forward(tokens, state)

    def __getattr__(self, name):
        return getattr(self.model, name)


def run(scheduler, jobs, record_logits=False):
    """Submit `jobs`, wait for all their choices to finish; returns per job {index: [tokens]}
    and, with record_logits, per job {index: [logits row, ...]}."""
    tokens = [{i: [] for i in range(j.n)} for j in jobs]
    logits = [{i: [] for i in range(j.n)} for j in jobs]
    left, done = [sum(j.n for j in jobs)], threading.Event()
    where = {id(j): k for k, j in enumerate(jobs)}
    if record_logits:
        scheduler.on_logits = lambda job, i, row: logits[where[id(job)]][i].append(row.clone())

    reasons = []

    def emitter(k):
        def emit(event):
            if event.token is not None:
                tokens[k][event.index].append(event.token)
            if event.finish_reason is not None:
                reasons.append(event.finish_reason)
                left[0] -= 1
                if left[0] == 0:
                    done.set()
        return emit

    for k, job in enumerate(jobs):
        job.emit = emitter(k)
        scheduler.submit(job)
    assert done.wait(TIMEOUT), "jobs did not finish"
    assert set(reasons) <= {"stop", "length"}, reasons
    scheduler.on_logits = None
    return tokens, logits


@pytest.fixture
def scheduler_factory(tiny_model):
    made = []

    def make(model=tiny_model, **kwargs):
        s = Scheduler(model, **kwargs).start()
        made.append(s)
        return s
    yield make
    for s in made:
        s.stop()
        assert not s._thread.is_alive()


def job(prompt, max_tokens=12, seed=0, **sampling):
    return Job(prompt=list(prompt), max_tokens=max_tokens, seed=seed,
               sampling=SamplingParams(**(sampling or dict(temperature=1.0, top_k=50))))


def prompts(n, vocab=1000, seed=1, lengths=(3, 13)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(torch.randint(*lengths, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def test_library_decode_rows_are_batch_invariant(tiny_model):
    """The property the scheduler relies on: a stream's logits in a batched token-mode forward are
    bit-identical to the stream alone, for any batch size."""
    B = 16
    state = tiny_model.new_state(B)
    tiny_model.forward(torch.randint(0, 1000, (B, 7)), state)
    tokens = torch.randint(0, 1000, (B, 1))
    for b in (1, 2, 3, 8, 9, 16):
        batched, _ = tiny_model.forward(tokens[:b], state.select(list(range(b))))
        for row in (0, b - 1):
            alone, _ = tiny_model.forward(tokens[row:row + 1], state.select([row]))
            assert torch.equal(batched[row], alone[0]), f"row {row} of a batch of {b} differs from the stream alone"


MIXED = (dict(temperature=0.8), dict(temperature=1.0), dict(temperature=1.0, top_k=50))


@pytest.mark.parametrize("sampling", [dict(temperature=1.0, top_k=50), dict(temperature=0.8)],
                         ids=["top_k", "temperature_alone"])
def test_same_tokens_and_logits_alone_or_among_15_others(scheduler_factory, sampling):
    """Among others sampled in various ways: streams sampled by temperature alone are sampled
    together, one call per temperature; the target's tokens do not change."""
    s = scheduler_factory(max_batch=16, chunk=16)
    target = [5, 17, 99, 300, 2, 41, 7, 7, 650, 12, 1, 999, 31]
    alone_tokens, alone_logits = run(s, [job(target, seed=123, **sampling)], record_logits=True)
    others = [job(p, max_tokens=40 + k, seed=k, **MIXED[k % 3]) for k, p in enumerate(prompts(15))]
    crowd_tokens, crowd_logits = run(s, others[:7] + [job(target, seed=123, **sampling)] + others[7:],
                                     record_logits=True)
    assert crowd_tokens[7] == alone_tokens[0] and len(alone_tokens[0][0]) == 12
    assert len(crowd_logits[7][0]) == len(alone_logits[0][0]) == 12
    for step, (a, b) in enumerate(zip(alone_logits[0][0], crowd_logits[7][0])):
        assert torch.equal(a, b), f"logits differ at step {step}"
    # the crowd really was decoded together
    hist = s.metrics.registry.get_sample_value("rwkv_decode_batch_size_bucket", {"le": "8.0"})
    total = s.metrics.registry.get_sample_value("rwkv_decode_batch_size_count")
    assert total > hist, "no decode step ran with more than 8 streams"


class Slowed(Recorder):
    """The model, each decode forward (T = 1) taking 15 ms more and each prompt chunk's 40 ms more."""

    def forward(self, tokens, state):
        time.sleep(0.015 if tokens.shape[1] == 1 else 0.040)
        return super().forward(tokens, state)


def test_metrics_split_the_scheduler_time_into_decode_prompts_and_output(scheduler_factory, tiny_model):
    """rwkv_decode_forward_seconds, rwkv_prefill_forward_seconds and rwkv_output_seconds sum the wall
    time of each part: at least the known delay of every forward of that kind, and together no more
    than the run's wall time."""
    model = Slowed(tiny_model)
    s = scheduler_factory(model=model, max_batch=4, chunk=16)
    t0 = time.perf_counter()
    run(s, [job(p, max_tokens=6, seed=k) for k, p in enumerate(prompts(3, lengths=(20, 30)))])
    wall = time.perf_counter() - t0
    get = s.metrics.registry.get_sample_value
    decode, prefill, output = (get(f"rwkv_{name}_total") for name in
                               ("decode_forward_seconds", "prefill_forward_seconds", "output_seconds"))
    n_decode = sum(1 for shape in model.calls if shape[1] == 1)
    n_prefill = sum(1 for shape in model.calls if shape[1] > 1)
    assert n_decode == get("rwkv_decode_batch_size_count") and n_decode >= 5 and n_prefill >= 2
    assert decode >= 0.015 * n_decode and prefill >= 0.040 * n_prefill
    assert decode < 0.015 * n_decode + 0.5 * wall, "the decode time holds more than its forwards"
    assert 0 < output < decode
    assert decode + prefill + output <= wall


def test_hand_off_gets_each_steps_events_in_one_call_and_the_same_tokens(scheduler_factory):
    """With hand_off set, the events of each step arrive in one call (every decoding stream's token of a
    decode step together), in the order the streams emitted them; the tokens are those of per-event
    emits."""
    jobs = lambda: [job(p, max_tokens=10, seed=k) for k, p in enumerate(prompts(4))]
    plain, _ = run(scheduler_factory(max_batch=4), jobs())
    s = scheduler_factory(max_batch=4)
    batches = []

    def hand_off(batch):
        batches.append([(j, e.index, e.token) for j, e in batch])
        for j, e in batch:
            j.emit(e)
    s.hand_off = hand_off
    handed, _ = run(s, jobs())
    assert handed == plain
    assert max(len({id(j) for j, _, _ in b}) for b in batches) == 4, "no step handed over all 4 streams' events"
    assert len(batches) < sum(len(b) for b in batches) / 2        # per-event emits: one call each


def test_api_hand_off_wakes_each_event_loop_once_per_batch():
    from rwkv_engine.serve.api import hand_off
    from rwkv_engine.serve.scheduler import Event

    class Loop:
        def __init__(self):
            self.calls = []

        def call_soon_threadsafe(self, fn, *args):
            self.calls.append((fn, args))

    loop_a, loop_b, got, direct = Loop(), Loop(), [], []
    a, b, c, other = (job([1, 2]) for _ in range(4))
    a.deliver, b.deliver, c.deliver = (loop_a, got.append), (loop_a, got.append), (loop_b, got.append)
    other.emit = direct.append
    events = [Event(0, "x", 5), Event(0, "y", 6), Event(0, "z", 7), Event(0, "w", 8), Event(0, "v", 9)]
    hand_off([(a, events[0]), (b, events[1]), (other, events[2]), (a, events[3]), (c, events[4])])
    assert len(loop_a.calls) == 1 and len(loop_b.calls) == 1 and direct == [events[2]]
    for loop in (loop_a, loop_b):
        fn, args = loop.calls[0]
        fn(*args)
    assert got == [events[0], events[1], events[3], events[4]]


def test_rows_are_sampled_together_only_where_the_dispatch_table_says(scheduler_factory, monkeypatch):
    """The scheduler asks rwkv_kernels.sample_rows_serves (the table's answer) whether temperature-alone
    rows go to one sample_rows call; where the table has no kernel for the logits, each row is sampled
    alone and every stream still finishes with its own tokens."""
    import rwkv_kernels
    from rwkv_engine import sampling
    asked, batched = [], []
    real_rows = sampling.sample_temperature_rows
    monkeypatch.setattr(rwkv_kernels, "sample_rows_serves", lambda logits: asked.append(logits.shape) and False)
    monkeypatch.setattr("rwkv_engine.serve.scheduler.sample_temperature_rows",
                        lambda *a: batched.append(1) or real_rows(*a))
    s = scheduler_factory(max_batch=8, chunk=16)
    tokens, _ = run(s, [job(p, max_tokens=6, seed=k, temperature=0.8) for k, p in enumerate(prompts(4))])
    assert any(shape[0] > 1 for shape in asked) and not batched      # asked for the batch, then row by row
    assert all(len(t[0]) == 6 for t in tokens)


def test_equal_length_prompts_prefill_together_with_the_logits_of_each_alone(tiny_model, monkeypatch):
    """Sixteen 13-token prompts queued at once run their chunks (8, then 5 tokens) as batched
    sequence-mode forwards; the target's tokens and logits are bit-identical to its run alone."""
    shapes, real = [], tiny_model.forward

    def spy(tokens, state=None, **kwargs):
        shapes.append(tuple(tokens.shape))
        return real(tokens, state, **kwargs)
    monkeypatch.setattr(tiny_model, "forward", spy)
    target = [5, 17, 99, 300, 2, 41, 7, 7, 650, 12, 1, 999, 31]
    results = []
    for crowd in (False, True):
        s = Scheduler(tiny_model, max_batch=16, chunk=8, prefill_rows=128)
        jobs = [job(p, max_tokens=12, seed=k) for k, p in enumerate(prompts(15, lengths=(13, 14)))] if crowd else []
        where = len(jobs) // 2
        jobs.insert(where, job(target, seed=123))
        threading.Timer(0.2, s.start).start()                     # every job is queued before the first step
        shapes.clear()
        try:
            results.append((run(s, jobs, record_logits=True), where, list(shapes)))
        finally:
            s.stop()
    ((alone_tokens, alone_logits), a, alone_shapes), ((crowd_tokens, crowd_logits), c, crowd_shapes) = results
    assert [x for x in alone_shapes if x[1] > 1] == [(1, 8), (1, 5)]
    assert [x for x in crowd_shapes if x[1] > 1] == [(16, 8), (16, 5)]
    assert crowd_tokens[c] == alone_tokens[a]
    for step, (x, y) in enumerate(zip(alone_logits[a][0], crowd_logits[c][0])):
        assert torch.equal(x, y), f"logits differ at step {step}"


def test_a_stream_with_non_finite_logits_fails_alone_and_the_batch_goes_on(scheduler_factory):
    """A NaN in one stream's row of a batch sampled together: that stream ends with the error
    sample() gives for it; its neighbours' tokens are those they draw without the fault."""
    s = scheduler_factory(max_batch=8)
    jobs = lambda: [job(p, max_tokens=10, seed=k, temperature=0.9) for k, p in enumerate(prompts(4))]
    clean, _ = run(s, jobs())
    steps = {}

    def poison(j, index, row):
        if j.prompt == bad.prompt:
            steps[0] = steps.get(0, 0) + 1
            if steps[0] == 3:
                with torch.inference_mode():              # the row is a view of the batch's logits
                    row[0, 7] = float("nan")
    faulty = jobs()
    bad = faulty[2]
    events = []
    bad.emit = events.append
    s.on_logits = poison
    s.submit(bad)
    got, _ = run(s, faulty[:2] + faulty[3:])
    assert got == clean[:2] + clean[3:]
    assert [e.token for e in events[:-1]] == clean[2][0][:2]
    assert (events[-1].finish_reason, events[-1].error) == \
        ("error", "NonFiniteLogitsError: logits are not finite: stream 0, token 7 is nan")


def test_a_stream_is_counted_active_when_its_first_token_goes_out(scheduler_factory):
    """/health's active_streams: a client holding its first token finds its streams counted (the
    events of the first tokens go out after the streams joined the batch)."""
    s = scheduler_factory(max_batch=4)
    seen, done = [], threading.Event()

    def emit(event):
        if event.token is not None and not seen:
            seen.append(s.active_streams)
        if event.finish_reason:
            done.set()
    j = Job(prompt=[1, 2, 3], max_tokens=3, n=2, seed=1, emit=emit)
    s.submit(j)
    assert done.wait(TIMEOUT)
    assert seen == [2]


def test_n_choices_fork_the_prompt_state(scheduler_factory):
    s = scheduler_factory(max_batch=4)
    (three,), _ = run(s, [Job(prompt=[1, 2, 3], max_tokens=6, n=3, seed=10)])
    for i in range(3):
        (alone,), _ = run(s, [Job(prompt=[1, 2, 3], max_tokens=6, seed=10 + i)])
        assert three[i] == alone[0]
    assert three[0] != three[1]


def test_prefix_cache_hit_equals_cold_run(tiny_model, scheduler_factory):
    chunk = 8
    system = torch.randint(0, 1000, (27,), generator=torch.Generator().manual_seed(5)).tolist()
    question = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9]
    cold = scheduler_factory(chunk=chunk)
    cold_tokens, cold_logits = run(cold, [job(system + question)], record_logits=True)
    cold_p, cold_p_logits = run(cold, [job(system)], record_logits=True)

    cache = PrefixCache(64 * 2**20, chunk)
    warm = scheduler_factory(chunk=chunk, cache=cache)
    rec = Recorder(tiny_model)
    warm.model = rec
    run(warm, [job(system)])                                    # caches boundaries 8, 16, 24 and the prompt
    prefill_calls = [c for c in rec.calls if c[0] == 1 and c[1] > 1]
    assert prefill_calls == [(1, 8), (1, 8), (1, 8), (1, 3)]
    rec.calls.clear()
    # resumes at boundary 24 (runs 24..32, 32..40), then the same again as a whole-prompt hit
    for expected_prefill in ([(1, 8), (1, 8)], []):
        hit_tokens, hit_logits = run(warm, [job(system + question)], record_logits=True)
        assert [c for c in rec.calls if c[1] > 1] == expected_prefill
        assert hit_tokens == cold_tokens
        for a, b in zip(hit_logits[0][0], cold_logits[0][0], strict=True):
            assert torch.equal(a, b)
        rec.calls.clear()
    same_tokens, same_logits = run(warm, [job(system)], record_logits=True)   # cached entries unaltered
    assert not [c for c in rec.calls if c[1] > 1]
    assert same_tokens == cold_p and torch.equal(same_logits[0][0][0], cold_p_logits[0][0][0])
    get = warm.metrics.registry.get_sample_value
    assert get("rwkv_prefix_cache_hits_total") == 3 and get("rwkv_prefix_cache_misses_total") == 1
    assert 0 < cache.bytes <= cache.max_bytes


def test_prefix_cache_is_bounded_lru(tiny_model):
    state = tiny_model.new_state(1)
    size = state.nbytes
    cache = PrefixCache(3 * size, chunk=4)
    for k in range(5):
        cache.put(bytes([k]) * 16, state)
    assert len(cache) == 3 and cache.bytes == 3 * size
    assert cache.lookup([1, 2, 3, 4, 5]) is None and cache.misses == 1
    assert PrefixCache(size - 1, 4).put(b"x" * 16, state) is None


def test_prefix_cache_memory_goes_back_to_the_os_when_entries_are_dropped():
    """Entries hold their memory apart from the heap: dropping them returns it even when other
    allocations made between them are still alive (heap chunks would stay resident)."""
    psutil = pytest.importorskip("psutil")
    proc = psutil.Process()
    state = State.zeros(12, 1, 768)
    state.att_a.normal_()
    logits = torch.randn(50277)
    cache = PrefixCache(64 * 2**20, chunk=4)
    pinned = []
    for k in range(40):                                          # ~15 MiB of entries
        cache.put(k.to_bytes(16, "little"), state, logits if k % 2 else None)
        pinned.append(torch.ones(4096))                          # a live heap block after each entry
    stored = cache.bytes
    full = proc.memory_info().rss
    del cache
    dropped = full - proc.memory_info().rss
    assert dropped >= 0.9 * stored, f"dropping {stored / 2**20:.1f} MiB of entries returned {dropped / 2**20:.1f} MiB"
    assert len(pinned) == 40


def test_prefix_cache_entries_are_private_copies():
    state, logits = State.zeros(2, 1, 8), torch.arange(5.0)
    cache = PrefixCache(2**20, chunk=1)
    key = prefix_keys([9], 1)[1]
    cache.put(key, state, logits)
    state.att_a += 1
    logits += 1
    hit = cache.lookup([9])
    assert hit.length == 1 and torch.equal(hit.state.att_a, torch.zeros(2, 1, 8))
    assert torch.equal(hit.logits, torch.arange(5.0)) and torch.equal(hit.state.att_p, State.zeros(2, 1, 8).att_p)
    hit.state.att_b += 1                                         # a hit is a copy too
    assert torch.equal(cache.lookup([9]).state.att_b, torch.zeros(2, 1, 8))


def test_prefix_cache_entry_falls_back_to_the_heap_and_a_failed_copy_is_skipped(monkeypatch):
    """No mapping to be had (e.g. the map count at its limit): the entry is stored on the heap. No
    memory for the copy at all: the entry is not stored, and nothing is raised."""
    import mmap
    from rwkv_engine.serve import prefix_cache
    state = State.zeros(12, 1, 768)
    state.att_b.normal_()
    key = prefix_keys([4, 2], 1)[2]

    def no_mapping(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")
    monkeypatch.setattr(mmap, "mmap", no_mapping)
    cache = PrefixCache(2**20, chunk=1)
    cache.put(key, state)
    assert torch.equal(cache.lookup([4, 2, 0]).state.att_b, state.att_b)

    def no_memory(*args):
        raise RuntimeError("DefaultCPUAllocator: not enough memory")
    monkeypatch.setattr(prefix_cache, "_private_copy", no_memory)
    full = PrefixCache(2**20, chunk=1)
    full.put(key, state)
    assert len(full) == 0 and full.bytes == 0 and full.lookup([4, 2, 0]) is None


def test_a_failure_while_starting_or_joining_streams_ends_that_job_and_the_server_goes_on(
        tiny_model, scheduler_factory, monkeypatch):
    """Out of memory where a prompt's streams join the batch, or anywhere in a prefill step: the
    jobs concerned end with an error event (no client is left waiting), later jobs are served."""
    real_cat, real_done = State.cat, Scheduler._chunk_done
    faults = {"cat": 1, "chunk": 1}

    def cat(states):
        if faults["cat"]:
            faults["cat"] -= 1
            raise MemoryError("no memory for the batch")
        return real_cat(states)

    def chunk_done(self, job, end):
        if faults["chunk"]:
            faults["chunk"] -= 1
            raise RuntimeError("lost a chunk")
        return real_done(self, job, end)
    monkeypatch.setattr(State, "cat", staticmethod(cat))
    s = scheduler_factory()
    for fault, message in (("cat", "MemoryError: no memory for the batch"), ("chunk", "RuntimeError: lost a chunk")):
        if fault == "chunk":
            monkeypatch.setattr(Scheduler, "_chunk_done", chunk_done)
        events, ended = [], threading.Event()
        bad = job([7, 8, 9], max_tokens=5, temperature=0.8)
        bad.emit = lambda e: (events.append(e), e.finish_reason and ended.set())
        s.submit(bad)
        assert ended.wait(TIMEOUT)
        assert (events[-1].finish_reason, events[-1].error) == ("error", message)
        (good,), _ = run(s, [job([1, 2, 3], max_tokens=5)])
        assert len(good[0]) == 5
    assert faults == {"cat": 0, "chunk": 0}


def test_prompt_chunks_do_not_depend_on_load_and_interleave_with_decode(tiny_model, scheduler_factory):
    rec = Recorder(tiny_model)
    s = scheduler_factory(model=rec, chunk=4)
    long_prompt = list(range(100, 122))                          # 22 tokens: chunks 4,4,4,4,4,2
    run(s, [job(long_prompt, max_tokens=2)])
    idle = [c for c in rec.calls if c[0] == 1 and c[1] > 1]
    assert idle == [(1, 4)] * 5 + [(1, 2)]

    rec.calls.clear()
    started = threading.Event()
    busy = job([1], max_tokens=200)                              # a 1-token prompt runs in token mode
    busy.emit = lambda e: started.set()
    s.submit(busy)
    assert started.wait(TIMEOUT)
    run(s, [job(long_prompt, max_tokens=2)])
    busy.cancel()
    calls = rec.calls
    prefill = [i for i, c in enumerate(calls) if c[1] > 1]
    assert [calls[i] for i in prefill] == idle
    for a, b in zip(prefill, prefill[1:]):
        assert any(c[1] == 1 for c in calls[a + 1:b]), "two prompt chunks ran without a decode step between"


def test_queue_bound(tiny_model):
    s = Scheduler(tiny_model, max_batch=1, max_queue=2)            # not started: nothing is admitted
    s.submit(job([1]))
    s.submit(job([1]))
    with pytest.raises(QueueFull):
        s.submit(job([1]))


def test_a_failing_job_ends_with_error_and_the_others_go_on(tiny_model, scheduler_factory):
    class Failing(Recorder):
        batched_prefill = False         # its forward fails for one prompt: it runs prompts one at a time

        def forward(self, tokens, state):
            if int(tokens[0, 0]) == 999:
                raise RuntimeError("boom")
            return self.model.forward(tokens, state)

    s = scheduler_factory(model=Failing(tiny_model))
    events = []
    bad = job([999, 1, 2])
    bad.emit = events.append
    s.submit(bad)
    (good,), _ = run(s, [job([1, 2, 3], max_tokens=5)])
    assert len(good[0]) == 5
    assert [(e.finish_reason, e.error) for e in events] == [("error", "RuntimeError: boom")]
    with pytest.raises(ValueError, match="n <= max_batch"):
        s.submit(Job(prompt=[1], max_tokens=1, n=s.max_batch + 1))


@pytest.mark.parametrize("option", ["--prefill-rows", "--prefill-chunk", "--max-batch", "--max-queue"])
def test_serve_rejects_a_count_below_one_naming_the_option(option, capsys):
    from rwkv_engine.serve.__main__ import parse_args
    with pytest.raises(SystemExit) as e:
        parse_args(["--model", "rwkv-4-pile-169m", option, "0"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"{option} must be >= 1, got 0" in err, err
    with pytest.raises(ValueError, match="prefill_rows must be an int >= 1"):
        Scheduler(object(), prefill_rows=0)
