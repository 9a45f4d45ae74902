"""OPT: learned positions (position p reads row p + 2), ReLU MLP, q/k/v fused into one matrix at load.
Pre-LN, except opt-350m: post-LN, no final LayerNorm, and a 512-wide embedding projected in and out."""
from .common import TransformerLM, activation, attend, attention_span, fuse, layer_norm, linear, split_heads, take
from .config import OPTConfig
from .family import Family, register


class OPT(TransformerLM):
    def __init__(self, config: OPTConfig, sd, **kw):
        super().__init__(config, **kw)
        d = "model.decoder."
        self.embed = sd.pop(d + "embed_tokens.weight")                             # [V, P]
        self.head = self.embed if config.tied else sd.pop("lm_head.weight")        # [V, P]
        self.positions = sd.pop(d + "embed_positions.weight")                      # [max_len + 2, C]
        self.project_in = sd.pop(d + "project_in.weight", None)                    # [C, P] or None
        self.project_out = sd.pop(d + "project_out.weight", None)                  # [P, C] or None
        self.act = activation(config.activation)
        self.layers = []
        for i in range(config.n_layer):
            p = f"{d}layers.{i}."
            self.layers.append(dict(
                ln_attn=take(sd, p + "self_attn_layer_norm"),
                qkv=fuse(*(take(sd, f"{p}self_attn.{n}_proj") for n in "qkv")),    # [3C, C]: q | k | v
                out=take(sd, p + "self_attn.out_proj"),
                ln_ffn=take(sd, p + "final_layer_norm"),
                fc1=take(sd, p + "fc1"), fc2=take(sd, p + "fc2")))
        self.ln_f = take(sd, d + "final_layer_norm")

    def _hidden(self, ids, cache):
        c, (B, T), pos = self.config, ids.shape, cache.pos
        eps, pre = c.layer_norm_eps, c.pre_ln
        span = attention_span(pos, T, device=self.device)
        x = self.embed[ids]                                                       # [B, T, P]
        if self.project_in is not None:
            x = linear(x, self.project_in)                                        # [B, T, C]
        x = x + self.positions[pos + c.position_offset:pos + c.position_offset + T]
        for i, L in enumerate(self.layers):
            h = layer_norm(x, L["ln_attn"], eps) if pre else x
            q, k, v = split_heads(linear(h, *L["qkv"]), c.n_head, per_head=False)  # [B, nh, T, hd] each
            keys, values = cache.update(i, k, v)
            x = x + linear(attend(q, keys, values, span), *L["out"])               # [B, T, C]
            if not pre:
                x = layer_norm(x, L["ln_attn"], eps)
            h = layer_norm(x, L["ln_ffn"], eps) if pre else x
            x = x + linear(self.act(linear(h, *L["fc1"])), *L["fc2"])
            if not pre:
                x = layer_norm(x, L["ln_ffn"], eps)
        if c.final_ln:
            x = layer_norm(x, self.ln_f, eps)
        if self.project_out is not None:
            x = linear(x, self.project_out)                                       # [B, T, P]
        return x


def _opt(name, n_layer, n_embd, n_head, **kw):
    return OPTConfig(n_layer, n_embd, n_head, 50272, name=name, **kw)


register(Family(OPTConfig, OPT, label="OPT", style=("tab:green", "^"), sizes=(
    _opt("opt-125m", 12, 768, 12),
    _opt("opt-350m", 24, 1024, 16, embed_dim=512, pre_ln=False),
    _opt("opt-1.3b", 24, 2048, 32),
    _opt("opt-2.7b", 32, 2560, 32),
    _opt("opt-6.7b", 32, 4096, 32),
    _opt("opt-13b", 40, 5120, 40),
)))
