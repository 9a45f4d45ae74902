"""Continuous batching: one thread owns the model and steps every active stream together
(vLLM's `Scheduler` + `LLMEngine.step`, for a model whose whole per-stream cache is a fixed-size state).

Each iteration of the loop:
  1. drops cancelled requests, admits waiting ones while slots are free (`max_batch` streams);
  2. prefill: runs one step of prompt chunks in sequence mode: the oldest job's next chunk, with the
     next chunks of the same length of other waiting jobs (states stacked along B, at most
     `prefill_rows` tokens; a pipeline's jobs run one at a time). Chunk boundaries sit at absolute
     multiples of `chunk` tokens whatever the load, and the products run on row-independent kernels
     (`kernels.dispatch.rows_independent`), so a prompt's results do not depend on its neighbours;
     a long prompt delays the decoding streams by one chunk step at a time;
  3. decode: one batched token-mode forward for all decoding streams (their states stacked along B),
     then each stream samples from its own row with its own generator, so a stream's tokens do not
     depend on its neighbours (given batch-invariant kernels); the rows of streams that sample by
     temperature alone are sampled in one call per temperature (each row alone, rows in parallel);
  4. retires finished streams (their rows leave the stacked state).
Results go back through each job's `emit(Event)` callback, called on the scheduler thread.
"""
import logging
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

from kernels import dispatch

from ..generation import TextStream
from ..model import RWKV
from ..sampling import SamplingParams, plain_temperature, sample, sample_temperature_rows
from ..state import State
from .metrics import Metrics
from .prefix_cache import PrefixCache, prefix_keys

log = logging.getLogger("rwkv_engine.serve")
EOS = 0                                   # <|endoftext|> of the GPT-NeoX-20B tokenizer


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
    """One choice being decoded: its generator, penalty counts and text."""

    def __init__(self, job, index, state, vocab_size, tokenizer, device):
        self.job, self.index, self.state = job, index, state
        seed = job.seed + index if job.seed is not None else secrets.randbits(62)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        p = job.sampling
        self.counts = torch.zeros(1, vocab_size, device=device) \
            if p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0 else None
        self.text = TextStream(tokenizer, job.stop) if tokenizer is not None else None
        self.n_tokens, self.next_token, self.done = 0, None, False


class Scheduler:
    def __init__(self, model, max_batch=32, max_queue=64, chunk=32, cache: Optional[PrefixCache] = None,
                 metrics: Optional[Metrics] = None, prefill_rows=64):
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue), ("chunk", chunk),
                            ("prefill_rows", prefill_rows)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.model, self.max_batch, self.max_queue, self.chunk = model, max_batch, max_queue, chunk
        self.prefill_rows = prefill_rows
        # several prompts' chunks in one forward: for a model in this process (a pipeline's ranks
        # split a batch into micro-batches of their own, so its prompts keep running one at a time)
        self.batch_prefill = isinstance(model, RWKV)
        self.cache, self.metrics = cache, metrics or Metrics()
        self.tokenizer = getattr(model, "tokenizer", None)
        self.on_logits = None           # debug hook: f(job, index, logits [1, V]) before each sample
        self.waiting, self.prefilling, self.decoding = deque(), [], []
        self.batch_state: Optional[State] = None       # rows in the order of self.decoding
        self._cond = threading.Condition()
        self._held = None               # events held back while streams join the batch
        self._stopping = self._closed = self._cancel_requested = False
        self._drain_timer = None
        self._thread = threading.Thread(target=self._run, name="rwkv-scheduler", daemon=True)

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
            try:
                self._prefill()
            except Exception as e:                        # noqa: BLE001 - fail these jobs, serve on
                log.exception("prefill step failed")
                for job in list(self.prefilling):
                    self.prefilling.remove(job)
                    self._fail(job, e)
            try:
                self._decode()
            except Exception as e:                        # noqa: BLE001
                log.exception("decode step failed")
                for s in self.decoding:
                    if not s.done:
                        self._finish(s, "error", error=f"{type(e).__name__}: {e}")
                self._retire()
        self._cancel_all()

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

    def _prefill(self):
        """Run one step of prompt chunks. With a local model, the oldest waiting job's next chunk runs
        together with the next chunks of the following jobs of the same length (states stacked along
        B, at most `prefill_rows` prompt tokens in all), under `dispatch.rows_independent()`: each
        prompt's results are the same whether it runs alone or with others. Chunk boundaries stay at
        absolute multiples of `chunk`, so the decoding streams wait for one (batched) chunk at most."""
        for job in [j for j in self.prefilling if j.cancelled]:
            self.prefilling.remove(job)
            self._end_job(job, "cancelled")
        group, length = [], None
        for job in list(self.prefilling):
            try:
                if job.state is None:
                    self._start_prefill(job)
            except Exception as e:                        # noqa: BLE001 - one bad job, not the server
                log.exception("prefill failed")
                self.prefilling.remove(job)
                self._fail(job, e)
                continue
            if job.pos == len(job.prompt):                # the whole prompt was cached
                self.prefilling.remove(job)
                self._start_streams(job)
                continue
            n = self._chunk_end(job) - job.pos
            if length is None:
                length = n
            elif n != length or (len(group) + 1) * n > self.prefill_rows:
                continue
            group.append(job)
            if not self.batch_prefill:
                break
        if group:
            self._run_chunks(group, length)

    def _chunk_end(self, job):
        return min(len(job.prompt), (job.pos // self.chunk + 1) * self.chunk)

    def _run_chunks(self, group, length):
        """The next `length` prompt tokens of every job in `group` in one sequence-mode forward; a job
        whose prompt is then done starts its streams."""
        try:
            ids = torch.tensor([job.prompt[job.pos:job.pos + length] for job in group], dtype=torch.long,
                               device=self.model.device)
            state = group[0].state if len(group) == 1 else type(group[0].state).cat([j.state for j in group])
            with dispatch.rows_independent():
                logits, _ = self.model.forward(ids, state)          # (B, V); state updated in place
        except Exception as e:                            # noqa: BLE001 - these jobs, not the server
            log.exception("prefill failed")
            for job in group:
                self.prefilling.remove(job)
                self._fail(job, e)
            return
        for i, job in enumerate(group):
            if len(group) > 1:
                job.state = state.select([i])
            job.logits = logits[i:i + 1]
            self._chunk_done(job, job.pos + length)
            if job.pos == len(job.prompt):
                self.prefilling.remove(job)
                self._start_streams(job)

    def _start_prefill(self, job):
        hit = self.cache.lookup(job.prompt) if self.cache is not None else None
        if self.cache is not None:
            (self.metrics.cache_hits if hit else self.metrics.cache_misses).inc()
            job.keys = prefix_keys(job.prompt, self.chunk)
        if hit:
            job.pos, job.state, job.cached_tokens = hit.length, hit.state, hit.length
            job.logits = None if hit.logits is None else hit.logits[None]
        else:
            job.pos, job.state = 0, self.model.new_state(1)

    def _chunk_done(self, job, end):
        self.metrics.prefill_tokens.inc(end - job.pos)
        job.pos = end
        if self.cache is not None:
            if end % self.chunk == 0 and end < len(job.prompt):
                self.cache.put(job.keys[end], job.state)
            if end == len(job.prompt):
                self.cache.put(job.keys[end], job.state, job.logits[0])
            self.metrics.cache_bytes.set(self.cache.bytes)

    def _start_streams(self, job):
        """The prompt is done: sample each choice's first token; live choices join the batch."""
        if job.cancelled:
            return self._end_job(job, "cancelled")
        self.metrics.ttft.observe(time.perf_counter() - job.submitted)
        job.open_choices = job.n
        try:
            streams = [Stream(job, i, job.state if i == job.n - 1 else job.state.clone(), self.model.vocab_size,
                              self.tokenizer, self.model.device) for i in range(job.n)]
        except Exception as e:                            # noqa: BLE001 - e.g. out of memory; nothing sent yet
            log.exception("starting the streams failed")
            return self._fail(job, e)
        # the first tokens' events go out once the streams are in the batch: a client that has its
        # first token finds its stream counted in active_streams (/health, /metrics)
        self._held = []
        try:
            for s in streams:
                self._accept_or_fail(s, job.logits)
            job.state = job.logits = None
            self._join([s for s in streams if not s.done])
        finally:
            held, self._held = self._held, None
            for event in held:
                self._emit(*event)

    def _join(self, joined):
        """Stack the states of new streams under the batch's."""
        if not joined:
            return
        states = ([self.batch_state] if self.batch_state is not None else []) + [s.state for s in joined]
        try:
            self.batch_state = type(states[0]).cat(states)     # a State, or a pipeline's state on every rank
        except Exception as e:                            # noqa: BLE001 - these streams end; the batch goes on
            log.exception("joining the batch failed")
            for s in joined:
                self._finish(s, "error", error=f"{type(e).__name__}: {e}")
            return
        for s in joined:
            s.state = None
        self.decoding.extend(joined)

    def _decode(self):
        """One token for every decoding stream in one batched forward."""
        if not self.decoding:
            return
        self._retire()
        if not self.decoding:
            return
        tokens = torch.tensor([[s.next_token] for s in self.decoding], dtype=torch.long,
                              device=self.model.device)
        logits, _ = self.model.forward(tokens, self.batch_state)       # (B, V)
        self.metrics.batch_size.set(len(self.decoding))
        self.metrics.decode_batch.observe(len(self.decoding))
        plain = {}                  # temperature -> rows of streams sampled by temperature alone
        c_rows = logits.device.type == "cpu" and logits.dtype == torch.float32     # kernels.sample_rows' input
        for row, s in enumerate(self.decoding):
            if c_rows and plain_temperature(s.job.sampling, logits.shape[-1], s.counts):
                plain.setdefault(s.job.sampling.temperature, []).append(row)
            else:
                self._accept_or_fail(s, logits[row:row + 1])
        for temperature, rows in plain.items():
            self._accept_rows(rows, logits, temperature)
        self._retire()

    def _accept_rows(self, rows, logits, temperature):
        """`_accept` for the streams of `rows`, all sampled by `temperature` alone, in one call:
        each row with its stream's generator, so the tokens are those `_accept` would draw."""
        live = []
        for row in rows:
            s = self.decoding[row]
            if self.on_logits is not None:
                self.on_logits(s.job, s.index, logits[row:row + 1])
            if s.job.cancelled:
                self._finish(s, "cancelled")
            else:
                live.append(row)
        if not live:
            return
        try:
            picked = logits if len(live) == logits.shape[0] else logits[live]
            tokens = sample_temperature_rows(picked, temperature, [self.decoding[r].generator for r in live])
        except Exception as e:                            # noqa: BLE001 - e.g. no memory: these streams
            log.exception("sampling failed")
            for row in live:
                self._finish(self.decoding[row], "error", error=f"{type(e).__name__}: {e}")
            return
        for row, token in zip(live, tokens):
            s = self.decoding[row]
            try:
                if isinstance(token, Exception):
                    raise token
                self._take(s, token)
            except Exception as e:                        # noqa: BLE001 - this stream only
                log.error("sampling failed: %s: %s", type(e).__name__, e)
                self._finish(s, "error", error=f"{type(e).__name__}: {e}")

    def _accept_or_fail(self, s: Stream, logits):
        try:
            self._accept(s, logits)
        except Exception as e:                            # noqa: BLE001 - e.g. non-finite logits: this stream only
            log.exception("sampling failed")
            self._finish(s, "error", error=f"{type(e).__name__}: {e}")

    def _accept(self, s: Stream, logits):
        """Sample one token for stream `s` from logits (1, V) and send what it adds."""
        if self.on_logits is not None:
            self.on_logits(s.job, s.index, logits)
        if s.job.cancelled:
            return self._finish(s, "cancelled")
        self._take(s, int(sample(logits, s.job.sampling, s.counts, s.generator)))

    def _take(self, s: Stream, token):
        """Stream `s` drew `token`: end it at EOS, a stop string or max_tokens, else send its text."""
        if s.job.stop_at_eos and self.tokenizer is not None and token == EOS:
            return self._finish(s, "stop")
        s.n_tokens += 1
        self.metrics.generated_tokens.inc()
        if s.counts is not None:
            s.counts[0, token] += 1
        piece = s.text.push(token) if s.text is not None else ""
        if s.text is not None and s.text.stopped:
            return self._finish(s, "stop", token, piece)
        if s.n_tokens >= s.job.max_tokens:
            return self._finish(s, "length", token, piece + (s.text.finish() if s.text is not None else ""))
        s.next_token = token
        self._emit(s.job, Event(s.index, piece, token))

    def _finish(self, s: Stream, reason, token=None, text=None, error=None):
        """End stream `s`; `text` is its last piece (default: whatever its text still holds back)."""
        s.done = True
        if text is None:
            text = s.text.finish() if s.text is not None and not s.text.stopped else ""
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

    def _end_job(self, job, reason, error=None):
        """End every choice of a job that has no streams yet."""
        job.state = job.logits = None
        for i in range(job.n):
            self._emit(job, Event(i, finish_reason=reason, error=error))
        self.metrics.requests.labels(outcome=reason).inc()

    def _fail(self, job, exc):
        self._end_job(job, "error", error=f"{type(exc).__name__}: {exc}")

    def _cancel_all(self):
        for job in list(self.waiting) + self.prefilling:
            self._end_job(job, "cancelled")
        for s in self.decoding:
            self._finish(s, "cancelled")
        self.waiting.clear()
        self.prefilling, self.decoding, self.batch_state = [], [], None

    def _emit(self, job, event):
        if self._held is not None:                        # see _start_streams
            self._held.append((job, event))
            return
        try:
            job.emit(event)
        except Exception:                                 # noqa: BLE001 - a gone client must not stop the loop
            log.debug("emit failed", exc_info=True)
