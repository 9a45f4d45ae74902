"""Continuous batching: one thread owns the model and steps every active stream together
(vLLM's `Scheduler` + `LLMEngine.step`, for a model whose whole per-stream cache is a fixed-size state).

Each iteration of the loop admits waiting requests while slots are free (`max_batch` streams), then
runs one step in three parts (vLLM's schedule -> execute_model -> process_outputs):
  1. `Planner` decides, without touching the model, which prompt chunks run: the oldest job's next
     chunk, with the next chunks of the same length of other waiting jobs when the model prefills
     several prompts at once (`model.batched_prefill`; at most `prefill_rows` tokens). Chunk
     boundaries sit at absolute multiples of `chunk` tokens whatever the load, and the products run
     on row-independent kernels (`rwkv_kernels.dispatch.rows_independent`), so a prompt's results do not
     depend on its neighbours; a long prompt delays the decoding streams by one chunk step at a time;
     every decoding stream steps.
  2. `Executor` runs the model: prompt states (fresh or from the prefix cache), the chunks' forward
     (states stacked along B), the decoding streams' one batched token-mode forward.
  3. The output step (the `Scheduler`'s own methods) samples each stream from its own row with its
     own generator (rows of streams sampled by temperature alone: one call per temperature, each
     row alone, where the dispatch table has a `sample_rows` kernel for the logits), applies its
     `StreamLoop` (stop token, stop strings, max_tokens, text), emits events and retires finished
     streams (their rows leave the stacked state).
A failure ends the jobs or streams it concerns with an error event (`Scheduler._fail`), never the
thread. Results go back through each job's `emit(Event)` callback, called on the scheduler thread.
"""
import logging
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

import rwkv_kernels
from rwkv_kernels import dispatch

from ..generation import StreamLoop, TextStream
from ..sampling import SamplingParams, sample_temperature_rows
from ..state import State
from .metrics import Metrics
from .prefix_cache import PrefixCache, prefix_keys

log = logging.getLogger("rwkv_engine.serve")
FINISH = {"stop_token": "stop", "stop_string": "stop", "length": "length"}    # StreamLoop's -> the API's
FAILED = object()                         # what Scheduler._guarded returns when the call failed


class QueueFull(Exception):
    """The waiting queue is at its bound; the client should retry later."""


class ShuttingDown(Exception):
    """The server no longer admits requests."""


@dataclass
class Event:
    """One update of one choice: new text (possibly empty while held back) and/or its end."""
    index: int
    text: str = ""
    token: Optional[int] = None
    finish_reason: Optional[str] = None     # "stop" | "length" | "cancelled" | "error"
    error: Optional[str] = None


@dataclass
class Job:
    """One request: a tokenized prompt and how to continue it, `n` independent choices."""
    prompt: List[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    n: int = 1
    seed: Optional[int] = None
    stop: tuple = ()
    stop_at_eos: bool = True
    emit: Callable[[Event], None] = lambda event: None
    # filled in by the scheduler
    cancelled: bool = False
    submitted: float = 0.0
    cached_tokens: int = 0
    pos: int = 0
    state: Optional[State] = None
    logits: Optional[torch.Tensor] = None
    keys: Optional[dict] = None
    open_choices: int = 0

    def cancel(self):
        self.cancelled = True


class Stream:
    """One choice being decoded: its job, its state until it joins the batch, its per-stream loop."""

    def __init__(self, job, index, state, loop: StreamLoop):
        self.job, self.index, self.state, self.loop = job, index, state, loop
        self.next_token = None

    @property
    def done(self):
        return self.loop.done


def stream_loop(job, index, vocab_size, tokenizer, eos, device):
    """Choice `index` of `job`: its generator (seed + index), penalty counts, stop token and text."""
    seed = job.seed + index if job.seed is not None else secrets.randbits(62)
    p = job.sampling
    counts = torch.zeros(1, vocab_size, device=device) \
        if p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0 else None
    return StreamLoop(p, job.max_tokens, generator=torch.Generator(device=device).manual_seed(seed), counts=counts,
                      stop_tokens={eos} if job.stop_at_eos and eos is not None else (),
                      text=TextStream(tokenizer, job.stop) if tokenizer is not None else None)


# ---------------------------------------------------------------------------------------------
# 1. Planning: what runs this step (never touches the model)

class Planner:
    def __init__(self, chunk, prefill_rows, batched_prefill):
        self.chunk, self.prefill_rows, self.batched_prefill = chunk, prefill_rows, batched_prefill

    def chunk_end(self, job):
        """Where the job's next chunk ends: the next absolute multiple of `chunk`, or the prompt's end."""
        return min(len(job.prompt), (job.pos // self.chunk + 1) * self.chunk)

    def chunk_group(self, jobs):
        """-> (the jobs whose next chunks run together, their length): the first job's next chunk and,
        with batched prefill, those of the following jobs of the same length, at most `prefill_rows`
        tokens in all."""
        group, length = [], None
        for job in jobs:
            n = self.chunk_end(job) - job.pos
            if length is None:
                length = n
            elif n != length or (len(group) + 1) * n > self.prefill_rows:
                continue
            group.append(job)
            if not self.batched_prefill:
                break
        return group, length


# ---------------------------------------------------------------------------------------------
# 2. Execution: the only part that runs the model

class Executor:
    def __init__(self, model, cache: Optional[PrefixCache], metrics: Metrics, chunk):
        self.model, self.cache, self.metrics, self.chunk = model, cache, metrics, chunk

    def start_prompt(self, job):
        """The job's prompt state: the longest cached prefix, else a fresh state."""
        hit = self.cache.lookup(job.prompt) if self.cache is not None else None
        if self.cache is not None:
            (self.metrics.cache_hits if hit else self.metrics.cache_misses).inc()
            job.keys = prefix_keys(job.prompt, self.chunk)
        if hit:
            job.pos, job.state, job.cached_tokens = hit.length, hit.state, hit.length
            job.logits = None if hit.logits is None else hit.logits[None]
        else:
            job.pos, job.state = 0, self.model.new_state(1)

    def run_chunks(self, group, length):
        """The next `length` prompt tokens of every job in `group` in one sequence-mode forward, under
        row-independent kernels; each job's state is updated -> logits [len(group), V]."""
        ids = torch.tensor([job.prompt[job.pos:job.pos + length] for job in group], dtype=torch.long,
                           device=self.model.device)
        state = group[0].state if len(group) == 1 else type(group[0].state).cat([j.state for j in group])
        with dispatch.rows_independent():
            logits, _ = self.model.forward(ids, state)          # state updated in place
        if len(group) > 1:
            for i, job in enumerate(group):
                job.state = state.select([i])
        return logits

    def fork(self, job):
        """One state per choice: the prompt's own for the last, copies for the others."""
        return [job.state if i == job.n - 1 else job.state.clone() for i in range(job.n)]

    def stack(self, batch_state, states):
        """New streams' states stacked under the batch's (a State, or a pipeline's on every rank)."""
        states = ([batch_state] if batch_state is not None else []) + states
        return type(states[0]).cat(states)

    def decode(self, tokens, batch_state):
        """One token per decoding stream [B] -> logits [B, V], in one batched token-mode forward."""
        ids = torch.tensor([[t] for t in tokens], dtype=torch.long, device=self.model.device)
        logits, _ = self.model.forward(ids, batch_state)
        return logits


# ---------------------------------------------------------------------------------------------
# The scheduler: its thread, its queues, and the output step

class Scheduler:
    def __init__(self, model, max_batch=32, max_queue=64, chunk=32, cache: Optional[PrefixCache] = None,
                 metrics: Optional[Metrics] = None, prefill_rows=64):
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue), ("chunk", chunk),
                            ("prefill_rows", prefill_rows)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not (getattr(model, "batched_token_mode", False) and getattr(model, "state_copy", False)):
            raise ValueError(f"the scheduler decodes streams in one batch of stacked states: {model!r} does not "
                             "say it can (batched_token_mode, state_copy)")
        self.max_batch, self.max_queue, self.chunk, self.prefill_rows = max_batch, max_queue, chunk, prefill_rows
        self.cache, self.metrics = cache, metrics or Metrics()
        # a pipeline's ranks split a batch into micro-batches of their own: its prompts run one at a time
        self.planner = Planner(chunk, prefill_rows, bool(getattr(model, "batched_prefill", False)))
        self.executor = Executor(model, cache, self.metrics, chunk)
        self.tokenizer = getattr(model, "tokenizer", None)
        self.eos = getattr(self.tokenizer, "eos_id", None)     # the stop token comes from the tokenizer
        self.on_logits = None           # debug hook: f(job, index, logits [1, V]) before each sample
        self.waiting, self.prefilling, self.decoding = deque(), [], []
        self.batch_state: Optional[State] = None       # rows in the order of self.decoding
        self._cond = threading.Condition()
        self._held = None               # events held back while streams join the batch
        # hand_off(batch): where set, the events of each prefill step and each decode step are collected
        # ([(job, event)], in order) and handed over in one call once the step's sampling is done, not
        # by one job.emit per event; the server hands them to its event loop in one wake-up, so that
        # loop does not contend for the GIL with the step's output work (see serve.api.hand_off)
        self.hand_off: Optional[Callable[[list], None]] = None
        self._outbox = []               # the step's events, collected where hand_off is set
        self._stopping = self._closed = self._cancel_requested = False
        self._drain_timer = None
        self._thread = threading.Thread(target=self._run, name="rwkv-scheduler", daemon=True)

    @property
    def model(self):
        return self.executor.model

    @model.setter
    def model(self, model):
        self.executor.model = model

    # -- called from other threads --------------------------------------------------------------
    def start(self):
        self._thread.start()
        return self

    def submit(self, job: Job):
        """Queue a job (raises QueueFull or ShuttingDown). Events arrive through job.emit."""
        if not job.prompt or job.max_tokens < 1 or not 1 <= job.n <= self.max_batch:
            raise ValueError(f"a job needs a prompt, max_tokens >= 1 and 1 <= n <= max_batch={self.max_batch}; "
                             f"got {len(job.prompt)} prompt tokens, max_tokens={job.max_tokens}, n={job.n}")
        with self._cond:
            if self._stopping or self._closed:
                raise ShuttingDown("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} waiting requests)")
            job.submitted = time.perf_counter()
            self.waiting.append(job)
            self.metrics.queue_depth.set(len(self.waiting))
            self._cond.notify()
        return job

    def cancel(self, job: Job):
        job.cancel()
        with self._cond:
            self._cond.notify()

    def drain(self, grace_s):
        """Stop admitting now; cancel whatever is still in flight after `grace_s` seconds."""
        with self._cond:
            self._closed = True
        self._drain_timer = threading.Timer(grace_s, self._request_cancel_all)
        self._drain_timer.daemon = True
        self._drain_timer.start()

    def _request_cancel_all(self):
        with self._cond:
            self._cancel_requested = True
            self._cond.notify()

    def stop(self, timeout=30.0):
        """Stop admitting, cancel what is in flight, and join the thread."""
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def active_streams(self):
        return len(self.decoding) + sum(job.n for job in self.prefilling)

    # -- the loop (scheduler thread only) -------------------------------------------------------
    def _run(self):
        while True:
            with self._cond:
                while not (self._stopping or self.waiting or self.prefilling or self.decoding):
                    self._cond.wait()
                if self._stopping:
                    break
                if self._cancel_requested:
                    for job in list(self.waiting) + self.prefilling + [s.job for s in self.decoding]:
                        job.cancel()
                self._admit()
            self._guarded("prefill step", self._prefill_step, jobs=lambda: self.prefilling)
            self._hand_off()                                 # the first tokens go out before the decode step
            self._guarded("decode step", self._decode_step, streams=lambda: self.decoding)
            if self._guarded("retiring", self._retire, streams=lambda: self.decoding) is FAILED:
                self.decoding, self.batch_state = [], None          # their rows cannot be taken out
            self._hand_off()
        self._cancel_all()
        self._hand_off()

    def _hand_off(self):
        """The events collected since the last hand-off, to hand_off in one call."""
        if self._outbox:
            batch, self._outbox = self._outbox, []
            try:
                self.hand_off(batch)
            except Exception:                             # noqa: BLE001 - as a failed emit: never stop the loop
                log.debug("hand-off failed", exc_info=True)

    def _admit(self):
        """Drop cancelled waiting jobs; move waiting jobs into prefill while slots are free."""
        for job in [j for j in self.waiting if j.cancelled]:
            self.waiting.remove(job)
            self._end_job(job, "cancelled")
        while self.waiting and self.active_streams + self.waiting[0].n <= self.max_batch:
            job = self.waiting.popleft()
            self.prefilling.append(job)
            self.metrics.prompt_tokens.inc(len(job.prompt))
        self.metrics.queue_depth.set(len(self.waiting))
        self.metrics.active.set(self.active_streams)

    def _prefill_step(self):
        """Prompt states for new jobs, then one (batched) step of prompt chunks; a job whose prompt is
        done (or was wholly cached) starts its streams."""
        for job in [j for j in self.prefilling if j.cancelled]:
            self._unqueue(job)
            self._end_job(job, "cancelled")
        for job in [j for j in self.prefilling if j.state is None]:
            self._guarded("prefill", lambda: self.executor.start_prompt(job), jobs=[job])
        for job in [j for j in self.prefilling if j.pos == len(j.prompt)]:     # the whole prompt was cached
            self._unqueue(job)
            self._start_streams(job)
        group, length = self.planner.chunk_group(self.prefilling)
        if not group:
            return
        t0 = time.perf_counter()
        logits = self._guarded("prefill", lambda: self.executor.run_chunks(group, length), jobs=group)
        self.metrics.prefill_seconds.inc(time.perf_counter() - t0)
        if logits is FAILED:
            return
        for i, job in enumerate(group):
            job.logits = logits[i:i + 1]
            self._chunk_done(job, job.pos + length)
            if job.pos == len(job.prompt):
                self._unqueue(job)
                self._start_streams(job)

    def _chunk_done(self, job, end):
        """The job's prompt ran up to `end`: cache the state at a chunk boundary and at the prompt's end."""
        self.metrics.prefill_tokens.inc(end - job.pos)
        job.pos = end
        if self.cache is not None:
            if end % self.chunk == 0 and end < len(job.prompt):
                self.cache.put(job.keys[end], job.state)
            if end == len(job.prompt):
                self.cache.put(job.keys[end], job.state, job.logits[0])
            self.metrics.cache_bytes.set(self.cache.bytes)

    def _decode_step(self):
        """One token for every decoding stream: the batched forward, then each stream samples its row."""
        self._retire()
        if not self.decoding:
            return
        t0 = time.perf_counter()
        logits = self.executor.decode([s.next_token for s in self.decoding], self.batch_state)
        t1 = time.perf_counter()
        self.metrics.decode_seconds.inc(t1 - t0)
        self.metrics.batch_size.set(len(self.decoding))
        self.metrics.decode_batch.observe(len(self.decoding))
        self._sample_rows(logits)
        self.metrics.output_seconds.inc(time.perf_counter() - t1)

    # -- 3. output: sample, apply each stream's loop, emit, retire ----------------------------
    def _start_streams(self, job):
        """The prompt is done: sample each choice's first token; live choices join the batch."""
        if job.cancelled:
            return self._end_job(job, "cancelled")
        self.metrics.ttft.observe(time.perf_counter() - job.submitted)
        job.open_choices = job.n
        streams = self._guarded("starting the streams", lambda: self._new_streams(job), jobs=[job])
        if streams is FAILED:
            return
        # the first tokens' events go out once the streams are in the batch: a client that has its
        # first token finds its stream counted in active_streams (/health, /metrics)
        self._held = []
        try:
            for s in streams:
                self._accept_or_fail(s, job.logits)
            job.state = job.logits = None
            joined = [s for s in streams if not s.done]
            if joined:
                self._guarded("joining the batch", lambda: self._join(joined), streams=joined)
        finally:
            held, self._held = self._held, None
            for event in held:
                self._emit(*event)

    def _new_streams(self, job):
        vocab, device = self.model.vocab_size, self.model.device
        return [Stream(job, i, state, stream_loop(job, i, vocab, self.tokenizer, self.eos, device))
                for i, state in enumerate(self.executor.fork(job))]

    def _join(self, joined):
        """Stack the states of new streams under the batch's."""
        self.batch_state = self.executor.stack(self.batch_state, [s.state for s in joined])
        for s in joined:
            s.state = None
        self.decoding.extend(joined)

    def _sample_rows(self, logits):
        """Each decoding stream samples from its own row; rows of streams sampled by temperature alone
        go together, one call per temperature, where `rwkv_kernels.sample_rows` has a kernel for these
        logits (the table says; else each row alone)."""
        plain = {}                  # temperature -> rows of streams sampled by temperature alone
        together = rwkv_kernels.sample_rows_serves(logits)      # the dispatch table's answer
        for row, s in enumerate(self.decoding):
            if together and s.loop.plain_temperature(logits.shape[-1]):
                plain.setdefault(s.job.sampling.temperature, []).append(row)
            else:
                self._accept_or_fail(s, logits[row:row + 1])
        for temperature, rows in plain.items():
            self._accept_rows(rows, logits, temperature)

    def _accept_rows(self, rows, logits, temperature):
        """`_accept` for the streams of `rows`, all sampled by `temperature` alone, in one call:
        each row with its stream's generator, so the tokens are those `_accept` would draw."""
        live = [row for row in rows if self._still_wanted(self.decoding[row], logits[row:row + 1])]
        if not live:
            return
        picked = logits if len(live) == logits.shape[0] else logits[live]
        streams = [self.decoding[r] for r in live]
        tokens = self._guarded("sampling", lambda: sample_temperature_rows(
            picked, temperature, [s.loop.generator for s in streams]), streams=streams)
        if tokens is FAILED:
            return
        for s, token in zip(streams, tokens):
            if isinstance(token, Exception):            # this row's logits were not finite: this stream only
                log.error("sampling failed: %s: %s", type(token).__name__, token)
                self._fail(token, streams=[s])
            else:
                self._guarded("sampling", lambda: self._take(s, token), streams=[s])

    def _accept_or_fail(self, s: Stream, logits):
        """Sample one token for stream `s` from logits (1, V) and send what it adds (a failure, e.g.
        non-finite logits, ends this stream only)."""
        if self._still_wanted(s, logits):
            self._guarded("sampling", lambda: self._take(s, s.loop.sample(logits)), streams=[s])

    def _still_wanted(self, s: Stream, logits):
        """Show the debug hook the row; a cancelled stream ends here instead of sampling."""
        if self.on_logits is not None:
            self.on_logits(s.job, s.index, logits)
        if s.job.cancelled:
            self._finish(s, "cancelled")
            return False
        return True

    def _take(self, s: Stream, token):
        """Stream `s` drew `token`: its loop ends it (stop token, stop string, max_tokens) or not;
        send what it adds."""
        taken = s.loop.take(token)
        if taken.token is not None:
            self.metrics.generated_tokens.inc()
        text = taken.text or ""
        if taken.finish is not None:
            return self._finish(s, FINISH[taken.finish], taken.token, text)
        s.next_token = token
        self._emit(s.job, Event(s.index, text, token))

    def _finish(self, s: Stream, reason, token=None, text=None, error=None):
        """Send stream `s`'s last event; `text` is its last piece (default: whatever its text still
        holds back, for a stream ended from outside its loop)."""
        if text is None:
            text = s.loop.end()
        self._emit(s.job, Event(s.index, text, token, reason, error))
        s.job.open_choices -= 1
        if s.job.open_choices == 0:
            self.metrics.requests.labels(outcome="ok" if reason in ("stop", "length") else reason).inc()

    def _retire(self):
        """Remove finished or cancelled streams and their rows of the stacked state."""
        for s in self.decoding:
            if s.job.cancelled and not s.done:
                self._finish(s, "cancelled")
        keep = [i for i, s in enumerate(self.decoding) if not s.done]
        if len(keep) == len(self.decoding):
            return
        self.batch_state = self.batch_state.select(keep) if keep else None
        self.decoding = [self.decoding[i] for i in keep]
        self.metrics.active.set(self.active_streams)
        if not self.decoding:
            self.metrics.batch_size.set(0)

    # -- failures, endings, events --------------------------------------------------------------
    def _guarded(self, what, fn, jobs=(), streams=()):
        """fn() -> its result; if it raises, the jobs and streams concerned (lists, or callables giving
        them at the time of the failure) end with an error event and FAILED is returned: one failure
        ends what it concerns, never the scheduler thread."""
        try:
            return fn()
        except Exception as e:                        # noqa: BLE001 - these jobs/streams, not the server
            log.exception("%s failed", what)
            self._fail(e, jobs() if callable(jobs) else jobs, streams() if callable(streams) else streams)
            return FAILED

    def _fail(self, exc, jobs=(), streams=()):
        """End `jobs` (taken out of prefill; no streams yet) and the live ones of `streams` with an
        error event naming `exc`; failed streams leave the batch at the next retire."""
        error = f"{type(exc).__name__}: {exc}"
        for job in list(jobs):
            self._unqueue(job)
            self._end_job(job, "error", error=error)
        for s in list(streams):
            if not s.done:
                self._finish(s, "error", error=error)

    def _unqueue(self, job):
        self.prefilling = [j for j in self.prefilling if j is not job]

    def _end_job(self, job, reason, error=None):
        """End every choice of a job that has no streams yet."""
        job.state = job.logits = None
        for i in range(job.n):
            self._emit(job, Event(i, finish_reason=reason, error=error))
        self.metrics.requests.labels(outcome=reason).inc()

    def _cancel_all(self):
        for job in list(self.waiting) + self.prefilling:
            self._end_job(job, "cancelled")
        for s in self.decoding:
            if not s.done:
                self._finish(s, "cancelled")
        self.waiting.clear()
        self.prefilling, self.decoding, self.batch_state = [], [], None

    def _emit(self, job, event):
        if self._held is not None:                        # see _start_streams
            self._held.append((job, event))
            return
        if self.hand_off is not None:                     # collected, handed off after the step
            self._outbox.append((job, event))
            return
        try:
            job.emit(event)
        except Exception:                                 # noqa: BLE001 - a gone client must not stop the loop
            log.debug("emit failed", exc_info=True)
