"""rwkv_engine: a from-scratch RWKV-4 inference engine.

    import rwkv_engine
    model = rwkv_engine.load("rwkv-4-pile-169m")          # synthetic weights unless checkpoint= is given
    print(model.generate("The dragons", max_new_tokens=32, temperature=0).text[0])
"""
from pathlib import Path

import torch

from .checkpoint import CheckpointError, check_against_registry, is_synthetic, read_checkpoint, weight_format, \
    write_synthetic
from .config import MODELS, RWKVConfig, get_config
from .generation import GenerationResult, generate, stream
from .model import RWKV
from .sampling import SamplingParams, sample
from .state import State
from .tokenizer import Tokenizer, tokenizer

__all__ = ["load", "RWKV", "State", "RWKVConfig", "MODELS", "tokenizer", "Tokenizer", "generate", "stream",
           "SamplingParams", "sample", "GenerationResult", "CheckpointError", "write_synthetic"]


def load(name_or_path, device="cpu", dtype="float32", checkpoint=None, seed=0, rescale_every=None, weights=None):
    """Load an RWKV-4 model.

    name_or_path: a registered name (see `MODELS`, e.g. "rwkv-4-pile-169m") or a checkpoint path
    (BlinkDL .pth, .safetensors, or a Hugging Face RwkvForCausalLM directory).
    A registered name without `checkpoint` uses a synthetic checkpoint (same shapes, generated
    once into the cache dir, loaded through the same loader), and the model says so; with 16-bit
    or int8 `weights` that checkpoint is written in bfloat16, streamed shard by shard.
    dtype: float32 (default, as the paper), float16 or bfloat16 weights; the WKV state is float32.
    rescale_every: halve the residual every N layers (default 6 for float16, off otherwise).
    weights: how the matrices are stored: None (as dtype), "float32", "float16", "bfloat16" or "int8"
    (blockwise, see kernels.quant); with a format, activations, state and accumulation stay float32
    (CPU). Quantised at load, matrix by matrix from the memory-mapped file; a file written by
    `python -m rwkv_engine.convert ... --weights int8` loads as it is.
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
    if synthetic and weights not in (None, "float32"):     # 16-bit source, streamed: 7B/14B fit here
        path = write_synthetic(name, seed=seed, dtype=torch.bfloat16, fmt="sharded")
    elif synthetic:
        path = write_synthetic(name, seed=seed)
    sd, cfg = read_checkpoint(path)
    stored = weight_format(path)
    if stored is not None and weights is None:
        weights = stored
    synthetic = synthetic or is_synthetic(path)
    if name:
        check_against_registry(cfg, name, path)
        reg = get_config(name)
        cfg = RWKVConfig(cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.ffn_dim, reg.ctx_len,
                         cfg.layer_norm_eps, name=reg.name)
    tok = tokenizer() if cfg.vocab_size == 50277 else None
    return RWKV(cfg, sd, device, dtype, source=path, synthetic=synthetic, tokenizer=tok,
                rescale_every=rescale_every, weights=weights, progress=_progress(weights, cfg))


def _progress(weights, cfg):
    """A tqdm bar on stderr while packing weights at load: always for models of 1B+ parameters
    (minutes), otherwise only when stderr is a terminal."""
    if weights in (None, "float32"):
        return None
    import sys
    from tqdm import tqdm
    disable = None if cfg.n_params < 1e9 else False
    return lambda it: tqdm(it, desc="packing weights", unit="layer", file=sys.stderr, disable=disable, leave=False)
