"""Pythia / GPT-NeoX: rotary embedding on the first rotary_pct of each head (NeoX rotate_half style),
parallel residual x + attn(ln1(x)) + mlp(ln2(x)), untied head `embed_out`."""
import torch

from .common import TransformerLM, activation, attend, attention_span, layer_norm, linear, split_heads, take
from .config import GPTNeoXConfig
from .family import Family, register


def rotary_tables(config: GPTNeoXConfig, n_pos, device, dtype):
    """cos, sin [n_pos, rotary_dims / 2]: angle p * base^(-2i / rotary_dims) of position p, pair i."""
    dims = config.rotary_dims
    inv_freq = 1.0 / (config.rotary_base ** (torch.arange(0, dims, 2, dtype=torch.float32) / dims))
    angles = torch.arange(n_pos, dtype=torch.float32)[:, None] * inv_freq[None]   # [n_pos, dims/2], fp32
    return angles.cos().to(device, dtype), angles.sin().to(device, dtype)


def apply_rotary(x, cos, sin):
    """Rotate x [..., hd] in place on its first 2 * half dims; cos, sin [..., half] broadcast to x.
    rotate_half pairs dim i with dim i + half: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)."""
    half = cos.shape[-1]
    x1, x2 = x[..., :half], x[..., half:2 * half]
    r1 = x1 * cos - x2 * sin
    r2 = x2 * cos + x1 * sin
    x1.copy_(r1)
    x2.copy_(r2)


class GPTNeoX(TransformerLM):
    def __init__(self, config: GPTNeoXConfig, sd, **kw):
        """sd: the checkpoint's tensors (prefixed HF names), already on the device in the model dtype."""
        super().__init__(config, **kw)
        self.embed = sd.pop("gpt_neox.embed_in.weight")                            # [V, C]
        self.head = self.embed if config.tied else sd.pop("embed_out.weight")       # [V, C]
        self.act = activation(config.activation)
        self.layers = []
        for i in range(config.n_layer):
            p = f"gpt_neox.layers.{i}."
            self.layers.append(dict(ln1=take(sd, p + "input_layernorm"), qkv=take(sd, p + "attention.query_key_value"),
                                    out=take(sd, p + "attention.dense"), ln2=take(sd, p + "post_attention_layernorm"),
                                    fc1=take(sd, p + "mlp.dense_h_to_4h"), fc2=take(sd, p + "mlp.dense_4h_to_h")))
        self.ln_f = take(sd, "gpt_neox.final_layer_norm")
        self.cos = self.sin = None
        self._cover(config.max_len)

    def _cover(self, max_len):
        if self.cos is None or self.cos.shape[0] < max_len:
            self.cos, self.sin = rotary_tables(self.config, max_len, self.device, self.dtype)

    def _hidden(self, ids, cache):
        c, (B, T), pos = self.config, ids.shape, cache.pos
        eps = c.layer_norm_eps
        cos, sin = self.cos[pos:pos + T, None, None], self.sin[pos:pos + T, None, None]  # [T, 1, 1, rot/2]
        span = attention_span(pos, T, device=self.device)
        x = self.embed[ids]                                                       # [B, T, C]
        for i, L in enumerate(self.layers):
            qkv = linear(layer_norm(x, L["ln1"], eps), *L["qkv"])                  # [B, T, 3C]
            apply_rotary(qkv.view(B, T, c.n_head, 3, -1)[:, :, :, :2], cos, sin)   # q and k, in place
            q, k, v = split_heads(qkv, c.n_head, per_head=True)                    # [B, nh, T, hd] each
            keys, values = cache.update(i, k, v)                                   # [B, nh, pos+T, hd]
            a = linear(attend(q, keys, values, span), *L["out"])                   # [B, T, C]
            if c.parallel_residual:
                m = linear(self.act(linear(layer_norm(x, L["ln2"], eps), *L["fc1"])), *L["fc2"])
                x = m + a + x
            else:
                x = x + a
                x = linear(self.act(linear(layer_norm(x, L["ln2"], eps), *L["fc1"])), *L["fc2"]) + x
        return layer_norm(x, self.ln_f, eps)


def _pythia(name, n_layer, n_embd, n_head, vocab_size):
    return GPTNeoXConfig(n_layer, n_embd, n_head, vocab_size, name=name)


# vocab sizes are the padded embedding rows of each checkpoint; the paper's Pythia 6.7B/13B were renamed
register(Family(GPTNeoXConfig, GPTNeoX, label="Pythia", style=("tab:blue", "s"), sizes=(
    _pythia("pythia-160m", 12, 768, 12, 50304),
    _pythia("pythia-410m", 24, 1024, 16, 50304),
    _pythia("pythia-1.4b", 24, 2048, 16, 50304),
    _pythia("pythia-2.8b", 32, 2560, 32, 50304),
    _pythia("pythia-6.9b", 32, 4096, 32, 50432),
    _pythia("pythia-12b", 36, 5120, 40, 50688),
), aliases={"pythia-6.7b": "pythia-6.9b", "pythia-13b": "pythia-12b"}))
