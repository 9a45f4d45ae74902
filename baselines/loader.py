"""Loading Hugging Face checkpoints of the four families, validating them, and writing synthetic ones.

A checkpoint is a directory: config.json + model.safetensors | pytorch_model.bin | a sharded
*.index.json. Tensors are read lazily (safetensors `safe_open`; `.bin` only through
`torch.load(weights_only=True, mmap=True)`), validated one by one (known key, shape, float dtype,
finite) and cast to the model's dtype/device as they come, so nothing is held twice.
"""
import dataclasses
import json
import math
import os
import pickle
import re
import shutil
import struct
import zipfile
import zlib
from pathlib import Path

import torch

from rwkv_engine.checkpoint import CheckpointError, cache_dir as engine_cache_dir
from rwkv_engine import as_dtype
from rwkv_engine.tokenizer import Tokenizer, tokenizer as neox_tokenizer

from .common import PaperProtocol
from .config import MODELS, canonical_name, config_from_hf, get_config
from .family import FAMILIES

PROTOCOLS = ("kv-cache", "paper")

# Non-parameter buffers some checkpoints carry: causal masks and rotary frequencies (recomputed here).
BUFFER = re.compile(r"(^|\.)(attn\.bias|attention\.bias|masked_bias|rotary_emb\.inv_freq)$")

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
SAFETENSORS_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def _first_line(e):
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---------------------------------------------------------------------------------------------
# Reading

def _config_json(path):
    f = Path(path) / "config.json"
    if not f.is_file():
        raise CheckpointError(f"{f}: missing (a checkpoint directory needs config.json)")
    try:
        d = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: invalid JSON ({_first_line(e)})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{f}: expected a JSON object, got {type(d).__name__}")
    return d


def read_config(path):
    """config.json of a checkpoint directory -> the family dataclass (named after the directory)."""
    try:
        return config_from_hf(_config_json(path), name=Path(path).name)
    except (ValueError, TypeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{Path(path) / 'config.json'}: {_first_line(e)}") from None


def weight_files(path):
    """The weight files of a checkpoint directory (the shards of an index, or the one file)."""
    path = Path(path)
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).is_file():
            try:
                weight_map = json.loads((path / index).read_text())["weight_map"]
                files = sorted({path / name for name in weight_map.values()})
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{path / index}: not a valid index, needs a 'weight_map' ({_first_line(e)})") from None
            for f in files:
                if not f.is_file():
                    raise CheckpointError(f"{f}: shard listed in {index} is missing")
            return files
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (path / single).is_file():
            return [path / single]
    raise CheckpointError(f"{path}: no model.safetensors, pytorch_model.bin or *.index.json found")


def _open(f):
    """One weight file -> {key: (shape, dtype, fetch)} without reading any tensor data."""
    if f.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        try:
            handle = safe_open(str(f), framework="pt", device="cpu")                # memory-mapped
            meta = {k: handle.get_slice(k) for k in handle.keys()}
            meta = {k: (tuple(s.get_shape()), s.get_dtype()) for k, s in meta.items()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{f}: truncated or not a safetensors file ({_first_line(e)})") from None
        return {k: (shape, SAFETENSORS_DTYPES.get(dt, dt), lambda k=k: handle.get_tensor(k))
                for k, (shape, dt) in meta.items()}
    try:
        sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)        # refuses pickled code
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{f}: refused to unpickle: it holds objects other than tensors, possibly "
                              f"code (only weights_only=True loads are done): {_first_line(e)}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{f}: truncated or not a PyTorch checkpoint ({_first_line(e)})") from None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{f}: holds a {type(sd).__name__}, expected a dict of tensors")
    for k, t in sd.items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{f}: key {k!r} holds a {type(t).__name__}, expected a tensor")
    return {k: (tuple(t.shape), t.dtype, lambda t=t: t) for k, t in sd.items()}


def _all_finite(t, chunk=1 << 24):
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def read_weights(path, config, device="cpu", dtype=torch.float32):
    """Every tensor `config` expects, validated and cast -> {prefixed HF name: tensor}. Keys may come
    with or without the base-model prefix; a tied head and known buffers in the file are skipped."""
    expected = config.shapes()
    prefix = config.prefix
    sd, origin = {}, {}
    for f in weight_files(path):
        for key, (shape, dt, fetch) in _open(f).items():
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
                raise CheckpointError(f"{f}: key {key!r} has shape {list(shape)}, expected {list(expected[name])}")
            if not (isinstance(dt, torch.dtype) and dt.is_floating_point):
                raise CheckpointError(f"{f}: key {key!r} has non-float dtype {dt}")
            t = fetch()
            if not _all_finite(t):
                raise CheckpointError(f"{f}: key {key!r} contains NaN or Inf")
            sd[name], origin[name] = t.to(device=device, dtype=dtype), f.name
    missing = [k for k in expected if k not in sd]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{path}: missing key {missing[0]!r}{more}")
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
            raise CheckpointError(f"{f}: not a valid tokenizer.json ({_first_line(e)})") from None
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
    dtype, device = as_dtype(dtype), torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA GPU is available")
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
    synthetic = synthetic or _config_json(path).get("synthetic") is True     # written by write_synthetic
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

def synthetic_dir(name, root=None):
    """<root or $RWKV_ENGINE_CACHE or ~/.cache/rwkv_engine>/synthetic/<name>/"""
    return Path(root or engine_cache_dir()) / "synthetic" / name


def _init_rows(key, shape, generator, rows):
    """Realistic init of `rows` rows: matrices and embeddings N(0, 0.02); LayerNorm weight 1; biases 0."""
    if len(shape) == 1:
        fill = 1.0 if key.endswith(".weight") else 0.0      # the only 1-D weights are LayerNorm's
        return torch.full((rows,), fill)
    return torch.empty(rows, *shape[1:]).normal_(0.0, 0.02, generator=generator)


def write_safetensors(f, shapes, make_rows, dtype, metadata=None, chunk=1 << 24):
    """Write a safetensors file tensor by tensor (and large tensors in row blocks), never holding more
    than one block in memory. make_rows(key, shape, rows) -> the next `rows` rows as float32."""
    names = sorted(shapes)
    size = dtype.itemsize
    header, offset = {}, 0
    for k in names:
        n = math.prod(shapes[k]) * size
        header[k] = {"dtype": SAFETENSORS_NAMES[dtype], "shape": list(shapes[k]), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = dict(metadata or {}, format="pt")
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)                                  # 8-byte aligned data
    with open(f, "wb") as out:
        out.write(struct.pack("<Q", len(blob)))
        out.write(blob)
        for k in names:
            shape = shapes[k]
            row = math.prod(shape[1:])
            step = max(1, chunk // max(row, 1))
            for start in range(0, shape[0], step):
                block = make_rows(k, shape, min(step, shape[0] - start)).to(dtype).contiguous()
                out.write(block.view(torch.uint8).numpy().data)


def write_synthetic(name_or_config, directory=None, seed=0, dtype="float16", cache_dir=None):
    """Write a Hugging Face-layout synthetic checkpoint (config.json + model.safetensors) once and return
    its directory; an existing complete one is reused. Deterministic in (shapes, seed); written to a
    temporary directory renamed into place, so a reader never sees a partial checkpoint."""
    config = get_config(name_or_config) if isinstance(name_or_config, str) else name_or_config
    directory = Path(directory) if directory is not None else synthetic_dir(config.name or config.model_type, cache_dir)
    if (directory / "config.json").is_file() and (directory / "model.safetensors").is_file():
        return directory
    dtype = as_dtype(dtype)
    shapes = config.shapes()
    need = sum(math.prod(s) for s in shapes.values()) * dtype.itemsize
    directory.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory.parent).free
    if need * 1.02 + (64 << 20) > free:
        raise CheckpointError(f"{directory}: a synthetic {config.name or config.model_type} checkpoint needs "
                              f"{need / 1e9:.1f} GB of disk, {free / 1e9:.1f} GB free")

    generators = {}

    def make_rows(key, shape, rows):
        if key not in generators:       # one seeded stream per tensor: independent of write order
            generators[key] = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{key}".encode()))
        return _init_rows(key, shape, generators[key], rows)

    tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        hf = dict(config.to_hf(), torch_dtype=str(dtype).removeprefix("torch."), synthetic=True, synthetic_seed=seed)
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        write_safetensors(tmp / "model.safetensors", shapes, make_rows, dtype,
                          metadata={"synthetic": "true", "seed": str(seed)})
        try:
            os.rename(tmp, directory)
        except OSError:                 # another process finished first: keep its copy
            if not (directory / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory
