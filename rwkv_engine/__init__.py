"""rwkv_engine: a from-scratch RWKV-4 inference engine.

    import rwkv_engine
    model = rwkv_engine.load("rwkv-4-pile-169m")          # synthetic weights unless checkpoint= is given
    print(model.generate("The dragons", max_new_tokens=32, temperature=0).text[0])
"""
from dataclasses import replace
from pathlib import Path

import rwkv_kernels  # noqa: F401  (first: it sets torch's OpenMP spin before torch loads; see rwkv_kernels/__init__)
import torch

from .checkpoint import (CheckpointError, check_against_registry, model_name, read_checkpoint, read_metadata,
                         release_pages, synthetic_for, recorded_format, write_synthetic)
from .config import MODELS, RWKVConfig, as_device, canonical_name, get_config
from .contract import DTYPES, Model, as_dtype, as_token_batch, prompt_to_ids
from .generation import Generation, GenerationResult, Step, TextStream, generate, stream
from .model import RWKV, LoadOptions
from .sampling import NonFiniteLogitsError, SamplingParams, sample
from .state import State
from .tokenizer import NEOX_VOCAB_SIZE, Tokenizer, tokenizer

__all__ = ["load", "RWKV", "State", "RWKVConfig", "MODELS", "tokenizer", "Tokenizer", "generate", "stream",
           "SamplingParams", "sample", "GenerationResult", "CheckpointError", "write_synthetic", "Model", "DTYPES",
           "as_dtype", "as_token_batch", "prompt_to_ids", "Generation", "Step", "TextStream", "NonFiniteLogitsError", "resolve",
           "LoadOptions"]

CHECKPOINT_SUFFIXES = (".pth", ".safetensors", ".bin")


def resolve(name_or_path, checkpoint=None):
    """-> (registered name or None, checkpoint path or None: a synthetic checkpoint is meant).

    A registered name or hub alias ("rwkv-4-pile-169m", "RWKV/rwkv-4-169m-pile") means that model's
    shapes, with synthetic weights unless `checkpoint` is given or a local path of that name exists;
    anything path-like is a checkpoint path; other names fail with the list of known ones."""
    text = str(name_or_path)
    name = canonical_name(name_or_path)
    if checkpoint is not None:
        return name, Path(checkpoint)
    if Path(text).exists() or Path(text).is_symlink():
        return name, Path(text)
    if name is not None:
        return name, None
    if isinstance(name_or_path, Path) or "/" in text or text.endswith(CHECKPOINT_SUFFIXES):
        return None, Path(text)                          # read_checkpoint says "no such file"
    get_config(text)                                     # unknown names fail here, with the list
    raise AssertionError("unreachable")


def load(name_or_path, device="cpu", dtype="float32", checkpoint=None, seed=0, rescale_every=None, weights=None,
         layers=None, *, options=None):
    """Load an RWKV-4 model.

    name_or_path: a registered name (see `MODELS`, e.g. "rwkv-4-pile-169m", or its hub name
    "RWKV/rwkv-4-169m-pile") or a checkpoint path (BlinkDL .pth, .safetensors, or a Hugging Face
    RwkvForCausalLM directory).
    A registered name without `checkpoint` uses a synthetic checkpoint (same shapes, generated
    once into the cache dir, loaded through the same loader), and the model says so.
    device: cpu or cuda. dtype: float32 (default, as the paper), float16 or bfloat16 weights; the
    WKV state is float32. rescale_every: halve the residual every N layers (default 6 for float16,
    off otherwise).
    weights: the weight format the matrices are stored in: None (as dtype) or a name of
    `rwkv_kernels.formats.names()`: "float32", "float16", "bfloat16", or ggml's Q8_0 (8-bit values in
    blocks of 32 with a float16 scale each; see rwkv_kernels.formats); with a format, activations, state
    and accumulation stay float32 (CPU). Packed at load, matrix by matrix from the memory-mapped file;
    a file written by `python -m rwkv_engine.convert SRC DST --weights FORMAT` loads as it is. A
    registered name with 16-bit or 8-bit weights uses a synthetic checkpoint written in bfloat16
    (streamed, shard by shard: 7B/14B fit here).
    layers: a range of layers: build only those (a pipeline stage, see rwkv_engine.pipeline); only
    their tensors are read from the (memory-mapped) checkpoint.
    options: a `LoadOptions` in place of device, dtype, rescale_every, weights and layers (then leave
    those at their defaults).
    """
    if options is None:
        options = LoadOptions(device, dtype, weights, rescale_every, layers)
    elif (device, dtype, rescale_every, weights, layers) != ("cpu", "float32", None, None, None):
        raise TypeError("give either options= or device/dtype/rescale_every/weights/layers, not both")
    options = replace(options, device=as_device(options.device))
    name, path = resolve(name_or_path, checkpoint)
    synthetic = path is None
    if synthetic:
        path = synthetic_for(name, options.weights, seed)
    sd, cfg = read_checkpoint(path, options.layers)
    if options.weights is None:
        options = replace(options, weights=recorded_format(path))    # a packed file loads in its own format
    meta = read_metadata(path)
    synthetic = synthetic or meta.get("synthetic") == "true"
    name = name or model_name(meta)               # a converted synthetic checkpoint keeps its model's name
    if name:
        check_against_registry(cfg, name, path)
        reg = get_config(name)
        cfg = RWKVConfig(cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.ffn_dim, reg.ctx_len,
                         cfg.layer_norm_eps, name=reg.name)
    tok = tokenizer() if cfg.vocab_size == NEOX_VOCAB_SIZE else None
    model = RWKV(cfg, sd, options, source=path, synthetic=synthetic, tokenizer=tok,
                 progress=_progress(options.weights, cfg))
    release_pages(sd.values(), model)          # raw tensors the model converted (its emb has ln0 applied)
    return model


def _progress(weights, cfg):
    """A tqdm bar on stderr while packing weights at load: always for models of 1B+ parameters
    (minutes), otherwise only when stderr is a terminal."""
    if weights in (None, "float32"):
        return None
    import sys
    from tqdm import tqdm
    disable = None if cfg.n_params < 1e9 else False
    return lambda it: tqdm(it, desc="packing weights", unit="layer", file=sys.stderr, disable=disable, leave=False)
