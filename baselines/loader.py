"""Loading Hugging Face checkpoints of the four families, validating them, and writing synthetic ones.

A checkpoint is a directory: config.json + model.safetensors | pytorch_model.bin | a sharded
*.index.json, read through rwkv_engine.files (the readers, checks and atomic writes the engine uses
too). Tensors are read lazily (safetensors `safe_open`; `.bin` only through
`torch.load(weights_only=True, mmap=True)`), validated one by one (known key, shape, float dtype,
finite) and cast to the model's dtype/device as they come, so nothing is held twice.
"""
import dataclasses
import json
import math
import re
import zlib
from pathlib import Path

import torch

from rwkv_engine import Tokenizer, tokenizer as neox_tokenizer
from rwkv_engine.config import as_device
from rwkv_engine.files import (CheckpointError, atomic_dir, dtype_problem, first_line, open_weights,
                               read_config_json, synthetic_path, value_problem, weight_files, write_safetensors)
from rwkv_engine import as_dtype

from .common import PaperProtocol
from .config import MODELS, canonical_name, config_from_hf, get_config
from .family import FAMILIES

PROTOCOLS = ("kv-cache", "paper")

# Non-parameter buffers some checkpoints carry: causal masks and rotary frequencies (recomputed here).
BUFFER = re.compile(r"(^|\.)(attn\.bias|attention\.bias|masked_bias|rotary_emb\.inv_freq)$")

# ---------------------------------------------------------------------------------------------
# Reading

def read_config(path):
    """config.json of a checkpoint directory -> the family dataclass (named after the directory)."""
    try:
        return config_from_hf(read_config_json(path), name=Path(path).name)
    except (ValueError, TypeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{Path(path) / 'config.json'}: {first_line(e)}") from None


def read_weights(path, config, device="cpu", dtype=torch.float32):
    """Every tensor `config` expects, validated and cast -> {prefixed HF name: tensor}. Keys may come
    with or without the base-model prefix; a tied head and known buffers in the file are skipped."""
    expected = config.shapes()
    prefix = config.prefix
    sd, origin = {}, {}
    for f in weight_files(path):
        for key, (shape, dt, fetch) in open_weights(f).items():
            name = config.key_aliases.get(key, key)
            name = name if name in expected else prefix + name if prefix + name in expected else None
            if name is None:
                tied_head = config.tied and config.key_aliases.get(key, key) in (config.head, prefix + config.head)
                if BUFFER.search(key) or tied_head:
                    continue
                raise CheckpointError(f"{f}: unexpected key {key!r} for a {config.model_type} checkpoint")
            if name in origin:
                raise CheckpointError(f"{f}: key {key!r} appears twice (also in {origin[name]})")
            if shape != expected[name]:
                raise CheckpointError(f"{f}: key {key!r} has shape {list(shape)}, expected {list(expected[name])} "
                                      f"(from config.json)")
            problem = dtype_problem(dt)
            if problem:
                raise CheckpointError(f"{f}: key {key!r} {problem}")
            t = fetch()
            problem = value_problem(t)
            if problem:
                raise CheckpointError(f"{f}: key {key!r} {problem}")
            sd[name], origin[name] = t.to(device=device, dtype=dtype), f.name
    missing = [k for k in expected if k not in sd]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{path}: missing key {missing[0]!r}{more} (config.json implies it)")
    return sd


def check_against_registry(config, expect, path):
    """A checkpoint loaded under a registered name must have that name's shapes."""
    if config.model_type != expect.model_type:
        raise CheckpointError(f"{path}: is a {config.model_type} checkpoint, {expect.name} is {expect.model_type}")
    got, want = config.shapes(), expect.shapes()
    for key in sorted(set(got) | set(want)):
        if got.get(key) != want.get(key):
            raise CheckpointError(f"{path}: does not match registered {expect.name}: {key} is "
                                  f"{got.get(key, 'absent')} in its config.json, {want.get(key, 'absent')} in the registry")
    if config.n_head != expect.n_head:
        raise CheckpointError(f"{path}: does not match registered {expect.name}: n_head {config.n_head}, registry {expect.n_head}")


def checkpoint_tokenizer(path, config):
    """tokenizer.json beside the weights; else the packaged GPT-NeoX-20B one for Pythia-sized vocabularies."""
    f = Path(path) / "tokenizer.json"
    if f.is_file():
        try:
            return Tokenizer(f)
        except Exception as e:          # tokenizers raises a bare Exception on a bad file
            raise CheckpointError(f"{f}: not a valid tokenizer.json ({first_line(e)})") from None
    if config.model_type == "gpt_neox" and config.vocab_size >= neox_tokenizer().vocab_size:
        return neox_tokenizer()
    return None


def load(name_or_path, device="cpu", dtype="float32", checkpoint=None, protocol="kv-cache", cache_dir=None, seed=0):
    """Load a transformer baseline.

    name_or_path: a registered name (see `MODELS`, e.g. "pythia-160m") or a checkpoint directory.
    A registered name without `checkpoint` uses a synthetic checkpoint of the same shapes (written
    once into the cache dir, loaded through this same loader); `checkpoint=` gives real weights,
    which must match the name's shapes. protocol: "kv-cache" (default) or "paper" (no cache, the
    whole sequence recomputed at every step, as the paper's Appendix K benchmark did).
    """
    dtype, device = as_dtype(dtype), as_device(device)
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}")
    name = canonical_name(name_or_path) if isinstance(name_or_path, str) else None
    expect, synthetic = None, False
    if checkpoint is not None:
        if name is None:
            raise ValueError(f"checkpoint= needs a registered model name, got {name_or_path!r}; known: {', '.join(MODELS)}")
        path, expect = Path(checkpoint), MODELS[name]
    elif Path(name_or_path).is_dir():
        path = Path(name_or_path)
    elif name is not None:
        path, expect, synthetic = write_synthetic(name, cache_dir=cache_dir, seed=seed), MODELS[name], True
    else:
        raise ValueError(f"{name_or_path!r} is neither a registered model nor a checkpoint directory; "
                         f"known: {', '.join(MODELS)}")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    config = read_config(path)
    synthetic = synthetic or read_config_json(path).get("synthetic") is True     # written by write_synthetic
    if expect is not None:
        check_against_registry(config, expect, path)
        config = dataclasses.replace(config, name=expect.name)
    sd = read_weights(path, config, device, dtype)
    model = FAMILIES[config.model_type].model(config, sd, device=device, dtype=dtype,
                                        source="synthetic" if synthetic else str(path), synthetic=synthetic,
                                        tokenizer=checkpoint_tokenizer(path, config), path=path)
    return PaperProtocol(model) if protocol == "paper" else model


# ---------------------------------------------------------------------------------------------
# Synthetic checkpoints

def synthetic_dir(name, root=None, dtype=torch.float16, seed=0):
    """Where the synthetic checkpoint of a registered name lives (rwkv_engine.files.synthetic_path, "hf")."""
    return synthetic_path(name, dtype=as_dtype(dtype), seed=seed, fmt="hf", root=root)


def _init_rows(key, shape, generator, rows):
    """Realistic init of `rows` rows: matrices and embeddings N(0, 0.02); LayerNorm weight 1; biases 0."""
    if len(shape) == 1:
        fill = 1.0 if key.endswith(".weight") else 0.0      # the only 1-D weights are LayerNorm's
        return torch.full((rows,), fill)
    return torch.empty(rows, *shape[1:]).normal_(0.0, 0.02, generator=generator)


def _complete(directory):
    return (directory / "config.json").is_file() and (directory / "model.safetensors").is_file()


def _replaceable(directory):
    """An entry this writer may rebuild: absent, or holding only what it writes (a killed write)."""
    return not directory.exists() or (directory.is_dir() and set(p.name for p in directory.iterdir())
                                      <= {"config.json", "model.safetensors"})


def write_synthetic(name_or_config, directory=None, seed=0, dtype="float16", cache_dir=None):
    """Write a Hugging Face-layout synthetic checkpoint (config.json + model.safetensors) once and return
    its directory; an existing complete one is reused, a broken one (e.g. weights missing) rebuilt.
    Deterministic in (shapes, seed); written to a temporary directory swapped into place, so a reader
    never sees a partial checkpoint."""
    config = get_config(name_or_config) if isinstance(name_or_config, str) else name_or_config
    dtype = as_dtype(dtype)
    directory = Path(directory) if directory is not None else \
        synthetic_dir(config.name or config.model_type, cache_dir, dtype, seed)
    if _complete(directory):
        return directory
    shapes = config.shapes()
    need = sum(math.prod(s) for s in shapes.values()) * dtype.itemsize
    generators = {}

    def make_rows(key, shape, rows):
        if key not in generators:       # one seeded stream per tensor: independent of write order
            generators[key] = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{key}".encode()))
        return _init_rows(key, shape, generators[key], rows)

    def fill(tmp):
        hf = dict(config.to_hf(), torch_dtype=str(dtype).removeprefix("torch."), synthetic=True, synthetic_seed=seed)
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        write_safetensors(tmp / "model.safetensors", shapes, make_rows, dtype,
                          metadata={"synthetic": "true", "seed": str(seed)})

    return atomic_dir(directory, fill, overwrite=_replaceable(directory), need=need)
