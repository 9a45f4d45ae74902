"""The state of a transformer baseline: a KV cache preallocated for the longest sequence (gpt-fast
`KVCache`), or, for the paper's protocol, just the tokens seen so far.

A cache from `model.new_state(max_len=N)` holds exactly N positions and refuses more. One that
`model.forward(tokens)` creates by itself is `growable`: it doubles its length when a forward
needs more (amortised O(1) per token, as users of transformers' dynamic cache expect)."""
from dataclasses import dataclass

import torch


@dataclass
class KVCache:
    """Keys and values of every layer for B streams, allocated once for `max_len` positions.
    Positions [0, pos) are filled; a forward of T tokens writes [pos, pos + T) and advances pos."""
    k: torch.Tensor     # [n_layer, B, n_head, max_len, head_dim]
    v: torch.Tensor     # [n_layer, B, n_head, max_len, head_dim]
    pos: int = 0
    growable: bool = False

    @classmethod
    def allocate(cls, n_layer, batch_size, n_head, max_len, head_dim, device="cpu", dtype=torch.float32,
                 growable=False):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len must be an int >= 1, got {max_len!r}")
        shape = (n_layer, batch_size, n_head, max_len, head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype),
                   growable=growable)

    def reserve(self, needed, limit=None):
        """Make room for `needed` positions: a growable cache at least doubles (up to `limit`, the
        model's position limit); a fixed one raises. Returns the (new) max_len."""
        if needed <= self.max_len:
            return self.max_len
        if not self.growable:
            raise ValueError(f"{needed - self.pos} tokens at position {self.pos} exceed the cache's {self.max_len} "
                             f"positions (it was made by new_state(max_len={self.max_len}): ask for more)")
        if limit is not None and needed > limit:
            raise ValueError(f"{needed} positions exceed the model's {limit} positions")
        new_len = max(needed, 2 * self.max_len) if limit is None else min(max(needed, 2 * self.max_len), limit)
        shape = (*self.k.shape[:3], new_len, self.k.shape[4])
        for name in ("k", "v"):
            old = getattr(self, name)
            grown = old.new_zeros(shape)
            grown[:, :, :, :self.pos] = old[:, :, :, :self.pos]
            setattr(self, name, grown)
        return new_len

    @property
    def batch_size(self):
        return self.k.shape[1]

    @property
    def max_len(self):
        return self.k.shape[3]

    @property
    def nbytes(self):
        return 2 * self.k.numel() * self.k.element_size()

    def update(self, layer, k, v):
        """Store k, v [B, n_head, T, head_dim] at positions [pos, pos + T) of `layer`; return that
        layer's keys and values for positions [0, pos + T), each [B, n_head, pos + T, head_dim]."""
        end = self.pos + k.shape[2]
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def clone(self):
        """An independent copy (fork a stream)."""
        return KVCache(self.k.clone(), self.v.clone(), self.pos, self.growable)

    def reset(self):
        self.pos = 0


@dataclass
class TokenHistory:
    """Paper protocol: no cache, the whole sequence is run again at every step."""
    tokens: torch.Tensor    # [B, pos] every token fed so far
    max_len: int            # positions it may hold (a growable history: the model's limit, or None)
    growable: bool = False

    @property
    def pos(self):
        return self.tokens.shape[1]

    @property
    def batch_size(self):
        return self.tokens.shape[0]

    def clone(self):
        return TokenHistory(self.tokens.clone(), self.max_len, self.growable)
