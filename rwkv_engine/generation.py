"""The generation loop shared by RWKV and every transformer baseline (gpt-fast `prefill` /
`decode_one_token` / `generate`).

A model only needs what `rwkv_engine.contract.Model` lists:
    model.new_state(batch_size, max_len)  -> a fresh recurrent state or KV cache
    model.forward(tokens [B, T], state)   -> (logits [B, V] float32 for the last position, state)
    model.tokenizer                       -> a tokenizer or None
The prompt is fed in one call (`prefill`), then one token per call (`decode_one_token`); `Sampler`
chooses each token and one `TextStream` per stream turns tokens into text and applies stop strings.
"""
import time
from dataclasses import dataclass, field
from typing import List, NamedTuple, Optional

import torch

from .contract import prompt_to_ids
from .sampling import NonFiniteLogitsError, SamplingParams, plain_temperature, sample

REPLACEMENT = "\ufffd"      # what a decoder gives for bytes that are not (yet) valid UTF-8


@dataclass
class Step:
    """One decode step: the token chosen for each stream (-1 for a stream that already stopped)
    and, when a tokenizer is known, the new text of each stream."""
    ids: List[int]
    text: Optional[List[str]] = None


@dataclass
class GenerationResult:
    tokens: List[List[int]]             # generated ids per stream (see TextStream for stop strings)
    text: Optional[List[str]]           # decoded continuation per stream (None without tokenizer)
    prompt_tokens: int                  # prompt length per stream
    prefill_s: float                    # prompt forward + first sample
    decode_s: float                     # all later steps
    step_s: List[float] = field(default_factory=list)  # latency of each decode step
    state: object = None                # state after the last token fed to the model
    stop_reason: List[str] = field(default_factory=list)  # "length", "stop_token", "stop_string"

    @property
    def decode_tokens_per_s(self):
        return len(self.step_s) / self.decode_s if self.decode_s > 0 else float("nan")


# ---------------------------------------------------------------------------------------------
# Text: incremental decoding and stop strings, one stream at a time

class IncrementalDecoder:
    """Token ids in, new text out, decoding only a short window of recent tokens (O(1) per token).

    The window starts at the first token whose text is not final. Its decode is final except a
    trailing U+FFFD, which may be the start of a character whose remaining bytes are still to come:
    that one character is held back. Assumes a byte-level tokenizer (GPT-NeoX/GPT-2/Bloom), whose
    decode of a sequence is the decodes of its parts joined at character boundaries."""

    HOLD_LIMIT = 8      # a window longer than this is split at a character boundary

    def __init__(self, decode):
        self.decode = decode
        self.ids = []
        self.start = 0          # first token of the window
        self.emitted = 0        # characters of decode(window) already returned

    def push(self, token) -> str:
        self.ids.append(token)
        out = self._split() if len(self.ids) - self.start > self.HOLD_LIMIT else ""
        full = self.decode(self.ids[self.start:])
        complete = not full.endswith(REPLACEMENT)
        stable = full if complete else full[:-1]
        out += stable[self.emitted:]
        self.emitted = max(self.emitted, len(stable))
        if complete:
            self.start, self.emitted = len(self.ids), 0
        return out

    def flush(self) -> str:
        """The rest of the text, a trailing incomplete character included (as U+FFFD)."""
        out = self.decode(self.ids[self.start:])[self.emitted:] if self.start < len(self.ids) else ""
        self.start, self.emitted = len(self.ids), 0
        return out

    def _split(self) -> str:
        """Move the window start to the last token boundary that is also a character boundary."""
        full = self.decode(self.ids[self.start:])
        for j in range(len(self.ids) - 1, self.start, -1):
            head = self.decode(self.ids[self.start:j])
            if head + self.decode(self.ids[j:]) == full:
                out = head[self.emitted:]
                self.start, self.emitted = j, max(0, self.emitted - len(head))
                return out
        return ""


def check_stop_strings(stop_strings):
    """A str or a sequence of non-empty str -> tuple of str."""
    if isinstance(stop_strings, str):
        stop_strings = (stop_strings,)
    stop_strings = tuple(stop_strings or ())
    for s in stop_strings:
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop strings must be non-empty str, got {s!r}")
    return stop_strings


class TextStream:
    """One stream's text: push each generated token, get back the text that is safe to emit.

    Emitted text is never taken back. Held back are only an incomplete UTF-8 character and the
    longest tail that could still be the start of a stop string. When a stop string appears, the
    stream is `stopped`, `text` ends just before it, and `tokens` keeps exactly the tokens whose
    text starts before the stop string (so `text` is `decode(tokens)` cut where the stop string
    begins, and equal to it when the stop string starts at a token boundary). `finish()` releases
    what is held back when the stream ends for another reason."""

    def __init__(self, tokenizer, stop_strings=()):
        self.stop_strings = check_stop_strings(stop_strings)
        self.tokens: List[int] = []
        self.text = ""              # everything emitted so far
        self.stopped = False
        self._decoder = IncrementalDecoder(tokenizer.decode)
        self._held = ""             # decoded, not yet emitted
        self._starts: List[int] = []  # per token: characters decoded before it

    def push(self, token) -> str:
        if self.stopped:
            raise ValueError("this stream already stopped at a stop string")
        self.tokens.append(int(token))
        self._starts.append(len(self.text) + len(self._held))
        self._held += self._decoder.push(int(token))
        return self._release(final=False)

    def finish(self) -> str:
        if self.stopped:
            return ""
        self._held += self._decoder.flush()
        return self._release(final=True)

    def _release(self, final):
        cut = min((i for i in (self._held.find(s) for s in self.stop_strings) if i >= 0), default=-1)
        if cut >= 0:
            out, self.stopped = self._held[:cut], True
            stop_at = len(self.text) + cut
            del self.tokens[sum(1 for start in self._starts if start < stop_at):]
        else:
            out = self._held if final else self._held[:len(self._held) - self._could_start_stop()]
        self._held = "" if self.stopped else self._held[len(out):]
        self.text += out
        return out

    def _could_start_stop(self):
        """Length of the longest tail of the held text that is a proper prefix of a stop string."""
        held = self._held
        return max((k for s in self.stop_strings for k in range(min(len(s) - 1, len(held)), 0, -1)
                    if held.endswith(s[:k])), default=0)


# ---------------------------------------------------------------------------------------------
# The loop's pieces

def prefill(model, ids, state):
    """The prompt [B, T] in one forward -> (logits [B, V] at its last position, state)."""
    return model.forward(ids, state)


def decode_one_token(model, next_ids, state):
    """The tokens just chosen [B] -> (logits [B, V] for the following position, state)."""
    return model.forward(next_ids[:, None], state)


class Sampler:
    """How one batch chooses its tokens: the parameters, a seeded generator, and the counts of
    tokens generated so far [B, V] (only kept when a penalty needs them; row i is stream i's
    `StreamLoop.counts`, which its loop updates)."""

    def __init__(self, params: SamplingParams, batch_size, vocab_size, device, seed=None):
        self.params = params
        self.generator = None if seed is None else torch.Generator(device=device).manual_seed(int(seed))
        self.batch_size = batch_size
        self.counts = torch.zeros(batch_size, vocab_size, device=device) if needs_counts(params) else None

    def __call__(self, logits, step, rows=None):
        """logits [B, V] (of streams rows[0]:rows[1] when given) -> LongTensor [B]; non-finite
        logits raise, naming the step."""
        counts = self.counts if rows is None or self.counts is None else self.counts[rows[0]:rows[1]]
        try:
            return sample(logits, self.params, counts, self.generator)
        except NonFiniteLogitsError as e:
            raise NonFiniteLogitsError(f"step {step}: {e}") from None

    def loops(self, max_tokens, stop_tokens=(), make_text=lambda: None):
        """One StreamLoop per stream, sharing this sampler's generator and counts (row i: stream i)."""
        B = self.batch_size
        rows = [None] * B if self.counts is None else [self.counts[i:i + 1] for i in range(B)]
        return [StreamLoop(self.params, max_tokens, generator=self.generator, counts=rows[i],
                           stop_tokens=stop_tokens, text=make_text()) for i in range(B)]


def needs_counts(params: SamplingParams):
    """Whether sampling by `params` reads the counts of tokens generated so far (a penalty)."""
    return params.repetition_penalty != 1.0 or bool(params.presence_penalty) or bool(params.frequency_penalty)


class Taken(NamedTuple):
    """What one chosen token did to a stream (StreamLoop.take)."""
    token: Optional[int]            # the token to report; None for a stop token (not emitted)
    text: Optional[str]             # the new text (None without tokenizer)
    finish: Optional[str]           # None while it goes on, else "length", "stop_token" or "stop_string"


class StreamLoop:
    """One stream of a decode loop, the same for the library (`generate`, `stream`), the server's
    scheduler and the pipeline's `decode_interleaved`: what choosing its tokens needs (sampling
    parameters, generator, penalty counts: a [1, V] row or None), and what happens to each token
    once chosen (`take`: stop tokens, max_tokens, text and stop strings).

    Only tokens a live stream takes count in its penalties: a finished stream takes no more."""

    def __init__(self, params: SamplingParams, max_tokens, *, generator=None, counts=None, stop_tokens=(),
                 text: Optional[TextStream] = None):
        self.params, self.generator, self.counts = params, generator, counts
        self.max_tokens, self.stop_tokens, self.text = max_tokens, stop_tokens, text
        self.tokens = text.tokens if text is not None else []      # what it generated (see TextStream)
        self.n_tokens, self.finish = 0, None

    @property
    def done(self):
        return self.finish is not None

    def plain_temperature(self, vocab_size):
        """Sampled by temperature alone (no penalties, top-k or top-p): rows of such streams can be
        drawn together (sampling.sample_temperature_rows)."""
        return plain_temperature(self.params, vocab_size, self.counts)

    def sample(self, logits):
        """logits [1, V] -> this stream's next token, by its own parameters, counts and generator."""
        return int(sample(logits, self.params, self.counts, self.generator))

    def take(self, token) -> Taken:
        """Apply the chosen token: a stop token ends the stream (not emitted); any other is
        generated (counted, its text pushed) and ends the stream at a stop string or max_tokens."""
        if token in self.stop_tokens:
            self.finish = "stop_token"
            return Taken(None, self.text.finish() if self.text is not None else None, self.finish)
        self.n_tokens += 1
        if self.counts is not None:
            self.counts[0, token] += 1
        last = self.n_tokens >= self.max_tokens
        if self.text is None:
            self.tokens.append(token)
            self.finish = "length" if last else None
            return Taken(token, None, self.finish)
        piece = self.text.push(token)
        if self.text.stopped:
            self.finish = "stop_string"
        elif last:
            self.finish, piece = "length", piece + self.text.finish()
        return Taken(token, piece, self.finish)

    def end(self):
        """End the stream for a reason of the caller's (cancelled, an error): the text it still held
        back ("" when it has none)."""
        self.finish = self.finish or "ended"
        return self.text.finish() if self.text is not None else ""


def _sampling_params(sampling, kwargs):
    if sampling is None:
        return SamplingParams(**kwargs)
    if kwargs:
        raise ValueError(f"give either sampling= or sampling keyword arguments, not both: {sorted(kwargs)}")
    if not isinstance(sampling, SamplingParams):
        raise ValueError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
    return sampling


def _stop_token_set(stop_tokens):
    if any(isinstance(t, bool) or not isinstance(t, int) for t in stop_tokens):
        raise ValueError(f"stop_tokens must be ints, got {list(stop_tokens)!r}")
    return set(stop_tokens)


class Generation:
    """One run of the loop over B streams: iterate it for `Step`s; `result` (a GenerationResult)
    is kept up to date as it runs. Arguments are checked when it is created."""

    def __init__(self, model, prompt, max_new_tokens=64, *, sampling=None, seed=None, stop_tokens=(),
                 stop_strings=(), state=None, **sampling_kwargs):
        params = _sampling_params(sampling, sampling_kwargs)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        tokenizer = getattr(model, "tokenizer", None)
        stop_strings = check_stop_strings(stop_strings)
        if stop_strings and tokenizer is None:
            raise ValueError("stop_strings need a tokenizer; this model has none (use stop_tokens)")
        stops = _stop_token_set(stop_tokens)
        self.model, self.max_new_tokens = model, max_new_tokens
        self.ids = prompt_to_ids(prompt, tokenizer, model.vocab_size).to(model.device)
        B, T = self.ids.shape
        self.sampler = Sampler(params, B, model.vocab_size, model.device, seed)
        self.streams = self.sampler.loops(max_new_tokens, stops, lambda: TextStream(tokenizer, stop_strings)
                                          if tokenizer else None)
        self.result = GenerationResult([s.tokens for s in self.streams], None, T, 0.0, 0.0,
                                       stop_reason=["length"] * B)
        if tokenizer is not None:
            self.result.text = [""] * B
        self._state = state if state is not None else model.new_state(B, max_len=T + max_new_tokens)
        self._steps = self._run()

    def __iter__(self):
        return self

    def __next__(self) -> Step:
        return next(self._steps)

    def _run(self):
        t0 = time.perf_counter()
        logits, self.result.state = prefill(self.model, self.ids, self._state)
        for step in range(self.max_new_tokens):
            next_ids = self.sampler(logits, step)                        # [B]
            chosen = next_ids.tolist()                                   # syncs the device
            self._time(step, time.perf_counter() - t0)
            yield self._record(chosen)
            if all(s.done for s in self.streams):
                return
            t0 = time.perf_counter()
            logits, self.result.state = decode_one_token(self.model, next_ids, self.result.state)

    def _time(self, step, seconds):
        if step == 0:
            self.result.prefill_s = seconds
        else:
            self.result.step_s.append(seconds)
            self.result.decode_s += seconds

    def _record(self, chosen) -> Step:
        """Each live stream takes its token; a finished one reports -1 (and "" with a tokenizer)."""
        none = "" if self.result.text is not None else None
        taken = [s.take(token) if not s.done else Taken(-1, none, None) for s, token in zip(self.streams, chosen)]
        self.result.stop_reason = [s.finish or "length" for s in self.streams]
        ids = [-1 if t.token is None else t.token for t in taken]
        if self.result.text is None:
            return Step(ids)
        self.result.text = [s.text.text for s in self.streams]
        return Step(ids, [t.text for t in taken])


def stream(model, prompt, max_new_tokens=64, **kwargs) -> Generation:
    """Generate token by token: iterate the returned `Generation` for a `Step` as each token is chosen.

    sampling: a SamplingParams, or its fields as keyword arguments (temperature=0 is greedy).
    seed: makes sampling deterministic. stop_tokens / stop_strings end a stream (not emitted; see
    TextStream for how tokens and text agree at a stop string).
    state: continue from this state (the prompt is fed on top of it) instead of a fresh one.
    The run's GenerationResult is `.result` of the returned object.
    """
    return Generation(model, prompt, max_new_tokens, **kwargs)


def generate(model, prompt, max_new_tokens=64, **kwargs) -> GenerationResult:
    """Run the loop to the end and return the tokens, text, timings and final state."""
    run = Generation(model, prompt, max_new_tokens, **kwargs)
    for _ in run:
        pass
    return run.result
