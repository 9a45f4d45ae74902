"""Transformer baselines for the RWKV benchmark (paper Appendix K): Pythia / GPT-NeoX, OPT, GPT-Neo and
Bloom, one file per family (registered in `baselines.family`) over one shared KV cache and loader, with
the RWKV engine's API.

    import baselines
    model = baselines.load("pythia-160m")                 # synthetic weights unless checkpoint= is given
    logits, cache = model.forward(torch.tensor([[1, 2, 3]]))
    print(model.generate([1, 2, 3], max_new_tokens=16, temperature=0).tokens)
"""
from .cache import KVCache, TokenHistory
from .common import PaperProtocol, TransformerLM
from .config import (ALIASES, MODELS, BloomConfig, GPTNeoConfig, GPTNeoXConfig, OPTConfig, get_config,
                     list_models)
from .family import FAMILIES, Family, register
from . import gpt_neox, opt, gpt_neo, bloom  # noqa: F401,I001  (each registers its family, in this order)
from .loader import CheckpointError, load, read_config, read_weights, write_synthetic

__all__ = ["load", "MODELS", "ALIASES", "list_models", "get_config", "KVCache", "TokenHistory", "TransformerLM",
           "PaperProtocol", "GPTNeoXConfig", "OPTConfig", "GPTNeoConfig", "BloomConfig", "CheckpointError",
           "FAMILIES", "Family", "register", "read_config", "read_weights", "write_synthetic"]
