"""RWKV-4 shapes: one dataclass and the registry of named sizes (gpt-fast `ModelArgs`)."""
import math
from dataclasses import dataclass, field

import torch

from .files import first_line
from .tokenizer import NEOX_VOCAB_SIZE

DEVICE_TYPES = ("cpu", "cuda")


@dataclass(frozen=True)
class RWKVConfig:
    n_layer: int
    n_embd: int
    vocab_size: int = NEOX_VOCAB_SIZE
    ffn_dim: int = 0            # 0: derived as 4 * n_embd
    ctx_len: int = 1024         # training context; inference has no length limit
    layer_norm_eps: float = 1e-5
    name: str = field(default="", compare=False)

    def __post_init__(self):
        if self.ffn_dim == 0:
            object.__setattr__(self, "ffn_dim", 4 * self.n_embd)
        for key in ("n_layer", "n_embd", "vocab_size", "ffn_dim"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"config {key} must be a positive int, got {value!r}")
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
            raise ValueError(f"config layer_norm_eps must be a number > 0, got {eps!r}")

    @property
    def n_params(self):
        """Parameter count of the checkpoint (embedding and head included)."""
        C, F, V = self.n_embd, self.ffn_dim, self.vocab_size
        per_layer = 5 * C * C + 2 * C * F + 7 * C + 4 * C    # matrices, time_* vectors, ln1/ln2
        return self.n_layer * per_layer + 2 * V * C + 4 * C                  # emb, head, ln0, ln_out

    def weight_bytes_per_token(self, bytes_per_weight=4):
        """Bytes of weights one decode step reads: every matrix and the head, one embedding row."""
        C, F, V = self.n_embd, self.ffn_dim, self.vocab_size
        matrices = self.n_layer * (5 * C * C + 2 * C * F) + V * C
        vectors = self.n_layer * 11 * C + 2 * C + C       # time_*, ln1/ln2; ln_out; one row
        return matrices * bytes_per_weight + vectors * 4


# Exact shapes of the released RWKV-4-Pile models (n_layer, n_embd; vocab NEOX_VOCAB_SIZE, ffn 4 * n_embd).
MODELS = {
    "rwkv-4-pile-169m": RWKVConfig(12, 768, name="rwkv-4-pile-169m"),
    "rwkv-4-pile-430m": RWKVConfig(24, 1024, name="rwkv-4-pile-430m"),
    "rwkv-4-pile-1b5": RWKVConfig(24, 2048, name="rwkv-4-pile-1b5"),
    "rwkv-4-pile-3b": RWKVConfig(32, 2560, name="rwkv-4-pile-3b"),
    "rwkv-4-pile-7b": RWKVConfig(32, 4096, name="rwkv-4-pile-7b"),
    "rwkv-4-pile-14b": RWKVConfig(40, 5120, name="rwkv-4-pile-14b"),
    # Tiny shape for tests and quick demos (not a released model).
    "rwkv-4-tiny": RWKVConfig(2, 64, name="rwkv-4-tiny"),
}

# Hugging Face hub names (RWKV/rwkv-4-169m-pile) and BlinkDL's repositories (BlinkDL/rwkv-4-pile-169m)
# map to the same shapes.
HUB_ORGS = ("rwkv", "blinkdl")
ALIASES = {f"rwkv-4-{size}-pile": f"rwkv-4-pile-{size}" for size in ("169m", "430m", "1b5", "3b", "7b", "14b")}


def canonical_name(name):
    """'RWKV/rwkv-4-169m-pile' -> 'rwkv-4-pile-169m'; None when `name` is not a registered name or alias."""
    if not isinstance(name, str):
        return None
    key = name.strip().lower()
    org, _, rest = key.rpartition("/")
    if org and org not in HUB_ORGS:
        return None
    key = ALIASES.get(rest, rest)
    return key if key in MODELS else None


def get_config(name):
    key = canonical_name(name)
    if key is None:
        raise ValueError(f"unknown model name {name!r}; known: {', '.join(MODELS)}")
    return MODELS[key]


def as_device(device):
    """A torch.device this project runs on (cpu, or cuda when a GPU is present), else ValueError."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r}: use cpu or cuda ({first_line(e)})") from None
    if device.type not in DEVICE_TYPES:
        raise ValueError(f"unsupported device {str(device)!r}: use cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA GPU is available")
    return device
