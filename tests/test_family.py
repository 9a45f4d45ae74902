"""A fifth transformer family is one module: defined here, inside the test, with RMSNorm (no LayerNorm),
no position embedding, and n_head * head_dim != n_embd. Registering it is all it takes for config.json
lookup, named sizes, aliases, loading (synthetic weights), generation and the benchmark's legends."""
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F

import baselines
from baselines.common import TransformerLM, attend, attention_span, linear, split_heads
from baselines.config import TransformerConfig, config_from_hf
from baselines.family import FAMILIES, Family, register, unregister


@dataclass(frozen=True)
class ToyConfig(TransformerConfig):
    tied: bool = False

    family: ClassVar[str] = "toy"
    model_type: ClassVar[str] = "toyformer"
    prefix: ClassVar[str] = "model."
    token_embedding: ClassVar[str] = "model.embed.weight"
    position_limit: ClassVar[bool] = False

    def shapes(self):
        C, A, Fd, V = self.n_embd, self.attention_dim, self.ffn_dim, self.vocab_size
        s = {"model.embed.weight": (V, C), "model.norm.weight": (C,), "lm_head.weight": (V, C)}
        for i in range(self.n_layer):
            p = f"model.layers.{i}."
            s.update({p + "norm1.weight": (C,), p + "qkv.weight": (3 * A, C), p + "out.weight": (C, A),
                      p + "norm2.weight": (C,), p + "up.weight": (Fd, C), p + "down.weight": (C, Fd)})
        return s

    @classmethod
    def from_hf(cls, d, name=""):
        return cls(n_layer=d["num_hidden_layers"], n_embd=d["hidden_size"], n_head=d["num_attention_heads"],
                   head_dim=d["head_dim"], vocab_size=d["vocab_size"], ffn_dim=d["intermediate_size"],
                   max_len=d["max_position_embeddings"], layer_norm_eps=d["rms_norm_eps"], name=name)

    def to_hf(self):
        return dict(model_type=self.model_type, num_hidden_layers=self.n_layer, hidden_size=self.n_embd,
                    num_attention_heads=self.n_head, head_dim=self.head_dim, vocab_size=self.vocab_size,
                    intermediate_size=self.ffn_dim, max_position_embeddings=self.max_len,
                    rms_norm_eps=self.layer_norm_eps)


def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


class Toy(TransformerLM):
    def __init__(self, config, sd, **kw):
        super().__init__(config, **kw)
        self.embed, self.head = sd.pop("model.embed.weight"), sd.pop("lm_head.weight")
        self.norm = sd.pop("model.norm.weight")
        self.layers = [{k: sd.pop(f"model.layers.{i}.{k}.weight") for k in ("norm1", "qkv", "out", "norm2", "up", "down")}
                       for i in range(config.n_layer)]

    def _hidden(self, ids, cache):
        c, (B, T), pos = self.config, ids.shape, cache.pos
        span = attention_span(pos, T, device=self.device)
        x = self.embed[ids]
        for i, L in enumerate(self.layers):
            q, k, v = split_heads(linear(rms_norm(x, L["norm1"], c.layer_norm_eps), L["qkv"]), c.n_head, per_head=False)
            keys, values = cache.update(i, k, v)
            x = x + linear(attend(q, keys, values, span), L["out"])
            x = x + linear(F.silu(linear(rms_norm(x, L["norm2"], c.layer_norm_eps), L["up"])), L["down"])
        return rms_norm(x, self.norm, self.config.layer_norm_eps)


TOY = ToyConfig(2, 32, 2, 97, ffn_dim=64, head_dim=24, max_len=128, name="toy-2l")      # 2 * 24 != 32


def reference_logits(model, ids):
    """Plain causal attention over the whole sequence, written independently of baselines.common."""
    c = model.config
    x = model.embed[ids]
    T = ids.shape[1]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    for L in model.layers:
        h = rms_norm(x, L["norm1"], c.layer_norm_eps) @ L["qkv"].T                     # [B, T, 3A]
        q, k, v = h.view(*ids.shape, 3, c.n_head, c.head_dim).permute(2, 0, 3, 1, 4)    # [B, nh, T, hd]
        scores = (q @ k.transpose(-1, -2)) / c.head_dim ** 0.5
        y = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v
        x = x + y.transpose(1, 2).reshape(*ids.shape, -1) @ L["out"].T
        x = x + F.silu(rms_norm(x, L["norm2"], c.layer_norm_eps) @ L["up"].T) @ L["down"].T
    return rms_norm(x, model.norm, c.layer_norm_eps) @ model.head.T


@pytest.fixture
def toy_family():
    family = register(Family(ToyConfig, Toy, sizes=(TOY,), label="Toy", style=("tab:cyan", "P"),
                             aliases={"toy-small": "toy-2l"}))
    try:
        yield family
    finally:
        unregister("toyformer")
        import bench.models
        bench.models.config.cache_clear()


def test_a_family_registered_from_one_module_works_everywhere(toy_family, tmp_path):
    assert FAMILIES["toyformer"] is toy_family and "toy-2l" in baselines.list_models()
    assert baselines.get_config("someorg/Toy-Small") is TOY
    assert config_from_hf(TOY.to_hf(), name="toy-2l") == TOY
    model = baselines.load("toy-2l", cache_dir=tmp_path)
    assert isinstance(model, Toy) and model.synthetic
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    ours, _ = model.forward(ids, all_logits=True)
    torch.testing.assert_close(ours, reference_logits(model, ids), atol=1e-5, rtol=1e-5)
    res = model.generate(ids, max_new_tokens=6, temperature=0)                 # the shared loop
    full = torch.cat([ids, torch.tensor(res.tokens)], 1)
    assert torch.equal(reference_logits(model, full)[:, 8:-1].argmax(-1), torch.tensor(res.tokens))
    cache = model.new_state(2, 20)
    assert cache.k.shape == (2, 2, 2, 20, 24) and model.kv_cache_bytes(2, 20) == cache.nbytes
    assert model.n_params == sum(torch.Size(s).numel() for s in TOY.shapes().values())


def test_the_benchmark_reads_the_registered_label_and_style(toy_family):
    import bench.models
    assert bench.models.family_of("toy-2l") == "toy"
    assert bench.models.family_label("toy") == "Toy" and bench.models.family_style("toy") == ("tab:cyan", "P")
    assert bench.models.family_label("pythia") == "Pythia" and bench.models.family_label("rwkv") == "RWKV-4"
    assert "toy-2l" in bench.models.families()["toy"]


def test_registering_a_taken_name_or_model_type_fails(toy_family):
    with pytest.raises(ValueError, match="model_type 'toyformer' is already registered"):
        register(Family(ToyConfig, Toy))
    with pytest.raises(ValueError, match=r"size names \['pythia-160m'\] are already registered"):
        @dataclass(frozen=True)
        class Other(ToyConfig):
            model_type: ClassVar[str] = "other"
        register(Family(Other, Toy, sizes=(Other(1, 8, 1, 10, name="pythia-160m"),)))
    assert "other" not in FAMILIES


def test_the_four_paper_families_are_registered_by_their_modules():
    assert {f.name: f.model.__module__ for f in FAMILIES.values()} == {
        "pythia": "baselines.gpt_neox", "opt": "baselines.opt", "gpt-neo": "baselines.gpt_neo",
        "bloom": "baselines.bloom"}
