"""Transformer baseline shapes: `TransformerConfig`, the base every family's dataclass extends, the
dataclasses of the four paper families, and lookups over the registry of named sizes (gpt-fast
`ModelArgs` / `transformer_configs`). The sizes themselves are registered by each family's module
(`baselines.family`).

Each config reads a Hugging Face config.json (`from_hf`) and writes one back (`to_hf`, used for the
synthetic checkpoints). The numbers in MODELS are the released checkpoints' shapes.
"""
import math
from dataclasses import dataclass, field
from typing import ClassVar, Tuple

from rwkv_engine.files import dimension_problem

from .family import ALIASES, FAMILIES, MODELS  # noqa: F401  (filled by the family modules)


def _need(d, *keys):
    """The first of `keys` present in the config.json dict `d` (a config may use either name)."""
    for key in keys:
        if d.get(key) is not None:
            return d[key]
    raise ValueError(f"missing key {keys[0]!r}")


def _check_number(key, value, low, high=math.inf, high_ok=False):
    """value must be a real number with low < value < high (<= high with high_ok), else ValueError."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and low < value and \
        (value <= high if high_ok else value < high)
    if not ok:
        bound = f"in ({low:g}, {high:g}{']' if high_ok else ')'}" if math.isfinite(high) else f"> {low:g}"
        raise ValueError(f"config {key} must be a number {bound}, got {value!r}")


@dataclass(frozen=True)
class TransformerConfig:
    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int
    ffn_dim: int = 0            # 0: derived as 4 * n_embd
    max_len: int = 2048         # learned/rotary positions of the checkpoint; default KV-cache length
    layer_norm_eps: float = 1e-5
    tied: bool = True           # head shares the token embedding
    name: str = field(default="", compare=False)
    head_dim: int = 0           # 0: derived as n_embd // n_head (a family may use n_head * head_dim != n_embd)

    family: ClassVar[str] = ""              # the benchmark's family label
    model_type: ClassVar[str] = ""          # config.json model_type
    prefix: ClassVar[str] = ""              # key prefix of the base model in the HF state dict
    token_embedding: ClassVar[str] = ""     # state-dict key of the token embedding table
    position_embedding: ClassVar[str] = ""  # ... of the learned position table ("" if none)
    head: ClassVar[str] = "lm_head.weight"  # ... of the output head (absent from the file when tied)
    key_aliases: ClassVar[dict] = {}        # other names a key goes by in some files -> its name here
    position_limit: ClassVar[bool] = True   # learned position table: a cache may not exceed max_len

    def __post_init__(self):
        if self.ffn_dim == 0:
            object.__setattr__(self, "ffn_dim", 4 * self.n_embd)
        for key in ("n_layer", "n_embd", "n_head", "vocab_size", "ffn_dim", "max_len"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) <= 0:
                raise ValueError(f"config {key} must be a positive int, got {getattr(self, key)!r}")
            problem = dimension_problem(key, getattr(self, key))     # before shapes() lists the tensors
            if problem:
                raise ValueError(f"config {problem}")
        if self.head_dim == 0:
            if self.n_embd % self.n_head:
                raise ValueError(f"config n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
            object.__setattr__(self, "head_dim", self.n_embd // self.n_head)
        if not isinstance(self.head_dim, int) or self.head_dim <= 0:
            raise ValueError(f"config head_dim must be a positive int, got {self.head_dim!r}")
        _check_number("layer_norm_eps", self.layer_norm_eps, low=0.0)

    @property
    def max_positions(self):
        """Longest sequence the checkpoint was made for (None: no limit, ALiBi)."""
        return self.max_len

    @property
    def attention_dim(self):
        """Width of q, k and v: n_head * head_dim (n_embd in the four paper families)."""
        return self.n_head * self.head_dim

    def shapes(self):
        """Every tensor of the Hugging Face state dict (prefixed names) -> its shape."""
        raise NotImplementedError

    @property
    def n_params(self):
        """Parameter count of the checkpoint (a tied head counted once)."""
        return sum(math.prod(s) for s in self.shapes().values())

    def weight_bytes_per_token(self, bytes_per_weight=4):
        """Bytes of weights one decode step reads: every matrix, vector and the head; embedding
        tables only through the head when it is tied (one embedding row per token is ignored)."""
        shapes = self.shapes()
        tables = [k for k in (self.token_embedding, self.position_embedding) if k]
        n = self.n_params - sum(math.prod(shapes[k]) for k in tables)
        if self.tied:
            n += math.prod(shapes[self.token_embedding])
        return n * bytes_per_weight


_Common = TransformerConfig     # the old private name


def _linear(shapes, name, n_out, n_in, bias=True):
    shapes[name + ".weight"] = (n_out, n_in)
    if bias:
        shapes[name + ".bias"] = (n_out,)


def _norm(shapes, name, n, affine=True):
    if affine:
        shapes[name + ".weight"] = (n,)
        shapes[name + ".bias"] = (n,)


@dataclass(frozen=True)
class GPTNeoXConfig(TransformerConfig):
    """Pythia: rotary on the first rotary_pct of each head, parallel residual, untied `embed_out`."""
    tied: bool = False
    rotary_pct: float = 0.25
    rotary_base: float = 10000.0
    parallel_residual: bool = True
    attention_bias: bool = True
    activation: str = "gelu"

    family: ClassVar[str] = "pythia"
    model_type: ClassVar[str] = "gpt_neox"
    prefix: ClassVar[str] = "gpt_neox."
    token_embedding: ClassVar[str] = "gpt_neox.embed_in.weight"
    head: ClassVar[str] = "embed_out.weight"
    key_aliases: ClassVar[dict] = {"lm_head.weight": "embed_out.weight"}  # transformers 5 in memory
    position_limit: ClassVar[bool] = False  # rotary positions extrapolate (badly) but index no table

    def __post_init__(self):
        super().__post_init__()
        _check_number("rotary_pct", self.rotary_pct, low=0.0, high=1.0, high_ok=True)
        _check_number("rotary_base", self.rotary_base, low=0.0)

    @property
    def rotary_dims(self):
        return int(self.head_dim * self.rotary_pct)

    def shapes(self):
        C, F, V, s = self.n_embd, self.ffn_dim, self.vocab_size, {}
        s["gpt_neox.embed_in.weight"] = (V, C)
        for i in range(self.n_layer):
            p = f"gpt_neox.layers.{i}."
            _norm(s, p + "input_layernorm", C)
            _norm(s, p + "post_attention_layernorm", C)
            _linear(s, p + "attention.query_key_value", 3 * C, C, self.attention_bias)
            _linear(s, p + "attention.dense", C, C, self.attention_bias)
            _linear(s, p + "mlp.dense_h_to_4h", F, C)
            _linear(s, p + "mlp.dense_4h_to_h", C, F)
        _norm(s, "gpt_neox.final_layer_norm", C)
        if not self.tied:
            s["embed_out.weight"] = (V, C)
        return s

    @classmethod
    def from_hf(cls, d, name=""):
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"unsupported rope type {rope.get('rope_type', rope.get('type'))!r}")
        return cls(n_layer=_need(d, "num_hidden_layers"), n_embd=_need(d, "hidden_size"),
                   n_head=_need(d, "num_attention_heads"), vocab_size=_need(d, "vocab_size"),
                   ffn_dim=d.get("intermediate_size") or 0,
                   max_len=d.get("max_position_embeddings", 2048), layer_norm_eps=d.get("layer_norm_eps", 1e-5),
                   tied=d.get("tie_word_embeddings", False),
                   rotary_pct=float(rope.get("partial_rotary_factor", d.get("rotary_pct", 0.25))),
                   rotary_base=float(rope.get("rope_theta", d.get("rotary_emb_base", 10000.0))),
                   parallel_residual=d.get("use_parallel_residual", True),
                   attention_bias=d.get("attention_bias", True), activation=d.get("hidden_act", "gelu"), name=name)

    def to_hf(self):
        return dict(architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox", num_hidden_layers=self.n_layer,
                    hidden_size=self.n_embd, num_attention_heads=self.n_head, vocab_size=self.vocab_size,
                    intermediate_size=self.ffn_dim, max_position_embeddings=self.max_len,
                    layer_norm_eps=self.layer_norm_eps, tie_word_embeddings=self.tied, rotary_pct=self.rotary_pct,
                    rotary_emb_base=self.rotary_base, use_parallel_residual=self.parallel_residual,
                    attention_bias=self.attention_bias, hidden_act=self.activation, bos_token_id=0, eos_token_id=0)


@dataclass(frozen=True)
class OPTConfig(TransformerConfig):
    """OPT: learned positions (offset 2), ReLU MLP. opt-350m: post-LN, 512-wide embedding + project_in/out."""
    embed_dim: int = 0          # word_embed_proj_dim; 0: n_embd
    pre_ln: bool = True         # do_layer_norm_before
    remove_final_ln: bool = False
    bias: bool = True           # enable_bias
    ln_affine: bool = True      # layer_norm_elementwise_affine
    activation: str = "relu"

    family: ClassVar[str] = "opt"
    model_type: ClassVar[str] = "opt"
    prefix: ClassVar[str] = "model."
    token_embedding: ClassVar[str] = "model.decoder.embed_tokens.weight"
    position_embedding: ClassVar[str] = "model.decoder.embed_positions.weight"
    position_offset: ClassVar[int] = 2      # position p reads row p + 2 of the position table

    def __post_init__(self):
        if self.embed_dim == 0:
            object.__setattr__(self, "embed_dim", self.n_embd)
        super().__post_init__()

    @property
    def final_ln(self):
        return self.pre_ln and not self.remove_final_ln

    def shapes(self):
        C, F, V, P, s = self.n_embd, self.ffn_dim, self.vocab_size, self.embed_dim, {}
        s["model.decoder.embed_tokens.weight"] = (V, P)
        s["model.decoder.embed_positions.weight"] = (self.max_len + self.position_offset, C)
        if P != C:
            s["model.decoder.project_in.weight"] = (C, P)
            s["model.decoder.project_out.weight"] = (P, C)
        for i in range(self.n_layer):
            p = f"model.decoder.layers.{i}."
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                _linear(s, p + "self_attn." + proj, C, C, self.bias)
            _norm(s, p + "self_attn_layer_norm", C, self.ln_affine)
            _linear(s, p + "fc1", F, C, self.bias)
            _linear(s, p + "fc2", C, F, self.bias)
            _norm(s, p + "final_layer_norm", C, self.ln_affine)
        if self.final_ln:
            _norm(s, "model.decoder.final_layer_norm", C, self.ln_affine)
        if not self.tied:
            s["lm_head.weight"] = (V, P)
        return s

    @classmethod
    def from_hf(cls, d, name=""):
        return cls(n_layer=_need(d, "num_hidden_layers"), n_embd=_need(d, "hidden_size"),
                   n_head=_need(d, "num_attention_heads"), vocab_size=_need(d, "vocab_size"),
                   ffn_dim=d.get("ffn_dim") or 0, max_len=d.get("max_position_embeddings", 2048),
                   tied=d.get("tie_word_embeddings", True), embed_dim=d.get("word_embed_proj_dim") or 0,
                   pre_ln=d.get("do_layer_norm_before", True), remove_final_ln=d.get("_remove_final_layer_norm", False),
                   bias=d.get("enable_bias", True), ln_affine=d.get("layer_norm_elementwise_affine", True),
                   activation=d.get("activation_function", "relu"), name=name)

    def to_hf(self):
        return dict(architectures=["OPTForCausalLM"], model_type="opt", num_hidden_layers=self.n_layer,
                    hidden_size=self.n_embd, num_attention_heads=self.n_head, vocab_size=self.vocab_size,
                    ffn_dim=self.ffn_dim, max_position_embeddings=self.max_len, tie_word_embeddings=self.tied,
                    word_embed_proj_dim=self.embed_dim, do_layer_norm_before=self.pre_ln,
                    _remove_final_layer_norm=self.remove_final_ln, enable_bias=self.bias,
                    layer_norm_elementwise_affine=self.ln_affine, activation_function=self.activation,
                    bos_token_id=2, eos_token_id=2, pad_token_id=1)


@dataclass(frozen=True)
class GPTNeoConfig(TransformerConfig):
    """GPT-Neo: global and local (sliding window) layers, no 1/sqrt(d) score scaling, gelu_new."""
    window: int = 256
    attention_layers: Tuple[str, ...] = ()      # "global" / "local" per layer; () = alternating, global first
    activation: str = "gelu_new"

    family: ClassVar[str] = "gpt-neo"
    model_type: ClassVar[str] = "gpt_neo"
    prefix: ClassVar[str] = "transformer."
    token_embedding: ClassVar[str] = "transformer.wte.weight"
    position_embedding: ClassVar[str] = "transformer.wpe.weight"

    def __post_init__(self):
        if not self.attention_layers:
            object.__setattr__(self, "attention_layers", tuple(("global", "local")[i % 2] for i in range(self.n_layer)))
        object.__setattr__(self, "attention_layers", tuple(self.attention_layers))
        super().__post_init__()
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"config window_size must be a positive int, got {self.window!r}")
        if len(self.attention_layers) != self.n_layer or set(self.attention_layers) - {"global", "local"}:
            raise ValueError(f"config attention_layers must give 'global'/'local' for each of {self.n_layer} layers")

    def shapes(self):
        C, F, V, s = self.n_embd, self.ffn_dim, self.vocab_size, {}
        s["transformer.wte.weight"] = (V, C)
        s["transformer.wpe.weight"] = (self.max_len, C)
        for i in range(self.n_layer):
            p = f"transformer.h.{i}."
            _norm(s, p + "ln_1", C)
            for proj in ("q_proj", "k_proj", "v_proj"):
                _linear(s, p + "attn.attention." + proj, C, C, bias=False)
            _linear(s, p + "attn.attention.out_proj", C, C)
            _norm(s, p + "ln_2", C)
            _linear(s, p + "mlp.c_fc", F, C)
            _linear(s, p + "mlp.c_proj", C, F)
        _norm(s, "transformer.ln_f", C)
        if not self.tied:
            s["lm_head.weight"] = (V, C)
        return s

    @classmethod
    def from_hf(cls, d, name=""):
        layers = d.get("attention_layers")
        if not layers and d.get("attention_types"):
            layers = [kind for kinds, n in d["attention_types"] for _ in range(n) for kind in kinds]
        return cls(n_layer=_need(d, "num_layers", "num_hidden_layers"), n_embd=_need(d, "hidden_size"),
                   n_head=_need(d, "num_heads", "num_attention_heads"), vocab_size=_need(d, "vocab_size"),
                   ffn_dim=d.get("intermediate_size") or 0, max_len=d.get("max_position_embeddings", 2048),
                   layer_norm_eps=d.get("layer_norm_epsilon", 1e-5), tied=d.get("tie_word_embeddings", True),
                   window=d.get("window_size", 256), attention_layers=tuple(layers or ()),
                   activation=d.get("activation_function", "gelu_new"), name=name)

    def to_hf(self):
        return dict(architectures=["GPTNeoForCausalLM"], model_type="gpt_neo", num_layers=self.n_layer,
                    hidden_size=self.n_embd, num_heads=self.n_head, vocab_size=self.vocab_size,
                    intermediate_size=self.ffn_dim, max_position_embeddings=self.max_len,
                    layer_norm_epsilon=self.layer_norm_eps, tie_word_embeddings=self.tied, window_size=self.window,
                    attention_layers=list(self.attention_layers),
                    attention_types=[[list(self.attention_layers), 1]], activation_function=self.activation,
                    bos_token_id=50256, eos_token_id=50256)


@dataclass(frozen=True)
class BloomConfig(TransformerConfig):
    """Bloom: ALiBi (no position table), LayerNorm on the embedding, fused qkv interleaved per head."""
    residual_post_ln: bool = False      # apply_residual_connection_post_layernorm

    family: ClassVar[str] = "bloom"
    model_type: ClassVar[str] = "bloom"
    prefix: ClassVar[str] = "transformer."
    token_embedding: ClassVar[str] = "transformer.word_embeddings.weight"
    position_limit: ClassVar[bool] = False  # ALiBi: max_len is only the default cache length

    @property
    def max_positions(self):
        return None

    def shapes(self):
        C, F, V, s = self.n_embd, self.ffn_dim, self.vocab_size, {}
        s["transformer.word_embeddings.weight"] = (V, C)
        _norm(s, "transformer.word_embeddings_layernorm", C)
        for i in range(self.n_layer):
            p = f"transformer.h.{i}."
            _norm(s, p + "input_layernorm", C)
            _linear(s, p + "self_attention.query_key_value", 3 * C, C)
            _linear(s, p + "self_attention.dense", C, C)
            _norm(s, p + "post_attention_layernorm", C)
            _linear(s, p + "mlp.dense_h_to_4h", F, C)
            _linear(s, p + "mlp.dense_4h_to_h", C, F)
        _norm(s, "transformer.ln_f", C)
        if not self.tied:
            s["lm_head.weight"] = (V, C)
        return s

    @classmethod
    def from_hf(cls, d, name=""):
        return cls(n_layer=_need(d, "n_layer", "num_hidden_layers"), n_embd=_need(d, "hidden_size", "n_embed"),
                   n_head=_need(d, "n_head", "num_attention_heads"), vocab_size=_need(d, "vocab_size"),
                   layer_norm_eps=d.get("layer_norm_epsilon", 1e-5), tied=d.get("tie_word_embeddings", True),
                   residual_post_ln=d.get("apply_residual_connection_post_layernorm", False), name=name)

    def to_hf(self):
        return dict(architectures=["BloomForCausalLM"], model_type="bloom", n_layer=self.n_layer,
                    hidden_size=self.n_embd, n_head=self.n_head, vocab_size=self.vocab_size,
                    layer_norm_epsilon=self.layer_norm_eps, tie_word_embeddings=self.tied,
                    apply_residual_connection_post_layernorm=self.residual_post_ln,
                    bos_token_id=1, eos_token_id=2, pad_token_id=3)


def config_from_hf(d, name=""):
    """A config.json dict -> the config dataclass of the registered family its model_type names."""
    model_type = d.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"unsupported model_type {model_type!r} (supported: {', '.join(FAMILIES)})")
    return FAMILIES[model_type].config.from_hf(d, name=name)


# MODELS (registered size name -> config) and ALIASES (other name -> registered name) are filled by the
# family modules when `baselines` is imported (baselines.family.register): the exact shapes of the
# released checkpoints the paper (Appendix K) compares against.


def canonical_name(name):
    """'EleutherAI/gpt-neo-1.3B' -> 'gpt-neo-1.3b'; None when the name is not registered."""
    key = name.strip().lower().split("/")[-1]
    key = ALIASES.get(key, key)
    return key if key in MODELS else None


def get_config(name):
    key = canonical_name(name)
    if key is None:
        raise ValueError(f"unknown model name {name!r}; known: {', '.join(MODELS)}")
    return MODELS[key]


def list_models():
    return list(MODELS)
