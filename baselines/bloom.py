"""Bloom: ALiBi position bias (no position table), LayerNorm on the embedding, tied head, fused qkv
whose rows are interleaved per head (view(nh, 3, hd)), tanh-GELU MLP."""
import math

import torch

from .common import ACTIVATIONS, TransformerLM, attend, attention_span, layer_norm, linear, split_heads, take
from .config import BloomConfig
from .family import Family, register


def alibi_slopes(n_head):
    """Head h's slope: 2^(-8(h+1)/n) for n a power of two. Otherwise the n' = 2^floor(log2 n) slopes of
    n', then every other slope of 2n' (odd powers) for the remaining heads (Press et al., as Bloom)."""
    n = 2 ** math.floor(math.log2(n_head))
    slopes = [2 ** (-8 * (h + 1) / n) for h in range(n)]
    extra = [2 ** (-8 * (h + 1) / (2 * n)) for h in range(0, 2 * (n_head - n), 2)]
    return torch.tensor(slopes + extra, dtype=torch.float32)                      # [n_head]


class Bloom(TransformerLM):
    def __init__(self, config: BloomConfig, sd, **kw):
        super().__init__(config, **kw)
        t = "transformer."
        self.embed = sd.pop(t + "word_embeddings.weight")                          # [V, C]
        self.head = self.embed if config.tied else sd.pop("lm_head.weight")        # [V, C]
        self.ln_embed = take(sd, t + "word_embeddings_layernorm")
        self.act = ACTIVATIONS["bloom_gelu"]
        self.layers = []
        for i in range(config.n_layer):
            p = f"{t}h.{i}."
            self.layers.append(dict(
                ln1=take(sd, p + "input_layernorm"), qkv=take(sd, p + "self_attention.query_key_value"),
                out=take(sd, p + "self_attention.dense"), ln2=take(sd, p + "post_attention_layernorm"),
                fc1=take(sd, p + "mlp.dense_h_to_4h"), fc2=take(sd, p + "mlp.dense_4h_to_h")))
        self.ln_f = take(sd, t + "ln_f")
        self.slopes = alibi_slopes(config.n_head)
        self.alibi = None
        self._cover(config.max_len)

    def _cover(self, max_len):
        """ALiBi table [nh, 1, max_len]: slope_h * key position j. Softmax ignores the per-query constant,
        so this equals the relative form slope_h * (j - i)."""
        if self.alibi is None or self.alibi.shape[-1] < max_len:
            table = self.slopes[:, None, None] * torch.arange(max_len, dtype=torch.float32)
            self.alibi = table.to(self.device, self.dtype)

    def _hidden(self, ids, cache):
        c, (B, T), pos = self.config, ids.shape, cache.pos
        eps = c.layer_norm_eps
        span = attention_span(pos, T, alibi=self.alibi, device=self.device)
        x = layer_norm(self.embed[ids], self.ln_embed, eps)                        # [B, T, C]
        for i, L in enumerate(self.layers):
            h = layer_norm(x, L["ln1"], eps)
            residual = h if c.residual_post_ln else x
            q, k, v = split_heads(linear(h, *L["qkv"]), c.n_head, per_head=True)   # [B, nh, T, hd] each
            keys, values = cache.update(i, k, v)
            x = residual + linear(attend(q, keys, values, span), *L["out"])       # [B, T, C]
            h = layer_norm(x, L["ln2"], eps)
            residual = h if c.residual_post_ln else x
            x = residual + linear(self.act(linear(h, *L["fc1"])), *L["fc2"])
        return layer_norm(x, self.ln_f, eps)


def _bloom(name, n_layer, n_embd, n_head):
    return BloomConfig(n_layer, n_embd, n_head, 250880, name=name)


# the paper's Bloom "1b" is bloom-1b1
register(Family(BloomConfig, Bloom, label="Bloom", style=("tab:orange", "v"), sizes=(
    _bloom("bloom-560m", 24, 1024, 16),
    _bloom("bloom-1b1", 24, 1536, 16),
    _bloom("bloom-1b7", 24, 2048, 16),
    _bloom("bloom-3b", 30, 2560, 32),
), aliases={"bloom-1b": "bloom-1b1"}))
