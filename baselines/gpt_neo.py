"""GPT-Neo: global and local (sliding window of `window` positions) attention layers, scores NOT
scaled by 1/sqrt(head_dim), q/k/v without bias (fused into one matrix at load), gelu_new MLP."""
from .common import TransformerLM, activation, attend, attention_span, fuse, layer_norm, linear, split_heads, take
from .config import GPTNeoConfig
from .family import Family, register


class GPTNeo(TransformerLM):
    def __init__(self, config: GPTNeoConfig, sd, **kw):
        super().__init__(config, **kw)
        self.embed = sd.pop("transformer.wte.weight")                              # [V, C]
        self.head = self.embed if config.tied else sd.pop("lm_head.weight")        # [V, C]
        self.positions = sd.pop("transformer.wpe.weight")                          # [max_len, C]
        self.act = activation(config.activation)
        self.layers = []
        for i in range(config.n_layer):
            p = f"transformer.h.{i}."
            self.layers.append(dict(
                local=config.attention_layers[i] == "local",
                ln1=take(sd, p + "ln_1"),
                qkv=fuse(*(take(sd, f"{p}attn.attention.{n}_proj") for n in "qkv")),  # [3C, C], no bias
                out=take(sd, p + "attn.attention.out_proj"),
                ln2=take(sd, p + "ln_2"),
                fc1=take(sd, p + "mlp.c_fc"), fc2=take(sd, p + "mlp.c_proj")))
        self.ln_f = take(sd, "transformer.ln_f")

    def _hidden(self, ids, cache):
        c, (B, T), pos = self.config, ids.shape, cache.pos
        eps = c.layer_norm_eps
        spans = (attention_span(pos, T, device=self.device),                     # global, local
                 attention_span(pos, T, window=c.window, device=self.device))
        x = self.embed[ids] + self.positions[pos:pos + T]                          # [B, T, C]
        for i, L in enumerate(self.layers):
            q, k, v = split_heads(linear(layer_norm(x, L["ln1"], eps), *L["qkv"]), c.n_head, per_head=False)
            keys, values = cache.update(i, k, v)                                   # [B, nh, pos+T, hd]
            x = x + linear(attend(q, keys, values, spans[L["local"]], scale=1.0), *L["out"])
            x = x + linear(self.act(linear(layer_norm(x, L["ln2"], eps), *L["fc1"])), *L["fc2"])
        return layer_norm(x, self.ln_f, eps)


def _neo(name, n_layer, n_embd, n_head):
    return GPTNeoConfig(n_layer, n_embd, n_head, 50257, name=name)


register(Family(GPTNeoConfig, GPTNeo, label="GPT-Neo", style=("tab:purple", "D"), sizes=(
    _neo("gpt-neo-125m", 12, 768, 12),
    _neo("gpt-neo-1.3b", 24, 2048, 16),
    _neo("gpt-neo-2.7b", 32, 2560, 20),
)))
