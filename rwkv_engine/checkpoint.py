"""Reading RWKV-4 checkpoints in every format they ship in, validating them, and writing synthetic ones.

Formats (all end as a dict of BlinkDL-named tensors, memory-mapped where the format allows):
  * BlinkDL `.pth` (torch.save zip; loaded only with weights_only=True, mmap=True)
  * `.safetensors` with the same keys (memory-mapped)
  * Hugging Face `RwkvForCausalLM` directory: config.json + model.safetensors | pytorch_model.bin
    | a sharded *.index.json; its names are mapped back to BlinkDL's.
"""
import json
import math
import re
import zipfile
from pathlib import Path

import torch

from . import weights
from .config import RWKVConfig, canonical_name, get_config
from .files import (CheckpointError, atomic_dir, atomic_write, cache_dir, dtype_problem, format_bytes,  # noqa: F401 (re-exported)
                    dimension_problem, release_pages, open_weights, read_config_json, synthetic_path, value_problem,
                    weight_files)


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
    """Read the shapes a checkpoint implies (ChatRWKV infers them the same way). `sd` maps keys to
    tensors or to shapes."""
    shape = lambda key: tuple(sd[key].shape if isinstance(sd[key], torch.Tensor) else sd[key])
    for key in ("emb.weight", "blocks.0.ffn.key.weight"):
        if key not in sd:
            raise CheckpointError(f"{source}: missing key {key!r} (not an RWKV-4 checkpoint?)")
    if len(shape("emb.weight")) != 2:
        raise CheckpointError(f"{source}: emb.weight has shape {list(shape('emb.weight'))}, expected [vocab, n_embd]")
    if len(shape("blocks.0.ffn.key.weight")) != 2:
        raise CheckpointError(f"{source}: blocks.0.ffn.key.weight has shape {list(shape('blocks.0.ffn.key.weight'))}, "
                              f"expected [ffn_dim, n_embd]")
    vocab, n_embd = shape("emb.weight")
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d{1,9})\.", k))}
    n_layer = max(layers) + 1
    ffn_dim = shape("blocks.0.ffn.key.weight")[0]
    for key, value in (("n_layer", n_layer), ("n_embd", n_embd), ("vocab_size", vocab), ("ffn_dim", ffn_dim)):
        problem = dimension_problem(key, value)         # before anything is built from the shapes
        if problem:
            raise CheckpointError(f"{source}: {problem}")
    try:
        return RWKVConfig(n_layer=n_layer, n_embd=n_embd, vocab_size=vocab, ffn_dim=ffn_dim)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


# -exp(time_decay) must be a finite float32: time_decay <= log(float32 max) ~ 88.7
MAX_TIME_DECAY = 88.0


def stage_keys(cfg: RWKVConfig, layers):
    """The keys a model holding `layers` (a range) reads: its blocks, the embedding (and ln0) with
    layer 0, ln_out and head with the last layer."""
    first, last = layers.start == 0, layers.stop == cfg.n_layer
    keep = lambda k: (k.startswith("blocks.") and int(k.split(".")[1]) in layers and ".ln0." not in k) or \
        (first and (k == "emb.weight" or k.startswith("blocks.0.ln0."))) or \
        (last and (k == "head.weight" or k.startswith("ln_out.")))
    return {k for k in expected_shapes(cfg) if keep(k)}


def validate(sd, cfg: RWKVConfig, source, keys=None):
    """Check keys, shapes, dtypes and values; raise CheckpointError naming the first problem.
    keys: check only these (a pipeline stage's tensors; the others are another rank's)."""
    want = expected_shapes(cfg)
    if keys is not None:
        want = {k: want[k] for k in keys}
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
        problem = dtype_problem(t.dtype)
        if problem:
            raise CheckpointError(f"{source}: {key} {problem}")
        ok = tuple(t.shape) == shape or (len(shape) == 1 and tuple(t.shape) == (1, 1, shape[0]))
        if not ok:
            raise CheckpointError(f"{source}: {key} has shape {list(t.shape)}, expected {list(shape)}")
        problem = value_problem(t)
        if problem:
            raise CheckpointError(f"{source}: {key} {problem}")
        weights.release(t)          # checked: drop its mapped pages until the model reads it
        if key.endswith("time_decay") and float(t.max()) > MAX_TIME_DECAY:
            raise CheckpointError(f"{source}: {key} has a value {float(t.max()):.3g} above {MAX_TIME_DECAY}: "
                                  f"its decay -exp(time_decay) overflows float32")


def check_against_registry(cfg, name, source):
    reg = get_config(name)
    for field in ("n_layer", "n_embd", "vocab_size", "ffn_dim"):
        if getattr(reg, field) != getattr(cfg, field):
            raise CheckpointError(f"{source}: {field}={getattr(cfg, field)} but {name} has {field}={getattr(reg, field)}")


# ---------------------------------------------------------------------------------------------
# Reading files

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


def _entries(path):
    """-> ({BlinkDL key: (shape, dtype, fetch)}, the HF config.json dict or None), no tensor data read."""
    hf_cfg, rename = None, (lambda k: k)
    if path.is_dir():
        hf_cfg = read_config_json(path)
        if hf_cfg.get("model_type") != "rwkv":
            raise CheckpointError(f"{path / 'config.json'}: model_type is {hf_cfg.get('model_type')!r}, expected 'rwkv'")
        files, rename = weight_files(path), hf_to_blinkdl
    else:
        files = [path]
    entries = {}
    packed = not path.is_dir() and recorded_format(path) is not None    # packed values: checked when unpacked
    for f in files:
        for key, (shape, dtype, fetch) in open_weights(f).items():
            name = rename(key)
            if name in entries:
                raise CheckpointError(f"{f}: key {key!r} appears twice")
            problem = None if packed else dtype_problem(dtype)
            if problem:
                raise CheckpointError(f"{f}: {name} {problem}")
            entries[name] = (shape, dtype, fetch)
    return entries, hf_cfg


def _hf_eps(hf_cfg, default, source):
    eps = hf_cfg.get("layer_norm_epsilon", default)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise CheckpointError(f"{source / 'config.json'}: layer_norm_epsilon must be a number > 0, got {eps!r}")
    return float(eps)


# config.json keys of RwkvForCausalLM -> the RWKVConfig field the weights' shapes give, and where
# (a key absent or null in config.json states nothing: HF then derives it from hidden_size).
HF_SHAPE_KEYS = (("hidden_size", "n_embd", "emb.weight [vocab, n_embd]"),
                 ("attention_hidden_size", "n_embd", "emb.weight [vocab, n_embd]"),
                 ("num_hidden_layers", "n_layer", "the blocks.<i> present"),
                 ("vocab_size", "vocab_size", "emb.weight [vocab, n_embd]"),
                 ("intermediate_size", "ffn_dim", "blocks.0.ffn.key.weight [ffn_dim, n_embd]"))


def check_hf_shapes(hf_cfg, cfg: RWKVConfig, source):
    """A Hugging Face directory's config.json must agree with the shapes of its weights: a
    contradiction is an error naming both values (the weights would otherwise win silently)."""
    for key, field, where in HF_SHAPE_KEYS:
        stated = hf_cfg.get(key)
        if stated is None:
            continue
        if isinstance(stated, bool) or not isinstance(stated, int):
            raise CheckpointError(f"{source / 'config.json'}: {key} must be an int, got {stated!r}")
        if stated != getattr(cfg, field):
            raise CheckpointError(f"{source / 'config.json'}: {key} is {stated} but the weights have "
                                  f"{field} {getattr(cfg, field)} (from {where})")


def read_checkpoint(path, layers=None):
    """Load any supported checkpoint -> (dict of BlinkDL-named tensors, RWKVConfig), validated.
    layers: a range of layers (a pipeline stage): only the tensors of `stage_keys` are fetched,
    checked and returned; the other keys' names are checked against the config."""
    entries, cfg = open_checkpoint(path)
    meta = read_metadata(path) if Path(path).suffix == ".safetensors" else {}
    packed = weights.META_FORMAT in meta            # a packed file (python -m rwkv_engine.convert --weights)
    keep = None if layers is None else stage_keys(cfg, layers)
    if keep is not None:                            # an int8 matrix comes with its scales
        validate_names({k: v for k, v in entries.items() if not (packed and k.endswith(".scale"))}, cfg, path)
    fetched = keep if keep is None or not packed else keep | {k + ".scale" for k in keep}
    sd = {k: fetch() for k, (_, _, fetch) in entries.items() if fetched is None or k in fetched}
    if packed:
        try:
            sd, _ = weights.unpack_file(sd, meta, path)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    validate(sd, cfg, path, keep)
    return sd, cfg


def open_checkpoint(path):
    """-> ({BlinkDL key: (shape, dtype, fetch)}, RWKVConfig inferred from the shapes); reads no
    tensor data and validates nothing (read_checkpoint does)."""
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        raise CheckpointError(f"{path}: no such file or directory")
    entries, hf_cfg = _entries(path)
    cfg = infer_config({k: shape for k, (shape, _, _) in entries.items()}, path)
    if hf_cfg is not None:
        check_hf_shapes(hf_cfg, cfg, path)
        cfg = RWKVConfig(cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.ffn_dim,
                         layer_norm_eps=_hf_eps(hf_cfg, cfg.layer_norm_eps, path))
    return entries, cfg


def validate_names(entries, cfg, source):
    """Every expected key present and no other, from the listing alone."""
    want = expected_shapes(cfg)
    for found, expected, what in ((want, entries, "missing"), (entries, want, "unexpected")):
        odd = [k for k in found if k not in expected]
        if odd:
            raise CheckpointError(f"{source}: {what} key {odd[0]!r}" + (f" (and {len(odd) - 1} more)" if len(odd) > 1 else ""))


def recorded_format(path):
    """The weight format a packed safetensors file records, or None for a plain checkpoint."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    from safetensors import SafetensorError
    try:
        return read_metadata(path).get(weights.META_FORMAT)
    except SafetensorError:                 # not a safetensors file: the reader says so
        return None


def read_metadata(path):
    """The string metadata a checkpoint carries (safetensors header, a .pth's zip comment, or a HF
    directory's config.json), e.g. {"synthetic": "true"}; {} when none."""
    path = Path(path)
    try:
        if path.is_dir():
            cfg = read_config_json(path)
            if cfg.get("synthetic") is not True:
                return {}
            return synthetic_metadata(canonical_name(cfg.get("_name_or_path")))
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(path), framework="pt") as f:
                return dict(f.metadata() or {})
        with zipfile.ZipFile(path) as z:
            meta = json.loads(z.comment.decode() or "{}")
        return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}
    except (OSError, ValueError, zipfile.BadZipFile, UnicodeDecodeError):
        return {}


# ---------------------------------------------------------------------------------------------
# Writing: synthetic checkpoints and conversion to the Hugging Face layout

def synthetic_state_dict(cfg: RWKVConfig, seed=0, dtype=torch.float32, device="cpu"):
    """A deterministic state dict with the shapes of `cfg` and values in a trained model's range.

    time_decay spans about [-6, 7] across channels (RWKV-LM's init curve, stretched to the range
    trained RWKV-4 models reach), time_first is near log(0.3) with a zigzag, time_mix follows
    RWKV-LM's per-layer ramp, LayerNorm weights are near 1, and matrices are N(0, 1/in) so that
    k stays O(1) and activations stay bounded. With device "cuda" the values are drawn on the GPU
    (same recipe, the GPU's random stream), so that a 14B model needs no file.
    """
    return dict(synthetic_tensors(cfg, seed, dtype, device))


def synthetic_tensors(cfg: RWKVConfig, seed=0, dtype=torch.float32, device="cpu"):
    """`synthetic_state_dict` one tensor at a time: yields (key, tensor) in a fixed order, each drawn
    in float32 from one generator and then cast (any dtype gives the float32 values rounded)."""
    g = torch.Generator(device).manual_seed(seed)
    C, F, V, L = cfg.n_embd, cfg.ffn_dim, cfg.vocab_size, cfg.n_layer

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, device=device) * std).to(dtype)

    def noise(n):                                    # float32 jitter, rounded only once
        return torch.randn(n, generator=g, device=device) * 0.3

    ramp = torch.arange(C, dtype=torch.float32, device=device) / C
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
        decay = -6 + 13 * (torch.arange(C, device=device) / (C - 1)) ** (0.7 + 1.3 * r01)
        yield b + "att.time_decay", (decay + noise(C)).to(dtype)
        zigzag = 0.5 * ((torch.arange(C, device=device) + 1) % 3 - 1)
        yield b + "att.time_first", (math.log(0.3) + zigzag + noise(C)).to(dtype)
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


SYNTHETIC = {"synthetic": "true"}         # the metadata label every synthetic checkpoint carries
MODEL_KEY = "model"                        # metadata: the registered name a file's shapes are (kept by convert)


def synthetic_metadata(name=None):
    """The metadata of a synthetic checkpoint: the label, and the registered model's name when known."""
    return dict(SYNTHETIC, **({MODEL_KEY: name} if name else {}))


def model_name(meta):
    """The registered name a checkpoint's metadata records (read_metadata's dict), or None."""
    return canonical_name(meta.get(MODEL_KEY))


def save_pth(sd, path, metadata=None):
    """torch.save, with string metadata (e.g. the synthetic label) as the zip archive's comment:
    torch.load and BlinkDL's loader ignore it; read_metadata reads it."""
    torch.save(sd, path)
    if metadata:
        with zipfile.ZipFile(path, "a") as z:
            z.comment = json.dumps(metadata).encode()


def save_safetensors(sd, path, metadata=None):
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=dict(metadata or {}, format="pt"))


def write_synthetic(name_or_cfg, path=None, seed=0, dtype=torch.float32, fmt="pth"):
    """Write a synthetic checkpoint once (atomically) and return its path; reuses an existing one.
    fmt "pth" | "safetensors" hold the whole state dict in memory while writing; "hf" streams it
    tensor by tensor into a Hugging Face directory of ~1 GB safetensors shards (bounded memory: a 14B
    model is written on a 24 GB machine), with a progress bar on stderr. `synthetic_notice` says
    beforehand what a call will write. SIGTERM during the write leaves no temporary behind."""
    cfg = get_config(name_or_cfg) if isinstance(name_or_cfg, str) else name_or_cfg
    path = Path(path) if path is not None else synthetic_path(cfg.name or "custom", dtype, seed, fmt)
    if path.exists():
        return path
    if fmt == "hf":
        return _write_sharded(cfg, path, seed, dtype)
    sd = synthetic_state_dict(cfg, seed, dtype)
    save = save_safetensors if fmt == "safetensors" else save_pth
    return atomic_write(path, lambda p: save(sd, p, synthetic_metadata(cfg.name)), need=_nbytes(sd))


def synthetic_source(weights=None):
    """(dtype, fmt) of the synthetic checkpoint a registered name loads with weight format `weights`:
    float32 weights come from a float32 .pth; 16-bit and int8 ones from a bfloat16 Hugging Face
    directory, streamed shard by shard (int8 is packed from it at load)."""
    return (torch.float32, "pth") if weights in (None, "float32") else (torch.bfloat16, "hf")


def synthetic_for(name, weights=None, seed=0):
    """The synthetic checkpoint `rwkv_engine.load(name, weights=weights)` reads, written on first use."""
    dtype, fmt = synthetic_source(weights)
    return write_synthetic(name, seed=seed, dtype=dtype, fmt=fmt)


def synthetic_plan(name, weights=None, seed=0):
    """What `synthetic_for` writes for a registered name: {path, exists, dtype, fmt, bytes (on disk),
    ram_bytes (held in memory while it is written)}. Writes nothing."""
    cfg = get_config(name)
    dtype, fmt = synthetic_source(weights)
    path = synthetic_path(cfg.name, dtype, seed, fmt)
    size = cfg.n_params * torch.tensor([], dtype=dtype).element_size()
    # a .pth is built whole in memory; the sharded writer holds one shard (and one tensor) at a time
    ram = size if fmt != "hf" else min(size, SHARD_BYTES + _largest_tensor_bytes(cfg, dtype))
    return {"path": path, "exists": path.exists(), "dtype": str(dtype).removeprefix("torch."), "fmt": fmt,
            "bytes": size, "ram_bytes": ram}


def synthetic_notice(name, weights=None, seed=0):
    """One line telling what the first use of `name` (with weight format `weights`) writes: the
    format, its size on disk and the memory writing it takes; '' when it is already written."""
    plan = synthetic_plan(name, weights, seed)
    if plan["exists"]:
        return ""
    size = format_bytes(plan["bytes"])
    what = (f"a {size} {plan['dtype']} .pth file, built in memory" if plan["fmt"] == "pth" else
            f"a {size} {plan['dtype']} Hugging Face directory, written shard by shard")
    ram = ("about as much RAM as its size while it is written" if plan["ram_bytes"] >= plan["bytes"] else
           f"at most about {format_bytes(plan['ram_bytes'])} of RAM while it is written")
    made = f"; the {weights} weights are made from it at load" if weights not in (None, plan["dtype"]) else ""
    return (f"first use of {get_config(name).name}" + (f" with --weights {weights}" if weights else "") +
            f": writing its synthetic checkpoint to the cache once: {what} ({ram}){made}")


def _largest_tensor_bytes(cfg, dtype):
    return max(cfg.vocab_size, cfg.ffn_dim) * cfg.n_embd * torch.tensor([], dtype=dtype).element_size()


SHARD_BYTES = 1 << 30


def _write_sharded(cfg, path, seed, dtype):
    """Stream `synthetic_tensors` into safetensors shards of <= SHARD_BYTES with their index and a
    config.json labelled synthetic; the directory appears under its name only when complete."""
    import sys

    from tqdm import tqdm
    total = cfg.n_params * torch.tensor([], dtype=dtype).element_size()

    def fill(tmp):
        shard, size, weight_map, names = {}, 0, {}, []

        def flush():
            name = f"model-{len(names) + 1:05d}.safetensors"
            save_safetensors(shard, tmp / name, synthetic_metadata(cfg.name))
            weight_map.update({k: name for k in shard})
            names.append(name)
        with tqdm(total=total, desc=f"writing {path.name}", unit="B", unit_scale=True, file=sys.stderr,
                  disable=None if total < 1e9 else False) as bar:
            for key, t in synthetic_tensors(cfg, seed, dtype):
                if shard and size + t.nbytes > SHARD_BYTES:
                    flush()
                    shard, size = {}, 0
                shard[blinkdl_to_hf(key)] = t
                size += t.nbytes
                bar.update(t.nbytes)
            flush()
        (tmp / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}, indent=1))
        (tmp / "config.json").write_text(json.dumps(hf_config(cfg, synthetic_metadata(cfg.name)), indent=2))
    return atomic_dir(path, fill, need=total)


def _nbytes(sd):
    return sum(t.numel() * t.element_size() for t in sd.values())


def hf_config(cfg: RWKVConfig, metadata=None):
    """The config.json of a Hugging Face RwkvForCausalLM directory (a synthetic one says so)."""
    config = {"architectures": ["RwkvForCausalLM"], "model_type": "rwkv", "vocab_size": cfg.vocab_size,
              "hidden_size": cfg.n_embd, "num_hidden_layers": cfg.n_layer,
              "attention_hidden_size": cfg.n_embd, "intermediate_size": cfg.ffn_dim,
              "context_length": cfg.ctx_len, "layer_norm_epsilon": cfg.layer_norm_eps,
              "rescale_every": 0, "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 0}
    if (metadata or {}).get("synthetic") == "true":
        config["synthetic"] = True
    if model_name(metadata or {}):
        config["_name_or_path"] = model_name(metadata)
    return config


def write_hf(sd, cfg: RWKVConfig, out_dir, overwrite=False, metadata=None):
    """Write a state dict (BlinkDL names) as a Hugging Face RwkvForCausalLM directory, as one set:
    an existing non-empty directory is replaced whole with `overwrite`, refused without."""
    hf = {blinkdl_to_hf(k): v for k, v in sd.items()}

    def fill(tmp):
        save_safetensors(hf, tmp / "model.safetensors", metadata)
        (tmp / "config.json").write_text(json.dumps(hf_config(cfg, metadata), indent=2))
    return atomic_dir(out_dir, fill, overwrite=overwrite, need=_nbytes(sd))
