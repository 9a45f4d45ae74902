"""One sampler shared by the RWKV engine and every baseline (gpt-fast `logits_to_probs` / `sample`)."""
import math
from dataclasses import dataclass

import numpy as np
import torch

import rwkv_kernels

# Below this, logits / temperature overflow float32 for ordinary logits: use 0 (greedy) instead.
MIN_TEMPERATURE = 1e-4


class NonFiniteLogitsError(ValueError):
    """The logits (or the probabilities made from them) hold NaN or infinity."""


def _real(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _numpy_ok(t):
    return t.device.type == "cpu" and t.dtype == torch.float32 and not t.requires_grad


def check_finite(logits, what="logits"):
    """Raise NonFiniteLogitsError naming the first stream and token whose value is NaN or infinite.
    On the CPU the check runs in numpy, on one thread: torch splits a 50k-vocabulary reduction over
    its OpenMP threads, a parallel region per token that stalls for a scheduler time slice whenever
    another process holds a core (measured: 2.5 ms per check next to one CPU-bound process)."""
    if _numpy_ok(logits):
        if bool(np.isfinite(logits.numpy()).all()):
            return
    elif bool(torch.isfinite(logits).all()):
        return
    bad = ~torch.isfinite(logits)
    if bool(bad.any()):
        row, col = (int(i) for i in bad.nonzero()[0])
        raise NonFiniteLogitsError(f"{what} are not finite: stream {row}, token {col} is {float(logits[row, col])}")


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen from logits. temperature 0 means greedy (argmax)."""
    temperature: float = 1.0
    top_k: int = 0                  # 0: no top-k cut
    top_p: float = 1.0              # 1.0: no nucleus cut
    repetition_penalty: float = 1.0  # CTRL-style: divide positive logits (multiply negative) of seen tokens
    presence_penalty: float = 0.0    # subtract once for every token already generated
    frequency_penalty: float = 0.0   # subtract per occurrence of a token already generated

    def __post_init__(self):
        checks = [
            ("temperature", _real(self.temperature) and (self.temperature == 0 or self.temperature >= MIN_TEMPERATURE),
             f"0 (greedy) or a finite number >= {MIN_TEMPERATURE:g}"),
            ("top_k", isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k >= 0,
             "an int >= 0"),
            ("top_p", _real(self.top_p) and 0 < self.top_p <= 1, "in (0, 1]"),
            ("repetition_penalty", _real(self.repetition_penalty) and self.repetition_penalty > 0, "a finite number > 0"),
            ("presence_penalty", _real(self.presence_penalty), "a finite number"),
            ("frequency_penalty", _real(self.frequency_penalty), "a finite number"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"invalid sampling parameter {name}={getattr(self, name)!r}: must be {rule}")

    @property
    def greedy(self):
        return self.temperature == 0


def apply_penalties(logits, counts, params):
    """Penalise tokens already generated. logits: [B, V] float32; counts: [B, V] occurrences so far."""
    if params.repetition_penalty != 1.0:
        seen = counts > 0
        penalised = torch.where(logits > 0, logits / params.repetition_penalty,
                                logits * params.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if params.presence_penalty or params.frequency_penalty:
        logits = logits - params.presence_penalty * (counts > 0) - params.frequency_penalty * counts
    return logits


def logits_to_probs(logits, params):
    """[B, V] logits -> [B, V] probabilities after temperature, top-k and top-p."""
    if params.temperature != 1.0:
        logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample(logits, params, counts=None, generator=None):
    """Choose one token per row. logits: [B, V] float32 -> LongTensor [B].
    Raises NonFiniteLogitsError when the logits, or the probabilities derived from them, are not finite."""
    logits = logits.float()
    if _plain_temperature(logits, params, counts):
        # one pass-pair in C per row (rwkv_kernels.sample_rows), the same u draw as multinomial() below
        tokens = _sample_rows(logits, params.temperature, _uniform(logits.shape[0], generator, logits.device))
        if int(tokens.min()) < 0:                  # a row without a token
            raise _no_token_error(logits)
        return tokens
    check_finite(logits)
    if counts is not None:
        logits = apply_penalties(logits, counts, params)
        check_finite(logits, "logits after the penalties")
    if params.greedy:
        if _numpy_ok(logits):                       # one thread, as in check_finite; first maximum wins
            return torch.from_numpy(np.argmax(logits.numpy(), axis=-1))
        return torch.argmax(logits, dim=-1)
    probs = logits_to_probs(logits, params)
    check_finite(probs, "probabilities after temperature/top-k/top-p")
    return multinomial(probs, generator)


def plain_temperature(params, vocab_size, counts=None):
    """Whether `params` is temperature sampling alone: no penalties (counts), top-k or top-p."""
    return (not params.greedy and counts is None and params.top_p >= 1.0
            and (not params.top_k or params.top_k >= vocab_size))


def _plain_temperature(logits, params, counts):
    """Temperature sampling alone of logits `rwkv_kernels.sample_rows` has a kernel for (the table says)."""
    return plain_temperature(params, logits.shape[-1], counts) and rwkv_kernels.sample_rows_serves(logits)


def sample_temperature_rows(logits, temperature, generators):
    """Plain temperature sampling of every row of CPU float32 logits [B, V], row i with its own
    generators[i]: the token sample(logits[i:i+1], SamplingParams(temperature), None, generators[i])
    gives, for all rows in one `rwkv_kernels.sample_rows` call (rows in parallel). Returns a list with,
    per row, its token, or for a row holding NaN or infinity the NonFiniteLogitsError sample()
    raises for it (the other rows are unaffected)."""
    if not (rwkv_kernels.sample_rows_serves(logits) and logits.shape[0] == len(generators) and not temperature == 0):
        raise ValueError("sample_temperature_rows takes CPU float32 logits [B, V], B generators and a "
                         f"temperature > 0; got {tuple(logits.shape)} {logits.dtype} on {logits.device}, "
                         f"{len(generators)} generators, temperature {temperature}")
    SamplingParams(temperature=temperature)                            # validates it
    u = _uniform_rows(generators, logits.device)
    tokens = _sample_rows(logits, temperature, u).tolist()
    return [_no_token_error(logits[i:i + 1]) if token < 0 else token for i, token in enumerate(tokens)]


def _uniform(n, generator, device):
    """n draws in (0, 1], float64: sample()'s u, from torch.rand of the generator."""
    return (1.0 - torch.rand(n, generator=generator, device=device)).double()


def _uniform_rows(generators, device):
    """One draw per generator: row i is _uniform(1, generators[i], device), the same float32 operations
    done once for all rows (3 torch calls a row cost ~9 us each in a 16-stream output step)."""
    return (1.0 - torch.cat([torch.rand(1, generator=g, device=device) for g in generators])).double()


def _sample_rows(logits, temperature, u):
    return rwkv_kernels.sample_rows(logits if logits.is_contiguous() else logits.contiguous(), 1.0 / temperature, u)


def _no_token_error(logits):
    """Why rwkv_kernels.sample_rows gave no token for `logits`: a NonFiniteLogitsError naming the first
    NaN/inf, else a MemoryError (its scratch could not be allocated)."""
    try:
        check_finite(logits)
    except NonFiniteLogitsError as e:
        return e
    return MemoryError("rwkv_kernels.sample_rows: cannot allocate its scratch")


def multinomial(probs, generator=None):
    """One draw per row by inverting the CDF: O(V), where torch.multinomial on CPU costs ~50 ms
    for a 50k vocabulary. probs: [B, V], rows need not be normalised."""
    cdf = torch.cumsum(probs, dim=-1)                                   # (B, V)
    u = (1.0 - torch.rand(probs.shape[0], 1, generator=generator, device=probs.device)) * cdf[:, -1:]
    # first index with cdf >= u, u in (0, total]: always a token of positive probability
    return torch.searchsorted(cdf, u).squeeze(-1).clamp_(max=probs.shape[-1] - 1)
