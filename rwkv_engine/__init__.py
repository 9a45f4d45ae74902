"""rwkv_engine: a from-scratch RWKV-4 inference engine.

    import rwkv_engine
    model = rwkv_engine.load("rwkv-4-pile-169m")          # synthetic weights unless checkpoint= is given
    print(model.generate("The dragons", max_new_tokens=32, temperature=0).text[0])
"""
from pathlib import Path

import torch

from .checkpoint import CheckpointError, read_checkpoint, release_pages, write_synthetic, check_against_registry
from .config import MODELS, RWKVConfig, get_config
from .generation import GenerationResult, generate, stream
from .model import RWKV
from .sampling import SamplingParams, sample
from .state import State
from .tokenizer import Tokenizer, tokenizer

__all__ = ["load", "RWKV", "State", "RWKVConfig", "MODELS", "tokenizer", "Tokenizer", "generate", "stream",
           "SamplingParams", "sample", "GenerationResult", "CheckpointError", "write_synthetic"]


def load(name_or_path, device="cpu", dtype="float32", checkpoint=None, seed=0, rescale_every=None, layers=None):
    """Load an RWKV-4 model.

    name_or_path: a registered name (see `MODELS`, e.g. "rwkv-4-pile-169m") or a checkpoint path
    (BlinkDL .pth, .safetensors, or a Hugging Face RwkvForCausalLM directory).
    A registered name without `checkpoint` uses a synthetic checkpoint (same shapes, generated
    once into the cache dir, loaded through the same loader), and the model says so.
    dtype: float32 (default, as the paper), float16 or bfloat16 weights; the WKV state is float32.
    rescale_every: halve the residual every N layers (default 6 for float16, off otherwise).
    layers: a range of layers: build only those (a pipeline stage, see rwkv_engine.pipeline); only
    their tensors are read from the (memory-mapped) checkpoint.
    """
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA GPU is available")
    name = None
    looks_like_path = isinstance(name_or_path, Path) or "/" in str(name_or_path) or \
        str(name_or_path).endswith((".pth", ".safetensors", ".bin"))
    if not looks_like_path and not Path(name_or_path).exists():
        get_config(name_or_path)                         # unknown names fail here, with the list
        name = name_or_path
    path = checkpoint if checkpoint is not None else (None if name else name_or_path)
    synthetic = path is None
    if synthetic:
        path = write_synthetic(name, seed=seed)
    sd, cfg = read_checkpoint(path, layers)
    if name:
        check_against_registry(cfg, name, path)
        reg = get_config(name)
        cfg = RWKVConfig(cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.ffn_dim, reg.ctx_len,
                         cfg.layer_norm_eps, name=reg.name)
    tok = tokenizer() if cfg.vocab_size == 50277 else None
    model = RWKV(cfg, sd, device, dtype, source=path, synthetic=synthetic, tokenizer=tok,
                 rescale_every=rescale_every, layers=layers)
    release_pages(sd.values(), model)          # raw tensors the model converted (its emb has ln0 applied)
    return model
