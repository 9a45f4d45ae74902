"""The generation loop shared by RWKV and every transformer baseline (gpt-fast `prefill` /
`decode_one_token` / `generate`).

A model only needs:
    model.new_state(batch_size, max_len)  -> a fresh recurrent state or KV cache
    model.forward(tokens [B, T], state)   -> (logits [B, V] float32 for the last position, state)
    model.tokenizer                       -> a tokenizer or None
The prompt is fed in one call (prefill), then one token per call (decode).
"""
import time
from dataclasses import dataclass, field
from typing import Iterator, List, Optional

import torch

from .sampling import SamplingParams, sample


@dataclass
class Step:
    """One decode step: the token chosen for each stream (-1 for a stream that already stopped)
    and, when a tokenizer is known, the new text of each stream."""
    ids: List[int]
    text: Optional[List[str]] = None


@dataclass
class GenerationResult:
    tokens: List[List[int]]             # generated ids per stream, stop token excluded
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


def prompt_to_ids(prompt, tokenizer, vocab_size):
    """str | list[str] | list[int] | LongTensor [T] or [B, T] -> LongTensor [B, T] (validated)."""
    if isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], str)):
        if tokenizer is None:
            raise ValueError("prompt is text but this model has no tokenizer: pass token ids instead")
        texts = [prompt] if isinstance(prompt, str) else list(prompt)
        rows = [tokenizer.encode(t) for t in texts]
        if len({len(r) for r in rows}) > 1:
            raise ValueError(f"prompts tokenize to different lengths {[len(r) for r in rows]}: batch prompts must be equally long")
        ids = torch.tensor(rows, dtype=torch.long)
    else:
        if isinstance(prompt, (list, tuple)) and len(prompt) == 0:
            raise ValueError("empty prompt: give at least one token")
        ids = torch.as_tensor(prompt)
        if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"token ids must be integers, got dtype {ids.dtype}")
        ids = ids.long()
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2:
            raise ValueError(f"token ids must have shape [T] or [B, T], got {list(ids.shape)}")
    if ids.shape[-1] == 0 or ids.shape[0] == 0:
        raise ValueError("empty prompt: give at least one token")
    check_token_ids(ids, vocab_size)
    return ids


def as_token_batch(tokens, vocab_size, device):
    """What model.forward accepts -> LongTensor [B, T] on `device`, validated (one-line errors)."""
    if isinstance(tokens, (list, tuple)):
        tokens = torch.tensor(tokens, dtype=torch.long)
    if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"tokens must be a LongTensor [B, T] or a list of ints, got {getattr(tokens, 'dtype', type(tokens))}")
    if tokens.dim() == 1:
        tokens = tokens[None]
    if tokens.dim() != 2 or tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise ValueError(f"tokens must have shape [B, T] with B, T >= 1, got {list(tokens.shape)}")
    if bool(((tokens < 0) | (tokens >= vocab_size)).any()):            # one device sync
        check_token_ids(tokens, vocab_size)
    return tokens.to(device, torch.long)


def check_token_ids(ids, vocab_size):
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"token id {bad} out of range [0, {vocab_size})")


def _decode(tokenizer, ids):
    return tokenizer.decode(ids) if ids else ""


def stream(model, prompt, max_new_tokens=64, *, sampling=None, seed=None, stop_tokens=(),
           stop_strings=(), state=None, result=None, **sampling_kwargs) -> Iterator[Step]:
    """Generate token by token, yielding a `Step` as each token is chosen.

    sampling: a SamplingParams, or its fields as keyword arguments (temperature=0 is greedy).
    seed: makes sampling deterministic. stop_tokens / stop_strings end a stream (not emitted).
    state: continue from this state (the prompt is fed on top of it) instead of a fresh one.
    result: an optional GenerationResult filled in as the loop runs (timings, state, tokens).
    """
    if sampling is None:
        sampling = SamplingParams(**sampling_kwargs)
    elif sampling_kwargs:
        raise ValueError(f"give either sampling= or sampling keyword arguments, not both: {sorted(sampling_kwargs)}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    tokenizer = getattr(model, "tokenizer", None)
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer; this model has none (use stop_tokens)")
    if isinstance(stop_strings, str):
        stop_strings = (stop_strings,)
    ids = prompt_to_ids(prompt, tokenizer, model.vocab_size).to(model.device)
    B, T = ids.shape
    stop_set = set(int(t) for t in stop_tokens)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(int(seed))
    counts = None
    if sampling.repetition_penalty != 1.0 or sampling.presence_penalty or sampling.frequency_penalty:
        counts = torch.zeros(B, model.vocab_size, device=model.device)
    if state is None:
        state = model.new_state(B, max_len=T + max_new_tokens)

    res = result if result is not None else GenerationResult([], None, T, 0.0, 0.0)
    res.prompt_tokens, res.tokens = T, [[] for _ in range(B)]
    res.stop_reason = ["length"] * B
    texts = [""] * B if tokenizer is not None else None
    done = [False] * B

    t0 = time.perf_counter()
    logits, state = model.forward(ids, state)
    for step in range(max_new_tokens):
        next_ids = sample(logits, sampling, counts, generator)           # [B]
        chosen = next_ids.tolist()                                       # syncs the device
        now = time.perf_counter()
        if step == 0:
            res.prefill_s = now - t0
        else:
            res.step_s.append(now - t0)
        out, pieces = [], ([] if texts is not None else None)
        for i, tok in enumerate(chosen):
            if done[i]:
                out.append(-1)
                if pieces is not None:
                    pieces.append("")
                continue
            if tok in stop_set:
                done[i], res.stop_reason[i] = True, "stop_token"
                out.append(-1)
                if pieces is not None:
                    pieces.append("")
                continue
            res.tokens[i].append(tok)
            out.append(tok)
            if texts is not None:
                full = _decode(tokenizer, res.tokens[i])
                cut = min((full.find(s) for s in stop_strings if s in full), default=-1)
                if cut >= 0:
                    full, done[i], res.stop_reason[i] = full[:cut], True, "stop_string"
                if full.endswith("\ufffd") and not done[i]:
                    pieces.append("")           # an incomplete UTF-8 sequence: wait for more bytes
                    continue
                pieces.append(full[len(texts[i]):])
                texts[i] = full
        res.text = texts
        yield Step(out, pieces)
        if all(done) or step == max_new_tokens - 1:
            break
        if counts is not None:
            counts.scatter_add_(1, next_ids[:, None], torch.ones(B, 1, device=counts.device))
        t0 = time.perf_counter()
        logits, state = model.forward(next_ids[:, None], state)
    res.decode_s = sum(res.step_s)
    res.state = state


def generate(model, prompt, max_new_tokens=64, **kwargs) -> GenerationResult:
    """Run `stream` to the end and return the tokens, text, timings and final state."""
    result = GenerationResult([], None, 0, 0.0, 0.0)
    for _ in stream(model, prompt, max_new_tokens, result=result, **kwargs):
        pass
    return result
