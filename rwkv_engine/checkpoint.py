"""Reading RWKV-4 checkpoints in every format they ship in, validating them, and writing synthetic ones.

Formats (all end as a dict of BlinkDL-named tensors, memory-mapped where the format allows):
  * BlinkDL `.pth` (torch.save zip; loaded only with weights_only=True, mmap=True)
  * `.safetensors` with the same keys (memory-mapped)
  * Hugging Face `RwkvForCausalLM` directory: config.json + model.safetensors | pytorch_model.bin
    | a sharded *.index.json; its names are mapped back to BlinkDL's.
"""
import json
import math
import os
import pickle
import re
import zipfile
from pathlib import Path

import torch

from . import weights
from .config import RWKVConfig, get_config


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the problem."""


# ---------------------------------------------------------------------------------------------
# Expected layout (BlinkDL names)

ATT = ("time_mix_k", "time_mix_v", "time_mix_r", "time_decay", "time_first",
       "key.weight", "value.weight", "receptance.weight", "output.weight")
FFN = ("time_mix_k", "time_mix_r", "key.weight", "value.weight", "receptance.weight")


def expected_shapes(cfg: RWKVConfig):
    """BlinkDL key -> shape. time_* vectors are listed as [C]; [1, 1, C] is accepted too."""
    C, F, V = cfg.n_embd, cfg.ffn_dim, cfg.vocab_size
    shapes = {"emb.weight": (V, C), "head.weight": (V, C), "ln_out.weight": (C,), "ln_out.bias": (C,),
              "blocks.0.ln0.weight": (C,), "blocks.0.ln0.bias": (C,)}
    for i in range(cfg.n_layer):
        b = f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            shapes[b + ln + ".weight"] = shapes[b + ln + ".bias"] = (C,)
        for name in ATT:
            shapes[b + "att." + name] = (C, C) if name.endswith("weight") else (C,)
        shapes[b + "ffn.time_mix_k"] = shapes[b + "ffn.time_mix_r"] = (C,)
        shapes[b + "ffn.key.weight"] = (F, C)
        shapes[b + "ffn.value.weight"] = (C, F)
        shapes[b + "ffn.receptance.weight"] = (C, C)
    return shapes


def infer_config(sd, source):
    """Read the shapes a checkpoint implies (ChatRWKV infers them the same way)."""
    for key in ("emb.weight", "blocks.0.ffn.key.weight"):
        if key not in sd:
            raise CheckpointError(f"{source}: missing key {key!r} (not an RWKV-4 checkpoint?)")
    if sd["emb.weight"].dim() != 2:
        raise CheckpointError(f"{source}: emb.weight has shape {list(sd['emb.weight'].shape)}, expected [vocab, n_embd]")
    vocab, n_embd = sd["emb.weight"].shape
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    n_layer = max(layers) + 1
    ffn_dim = sd["blocks.0.ffn.key.weight"].shape[0]
    return RWKVConfig(n_layer=n_layer, n_embd=n_embd, vocab_size=vocab, ffn_dim=ffn_dim)


def validate(sd, cfg: RWKVConfig, source):
    """Check keys, shapes, dtypes and values; raise CheckpointError naming the first problem."""
    want = expected_shapes(cfg)
    missing = [k for k in want if k not in sd]
    if missing:
        raise CheckpointError(f"{source}: missing key {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = [k for k in sd if k not in want]
    if unexpected:
        raise CheckpointError(f"{source}: unexpected key {unexpected[0]!r}" + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    for key, shape in want.items():
        t = sd[key]
        if hasattr(t, "format") and tuple(t.shape) == shape:      # a packed matrix (checked when read)
            continue
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{source}: {key} is a {type(t).__name__}, not a tensor")
        if not t.dtype.is_floating_point:
            raise CheckpointError(f"{source}: {key} has dtype {t.dtype}, expected a floating-point tensor")
        ok = tuple(t.shape) == shape or (len(shape) == 1 and tuple(t.shape) == (1, 1, shape[0]))
        if not ok:
            raise CheckpointError(f"{source}: {key} has shape {list(t.shape)}, expected {list(shape)}")
        if not weights.all_finite(t):       # in slices, dropping the mapped pages it read
            raise CheckpointError(f"{source}: {key} contains NaN or Inf")


def weight_format(path):
    """The weight format recorded in a packed safetensors file, or None for a plain checkpoint."""
    return weights.packed_format(path)


def is_synthetic(path):
    """True for files written by `write_synthetic` (or converted from one): safetensors metadata says
    so, or a file of the cache's synthetic directory."""
    path = Path(path)
    if path.is_dir():
        shards = sorted(path.glob("*.safetensors"))
        return bool(shards) and is_synthetic(shards[0])
    meta = weights.file_metadata(path)
    if "synthetic" in meta:
        return meta["synthetic"] == "true"
    return path.parent.resolve() == (cache_dir() / "synthetic").resolve()


def check_against_registry(cfg, name, source):
    reg = get_config(name)
    for field in ("n_layer", "n_embd", "vocab_size", "ffn_dim"):
        if getattr(reg, field) != getattr(cfg, field):
            raise CheckpointError(f"{source}: {field}={getattr(cfg, field)} but {name} has {field}={getattr(reg, field)}")


# ---------------------------------------------------------------------------------------------
# Reading files

def _load_pth(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"{path}: refused to unpickle (only plain tensors are loaded, weights_only=True): {first}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: truncated or not a checkpoint ({first})") from None


def _load_safetensors(path):
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(str(path), device="cpu")      # memory-mapped
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: truncated or not a safetensors file ({str(e).splitlines()[0]})") from None


def _load_file(path):
    path = Path(path)
    if path.suffix == ".safetensors":
        sd = _load_safetensors(path)
        meta = weights.file_metadata(path)
        if weights.META_FORMAT in meta:
            try:
                sd, _ = weights.unpack_file(sd, meta, path)
            except ValueError as e:
                raise CheckpointError(str(e)) from None
    else:
        sd = _load_pth(path)
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: holds a {type(sd).__name__}, expected a dict of tensors")
    if "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    return sd


HF_TO_BLINK = [
    (r"^rwkv\.embeddings\.", "emb."),
    (r"^rwkv\.blocks\.0\.pre_ln\.", "blocks.0.ln0."),
    (r"^rwkv\.", ""),
    (r"\.attention\.", ".att."),
    (r"\.feed_forward\.", ".ffn."),
    (r"\.time_mix_key$", ".time_mix_k"),
    (r"\.time_mix_value$", ".time_mix_v"),
    (r"\.time_mix_receptance$", ".time_mix_r"),
]


def hf_to_blinkdl(name):
    for pattern, repl in HF_TO_BLINK:
        name = re.sub(pattern, repl, name)
    return name


def blinkdl_to_hf(name):
    name = re.sub(r"^emb\.", "embeddings.", name)
    name = re.sub(r"^blocks\.0\.ln0\.", "blocks.0.pre_ln.", name)
    name = name.replace(".att.", ".attention.").replace(".ffn.", ".feed_forward.")
    name = re.sub(r"\.time_mix_k$", ".time_mix_key", name)
    name = re.sub(r"\.time_mix_v$", ".time_mix_value", name)
    name = re.sub(r"\.time_mix_r$", ".time_mix_receptance", name)
    return name if name.startswith("head.") else "rwkv." + name


def _load_hf_dir(path):
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{path}: a checkpoint directory needs config.json")
    try:
        hf_cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: invalid JSON ({e})") from None
    if hf_cfg.get("model_type") != "rwkv":
        raise CheckpointError(f"{cfg_path}: model_type is {hf_cfg.get('model_type')!r}, expected 'rwkv'")
    files = []
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).exists():
            weight_map = json.loads((path / index).read_text()).get("weight_map", {})
            files = sorted({path / f for f in weight_map.values()})
            break
    else:
        for single in ("model.safetensors", "pytorch_model.bin"):
            if (path / single).exists():
                files = [path / single]
                break
    if not files:
        raise CheckpointError(f"{path}: no model.safetensors, pytorch_model.bin or *.index.json found")
    sd = {}
    for f in files:
        if not f.exists():
            raise CheckpointError(f"{f}: shard listed in the index is missing")
        sd.update({hf_to_blinkdl(k): v for k, v in _load_file(f).items()})
    return sd, hf_cfg


def read_checkpoint(path):
    """Load any supported checkpoint -> (dict of BlinkDL-named tensors, RWKVConfig), validated."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    hf_cfg = None
    if path.is_dir():
        sd, hf_cfg = _load_hf_dir(path)
    else:
        sd = _load_file(path)
    cfg = infer_config(sd, path)
    if hf_cfg is not None:
        eps = hf_cfg.get("layer_norm_epsilon", cfg.layer_norm_eps)
        cfg = RWKVConfig(cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.ffn_dim, layer_norm_eps=eps)
    validate(sd, cfg, path)
    return sd, cfg


# ---------------------------------------------------------------------------------------------
# Writing: synthetic checkpoints and conversion to the Hugging Face layout

def cache_dir():
    """Where generated checkpoints live: $RWKV_ENGINE_CACHE or ~/.cache/rwkv_engine."""
    return Path(os.environ.get("RWKV_ENGINE_CACHE") or Path.home() / ".cache" / "rwkv_engine")


def synthetic_state_dict(cfg: RWKVConfig, seed=0, dtype=torch.float32):
    """A deterministic state dict with the shapes of `cfg` and values in a trained model's range.

    time_decay spans about [-6, 7] across channels (RWKV-LM's init curve, stretched to the range
    trained RWKV-4 models reach), time_first is near log(0.3) with a zigzag, time_mix follows
    RWKV-LM's per-layer ramp, LayerNorm weights are near 1, and matrices are N(0, 1/in) so that
    k stays O(1) and activations stay bounded.
    """
    return dict(synthetic_tensors(cfg, seed, dtype))


def synthetic_tensors(cfg: RWKVConfig, seed=0, dtype=torch.float32):
    """`synthetic_state_dict` one tensor at a time: yields (key, tensor) in a fixed order, each made
    in float32 from one generator and then cast, so any dtype gives the float32 values rounded."""
    g = torch.Generator().manual_seed(seed)
    C, F, V, L = cfg.n_embd, cfg.ffn_dim, cfg.vocab_size, cfg.n_layer

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    ramp = torch.arange(C, dtype=torch.float32) / C
    yield "emb.weight", randn(V, C, std=0.1)
    for i in range(L):
        r01, r10 = i / max(L - 1, 1), 1 - i / L          # layer position, as in RWKV-LM's init
        b = f"blocks.{i}."
        if i == 0:
            yield b + "ln0.weight", (1 + randn(C, std=0.05)).to(dtype)
            yield b + "ln0.bias", randn(C, std=0.02)
        for ln in ("ln1", "ln2"):
            yield b + ln + ".weight", (1 + randn(C, std=0.05)).to(dtype)
            yield b + ln + ".bias", randn(C, std=0.02)
        decay = -6 + 13 * (torch.arange(C) / (C - 1)) ** (0.7 + 1.3 * r01)
        yield b + "att.time_decay", (decay + torch.randn(C, generator=g) * 0.3).to(dtype)
        zigzag = 0.5 * ((torch.arange(C) + 1) % 3 - 1)
        yield b + "att.time_first", (math.log(0.3) + zigzag + torch.randn(C, generator=g) * 0.3).to(dtype)
        for name, power in (("time_mix_k", r10), ("time_mix_v", r10 + 0.3 * r01), ("time_mix_r", 0.5 * r10)):
            yield b + "att." + name, (ramp ** power).reshape(1, 1, C).to(dtype)
        for name in ("key", "value", "receptance", "output"):
            yield b + f"att.{name}.weight", randn(C, C, std=C ** -0.5)
        yield b + "ffn.time_mix_k", (ramp ** r10).reshape(1, 1, C).to(dtype)
        yield b + "ffn.time_mix_r", (ramp ** r10).reshape(1, 1, C).to(dtype)
        yield b + "ffn.key.weight", randn(F, C, std=C ** -0.5)
        yield b + "ffn.value.weight", randn(C, F, std=F ** -0.5)
        yield b + "ffn.receptance.weight", randn(C, C, std=C ** -0.5)
    yield "ln_out.weight", (1 + randn(C, std=0.05)).to(dtype)
    yield "ln_out.bias", randn(C, std=0.02)
    yield "head.weight", randn(V, C, std=C ** -0.5)


def _atomic_save(obj_writer, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        obj_writer(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_synthetic(name_or_cfg, path=None, seed=0, dtype=torch.float32, fmt="pth"):
    """Write a synthetic checkpoint once (atomically) and return its path; reuses an existing one.
    fmt "pth" | "safetensors" hold the whole state dict in memory while writing; "sharded" streams
    tensor by tensor into a Hugging Face directory of ~1 GB safetensors shards (bounded memory: a 14B
    model is written on a 24 GB machine), with a progress bar on stderr."""
    cfg = get_config(name_or_cfg) if isinstance(name_or_cfg, str) else name_or_cfg
    if path is None:
        tag = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
        suffix = "" if fmt == "sharded" else f".{fmt}"
        path = cache_dir() / "synthetic" / f"{cfg.name or 'custom'}-{tag}-seed{seed}{suffix}"
    path = Path(path)
    if path.exists():
        return path
    if fmt == "sharded":
        return _write_sharded(cfg, path, seed, dtype)
    sd = synthetic_state_dict(cfg, seed, dtype)
    if fmt == "safetensors":
        from safetensors.torch import save_file
        sd = {k: v.contiguous() for k, v in sd.items()}
        return _atomic_save(lambda p: save_file(sd, str(p), metadata={"synthetic": "true"}), path)
    return _atomic_save(lambda p: torch.save(sd, p), path)


SHARD_BYTES = 1 << 30


def _write_sharded(cfg, path, seed, dtype):
    """Stream `synthetic_tensors` into shards of <= SHARD_BYTES, then the index and config.json; the
    directory appears under its name only when complete."""
    import shutil
    import sys

    from safetensors.torch import save_file
    from tqdm import tqdm
    total = cfg.n_params * torch.tensor([], dtype=dtype).element_size()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        shard, size, weight_map, names = {}, 0, {}, []
        with tqdm(total=total, desc=f"writing {path.name}", unit="B", unit_scale=True, file=sys.stderr,
                  disable=None if total < 1e9 else False) as bar:
            def flush():
                name = f"model-{len(names) + 1:05d}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": "pt", "synthetic": "true"})
                weight_map.update({k: name for k in shard})
                names.append(name)
            for key, t in synthetic_tensors(cfg, seed, dtype):
                if shard and size + t.nbytes > SHARD_BYTES:
                    flush()
                    shard, size = {}, 0
                shard[blinkdl_to_hf(key)] = t.contiguous()
                size += t.nbytes
                bar.update(t.nbytes)
            flush()
        (tmp / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}, indent=1))
        (tmp / "config.json").write_text(json.dumps(_hf_config(cfg), indent=2))
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _hf_config(cfg: RWKVConfig):
    return {"architectures": ["RwkvForCausalLM"], "model_type": "rwkv", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.n_embd, "num_hidden_layers": cfg.n_layer,
            "attention_hidden_size": cfg.n_embd, "intermediate_size": cfg.ffn_dim,
            "context_length": cfg.ctx_len, "layer_norm_epsilon": cfg.layer_norm_eps,
            "rescale_every": 0, "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 0}


def write_hf(sd, cfg: RWKVConfig, out_dir, synthetic=False):
    """Write a state dict (BlinkDL names) as a Hugging Face RwkvForCausalLM directory."""
    from safetensors.torch import save_file
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf = {blinkdl_to_hf(k): v.contiguous() for k, v in sd.items()}
    config = _hf_config(cfg)
    meta = {"format": "pt", "synthetic": str(bool(synthetic)).lower()}
    _atomic_save(lambda p: save_file(hf, str(p), metadata=meta), out_dir / "model.safetensors")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir
