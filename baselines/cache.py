"""The state of a transformer baseline: a KV cache preallocated for the longest sequence (gpt-fast
`KVCache`), or, for the paper's protocol, just the tokens seen so far."""
from dataclasses import dataclass

import torch


@dataclass
class KVCache:
    """Keys and values of every layer for B streams, allocated once for `max_len` positions.
    Positions [0, pos) are filled; a forward of T tokens writes [pos, pos + T) and advances pos."""
    k: torch.Tensor     # [n_layer, B, n_head, max_len, head_dim]
    v: torch.Tensor     # [n_layer, B, n_head, max_len, head_dim]
    pos: int = 0

    @classmethod
    def allocate(cls, n_layer, batch_size, n_head, max_len, head_dim, device="cpu", dtype=torch.float32):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len must be an int >= 1, got {max_len!r}")
        shape = (n_layer, batch_size, n_head, max_len, head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

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
        return KVCache(self.k.clone(), self.v.clone(), self.pos)

    def reset(self):
        self.pos = 0


@dataclass
class TokenHistory:
    """Paper protocol: no cache, the whole sequence is run again at every step."""
    tokens: torch.Tensor    # [B, pos] every token fed so far
    max_len: int

    @property
    def pos(self):
        return self.tokens.shape[1]

    @property
    def batch_size(self):
        return self.tokens.shape[0]

    def clone(self):
        return TokenHistory(self.tokens.clone(), self.max_len)
