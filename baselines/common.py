"""What the four transformer families share: ops (linear, layer norm, activations, attention over
the KV cache) and the model class the benchmark sees (same API as the RWKV engine).

Attention masks, decided in one place (`attention_span`), for T new queries at positions
[pos, pos + T) over the cached keys [0, pos + T):
  * one token (decode): no mask; a sliding window (GPT-Neo local layers) just slices the keys;
  * a prompt from position 0, plain causal: SDPA's own `is_causal`;
  * anything else (a prompt on top of a cache, a window, ALiBi): one explicit mask built per forward.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

import rwkv_kernels
from rwkv_engine import as_dtype, as_token_batch, generate, stream

from .cache import KVCache, TokenHistory


# ---------------------------------------------------------------------------------------------
# Ops

def linear(x, weight, bias=None):
    """x [..., in] @ weight[out, in]^T + bias -> [..., out] through `rwkv_kernels.linear` (its dispatch picks
    the implementation: the C decode kernels for small batches on CPU, else torch's GEMM)."""
    y = rwkv_kernels.linear(x, weight)
    if bias is not None:
        y += bias
    return y


def take(sd, module):
    """(weight, bias) of `module` popped from a state dict; None for what the checkpoint lacks."""
    return sd.pop(module + ".weight", None), sd.pop(module + ".bias", None)


def fuse(*layers):
    """Linear layers reading the same input -> one (weight, bias) stacked on the output dim: one matmul."""
    weights, biases = zip(*layers)
    return torch.cat(weights), (None if biases[0] is None else torch.cat(biases))


def layer_norm(x, norm, eps):
    """norm: (weight, bias), either None for a LayerNorm without affine parameters."""
    return F.layer_norm(x, (x.shape[-1],), norm[0], norm[1], eps)


def _gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"gelu": F.gelu, "gelu_new": _gelu_tanh, "gelu_fast": _gelu_tanh, "gelu_pytorch_tanh": _gelu_tanh,
               "bloom_gelu": _gelu_tanh, "relu": F.relu}


def activation(name):
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r} (supported: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


@dataclass
class AttentionSpan:
    """Which cached keys T new queries read: keys [start, pos + T), with `mask` (bool: may attend,
    or float: additive, [n_head or 1, T, keys]) or SDPA's own causal mask."""
    start: int = 0
    mask: Optional[torch.Tensor] = None
    causal: bool = False


def attention_span(pos, T, window=0, alibi=None, device=None):
    """window: attend to the last `window` positions only (0: all). alibi: [n_head, 1, max_len] table of
    slope_h * key_position, added to the scores (Bloom). device: where a mask is built."""
    start = max(0, pos + 1 - window) if window else 0
    end = pos + T
    if T == 1:                                  # decode: the window is exactly [start, end)
        return AttentionSpan(start, None if alibi is None else alibi[:, :, start:end])
    if alibi is None and not window and pos == 0:
        return AttentionSpan(0, None, causal=True)
    q_pos = torch.arange(pos, end, device=device)[:, None]                 # [T, 1]
    k_pos = torch.arange(start, end, device=device)[None]                  # [1, keys]
    allowed = k_pos <= q_pos
    if window:
        allowed &= k_pos > q_pos - window
    if alibi is None:
        return AttentionSpan(start, allowed)
    return AttentionSpan(start, alibi[:, :, start:end].masked_fill(~allowed, float("-inf")))  # [nh, T, keys]


def attend(q, k, v, span, scale=None):
    """q [B, nh, T, hd]; k, v [B, nh, pos + T, hd] (the cache up to the new tokens) -> [B, T, nh * hd]."""
    B, nh, T, hd = q.shape
    y = F.scaled_dot_product_attention(q, k[:, :, span.start:], v[:, :, span.start:], attn_mask=span.mask,
                                       is_causal=span.causal, scale=scale)   # [B, nh, T, hd]
    return y.transpose(1, 2).reshape(B, T, nh * hd)


def split_heads(qkv, n_head, per_head):
    """Fused projection [B, T, 3C] -> q, k, v each [B, nh, T, hd] (views, no copy).
    per_head=True: rows grouped per head (nh, 3, hd), GPT-NeoX/Bloom; False: (3, nh, hd), q|k|v."""
    B, T, _ = qkv.shape
    if per_head:
        return qkv.view(B, T, n_head, 3, -1).permute(3, 0, 2, 1, 4).unbind(0)
    return qkv.view(B, T, 3, n_head, -1).permute(2, 0, 3, 1, 4).unbind(0)


# ---------------------------------------------------------------------------------------------
# The model the benchmark sees

class TransformerLM:
    """A decoder-only transformer with a preallocated KV cache. A family subclass turns the
    checkpoint into inference form in `__init__` and implements `_hidden`; built by `baselines.load`."""

    protocol = "kv-cache"

    def __init__(self, config, device="cpu", dtype="float32", source="", synthetic=False, tokenizer=None, path=""):
        self.config = config
        self.device = torch.device(device)
        self.dtype = as_dtype(dtype)
        self.source = str(source)       # the checkpoint directory, or "synthetic"
        self.path = str(path)           # the checkpoint directory, synthetic ones included
        self.synthetic = synthetic
        self.tokenizer = tokenizer
        self.head = None            # [V, C or embed_dim], set by the family

    def _hidden(self, ids, cache):
        """ids [B, T] at positions [cache.pos, cache.pos + T) -> final hidden states [B, T, C]."""
        raise NotImplementedError

    def _cover(self, max_len):
        """Grow per-position tables (rotary, ALiBi) to `max_len` positions; once per cache."""

    # -- facts the benchmark and the generation loop read -----------------------------------
    @property
    def name(self):
        return self.config.name

    @property
    def vocab_size(self):
        return self.config.vocab_size

    @property
    def n_params(self):
        return self.config.n_params

    @property
    def weight_bytes_per_token(self):
        return self.config.weight_bytes_per_token(self.dtype.itemsize)

    def kv_cache_bytes(self, batch_size=1, seq_len=None):
        c = self.config
        return 2 * c.n_layer * batch_size * c.attention_dim * (seq_len or c.max_len) * self.dtype.itemsize

    def new_state(self, batch_size=1, max_len=None, growable=False):
        """An empty KV cache for `batch_size` streams of up to `max_len` positions (default: the
        checkpoint's max positions); `growable`: it doubles when a forward needs more."""
        c = self.config
        max_len = c.max_len if max_len is None else max_len
        if c.position_limit and isinstance(max_len, int) and max_len > c.max_len:
            raise ValueError(f"max_len {max_len} exceeds the {c.max_len} positions of {c.name or c.family}")
        cache = KVCache.allocate(c.n_layer, batch_size, c.n_head, max_len, c.head_dim, self.device, self.dtype,
                                 growable=growable)
        self._cover(max_len)
        return cache

    new_cache = new_state

    def __repr__(self):
        c = self.config
        src = "synthetic weights" if self.synthetic else self.source
        return (f"{type(self).__name__}({c.name or c.family}: {c.n_layer} layers, n_embd {c.n_embd}, "
                f"{self.dtype}, {self.device}, {src})")

    # -- forward ------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, tokens, state=None, all_logits=False):
        """tokens: LongTensor [B, T] (or [T] / list for one stream). Returns logits float32 [B, V] for
        the last position ([B, T, V] with all_logits) and the cache, updated in place (clone it
        first to keep the old one). state=None: a fresh growable cache (T positions, doubling as
        later forwards need)."""
        ids = self.check_tokens(tokens)
        B, T = ids.shape
        if state is None:
            state = self.new_state(B, max_len=T, growable=True)
        self._check_cache(state, B, T)
        x = self._hidden(ids, state)                                    # [B, T, C]
        state.pos += T
        if not all_logits:
            x = x[:, -1:]
        logits = linear(x, self.head).float()                           # [B, T or 1, V]
        return (logits if all_logits else logits[:, 0]), state

    __call__ = forward

    def check_tokens(self, tokens):
        return as_token_batch(tokens, self.vocab_size, self.device)

    def _check_cache(self, cache, B, T):
        if not isinstance(cache, KVCache):
            raise ValueError(f"state must be a baselines KVCache from model.new_state(), got {type(cache).__name__}")
        if cache.batch_size != B:
            raise ValueError(f"cache holds {cache.batch_size} streams but tokens have {B}")
        if cache.pos + T > cache.max_len:
            limit = self.config.max_len if self.config.position_limit else None
            self._cover(cache.reserve(cache.pos + T, limit))

    def generate(self, prompt, max_new_tokens=64, **kwargs):
        return generate(self, prompt, max_new_tokens, **kwargs)

    def stream(self, prompt, max_new_tokens=64, **kwargs):
        return stream(self, prompt, max_new_tokens, **kwargs)


class PaperProtocol:
    """The paper's benchmark protocol around a model: no KV cache; every call runs the whole
    sequence so far (the state is the token history) and returns the last position's logits."""

    protocol = "paper"

    def __init__(self, model):
        self.model = model

    def __getattr__(self, name):            # config, vocab_size, device, tokenizer, n_params, ...
        return getattr(self.model, name)

    def __repr__(self):
        return f"PaperProtocol({self.model!r})"

    def new_state(self, batch_size=1, max_len=None, growable=False):
        """An empty history; `growable`: limited only by the model's positions, not by `max_len`."""
        c = self.model.config
        limit = c.max_len if c.position_limit else None
        max_len = (c.max_len if max_len is None else max_len) if not growable else limit
        if c.position_limit and max_len > c.max_len:
            raise ValueError(f"max_len {max_len} exceeds the {c.max_len} positions of {c.name or c.family}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        return TokenHistory(torch.zeros(batch_size, 0, dtype=torch.long, device=self.model.device), max_len, growable)

    new_cache = new_state

    def forward(self, tokens, state=None, all_logits=False):
        ids = self.model.check_tokens(tokens)
        B, T = ids.shape
        if state is None:
            state = self.new_state(B, growable=True)
        if not isinstance(state, TokenHistory):
            raise ValueError(f"state must be a TokenHistory from model.new_state(), got {type(state).__name__}")
        if state.batch_size != B:
            raise ValueError(f"state holds {state.batch_size} streams but tokens have {B}")
        if state.max_len is not None and state.pos + T > state.max_len:
            raise ValueError(f"{T} tokens at position {state.pos} exceed the state's {state.max_len} positions")
        state.tokens = torch.cat([state.tokens, ids], dim=1)            # [B, pos + T]
        logits, _ = self.model.forward(state.tokens, None, all_logits)  # recompute everything
        return (logits[:, -T:] if all_logits else logits), state

    __call__ = forward

    def generate(self, prompt, max_new_tokens=64, **kwargs):
        return generate(self, prompt, max_new_tokens, **kwargs)

    def stream(self, prompt, max_new_tokens=64, **kwargs):
        return stream(self, prompt, max_new_tokens, **kwargs)
