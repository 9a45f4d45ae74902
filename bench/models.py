"""One place that turns a model name into a loaded model (RWKV engine or a transformer baseline)
and estimates, before loading anything, how much memory and time a run will need.

Families and sizes come from the registries of `rwkv_engine` (config.MODELS) and `baselines`;
nothing about shapes is repeated here.
"""
import shutil
import subprocess
import sys
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

import psutil

from bench import PROMPT_TOKENS
from rwkv_kernels import formats

RWKV = "rwkv"
RWKV_LABEL, RWKV_STYLE = "RWKV-4", ("tab:red", "o")
MARGIN_BYTES = 512 << 20        # allocator slack, interpreter, libraries
MARGIN_FRACTION = 0.10          # of the parameter bytes: conversion copies, fragmentation
BYTES = {"float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2}


class _WeightBytes(Mapping):
    """Bytes per stored weight of each weight format (`--weights`), read from the format records
    (`rwkv_kernels.formats`; e.g. the Q8_0 blocks keep one fp16 scale per 32 weights, 34 / 32 bytes)."""

    def __getitem__(self, name):
        if name not in formats.NAMES:
            raise KeyError(name)
        return formats.get(name).bytes_per_weight

    def __iter__(self):
        return iter(formats.names())

    def __len__(self):
        return len(formats.NAMES)


WEIGHT_BYTES = _WeightBytes()


# ---------------------------------------------------------------------------------------------
# Names

def classify(name):
    """('rwkv' | 'baseline', registered name or checkpoint path); ValueError if neither."""
    p = Path(name)
    if p.exists():
        if p.is_dir() and (p / "config.json").is_file():
            from rwkv_engine.files import read_json       # CheckpointError unless a JSON object
            model_type = read_json(p / "config.json").get("model_type")
            return ("rwkv" if model_type == "rwkv" else "baseline"), str(p)
        return "rwkv", str(p)
    from rwkv_engine.config import ALIASES, MODELS
    key = name.lower()
    if ALIASES.get(key, key) in MODELS:
        return "rwkv", ALIASES.get(key, key)
    from baselines.config import MODELS as BASELINES, canonical_name
    if canonical_name(name) is not None:
        return "baseline", canonical_name(name)
    raise ValueError(f"unknown model {name!r}; known: {', '.join(list(MODELS) + list(BASELINES))}")


@lru_cache(maxsize=None)
def config(name):
    """The shape config of a registered name or checkpoint path (nothing is loaded for names)."""
    kind, key = classify(name)
    if kind == "rwkv":
        if Path(key).exists():
            from rwkv_engine.checkpoint import read_checkpoint
            return read_checkpoint(key)[1]
        from rwkv_engine.config import get_config
        return get_config(key)
    if Path(key).exists():
        from baselines import read_config
        return read_config(key)
    from baselines.config import MODELS
    return MODELS[key]


def family_of(name):
    """'rwkv' or the baseline family ('pythia', 'opt', 'gpt-neo', 'bloom'); ValueError if unknown."""
    kind, _ = classify(name)
    return RWKV if kind == "rwkv" else config(name).family


def family_label(family):
    """Legend label of a family: RWKV-4, or the label its baselines module registered."""
    if family == RWKV:
        return RWKV_LABEL
    from baselines.family import by_name
    registered = by_name(family)
    return registered.label if registered else family


def family_style(family):
    """(color, marker) of a family in the plots, as registered by its module."""
    if family == RWKV:
        return RWKV_STYLE
    from baselines.family import DEFAULT_STYLE, by_name
    registered = by_name(family)
    return registered.style if registered else DEFAULT_STYLE


def canonical(name):
    return classify(name)[1]


def families(include_test=False):
    """family -> registered model names, smallest first (test-only sizes left out unless asked)."""
    from baselines.config import MODELS as BASELINES
    from rwkv_engine.config import MODELS
    out = {}
    for name in list(MODELS) + list(BASELINES):
        if include_test or not ("tiny" in name or "test" in name):
            out.setdefault(family_of(name), []).append(name)
    return {fam: sorted(names, key=n_params) for fam, names in out.items()}


def n_params(name):
    return int(config(name).n_params)


def max_positions(name):
    """Longest sequence a model can run (None: no limit; RWKV and Bloom/ALiBi)."""
    if family_of(name) == RWKV:
        return None
    return config(name).max_positions


# ---------------------------------------------------------------------------------------------
# Loading

def load(name, device="cpu", dtype="float32", checkpoint=None, protocol="kv-cache", weights=None):
    """Load `name` (optionally with real weights from `checkpoint`) through its own package.
    weights: the weight format (see WEIGHT_BYTES); passed on only when given."""
    kind, key = classify(name)
    if kind == "rwkv":
        import rwkv_engine
        return _call(rwkv_engine.load, weights, key, device=device, dtype=dtype, checkpoint=checkpoint)
    import baselines
    return _call(baselines.load, weights, key, device=device, dtype=dtype, protocol=protocol, checkpoint=checkpoint)


def _call(loader, weight_format, *args, **kwargs):
    """loader(*args, **kwargs), with weights=weight_format only when a format is given (and a clear
    error if this loader does not take one)."""
    if weight_format is None:
        return loader(*args, **kwargs)
    import inspect
    params = inspect.signature(loader).parameters
    if "weights" not in params and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        raise ValueError(f"--weights {weight_format}: {loader.__module__}.load takes no weight format in this version")
    return loader(*args, weights=weight_format, **kwargs)


def bytes_per_weight(dtype="float32", weights=None):
    """Bytes one parameter takes in memory: the weight format's, else the compute dtype's. (`weights=`
    here and below is the weight format, spelt as `rwkv_engine.load(weights=)` and `--weights`.)"""
    if weights is not None:
        return formats.get(weights).bytes_per_weight
    return BYTES[dtype]


def synthetic_checkpoint_missing(name, weights=None):
    """Bytes of disk a first run must write for the synthetic checkpoint of a registered name
    with weight format `weights` (0 when it is already cached, or `name` is a checkpoint path)."""
    kind, key = classify(name)
    if Path(key).exists():
        return 0
    if kind == "rwkv":                               # what rwkv_engine.load(name, weights=) reads
        from rwkv_engine.checkpoint import synthetic_plan
        plan = synthetic_plan(key, weights)
        return 0 if plan["exists"] else plan["bytes"]
    from baselines.loader import synthetic_dir       # baselines.write_synthetic: fp16 safetensors
    return 0 if (synthetic_dir(key) / "model.safetensors").is_file() else n_params(name) * 2


# ---------------------------------------------------------------------------------------------
# Estimates

def runtime_bytes(name, tokens, prompt_tokens=PROMPT_TOKENS, protocol="kv-cache", dtype="float32"):
    """Rough peak memory of generation beyond the parameters (state or KV cache + activations)."""
    cfg = config(name)
    b = BYTES[dtype]
    T = prompt_tokens + tokens
    if family_of(name) == RWKV:
        C, F, V, L = cfg.n_embd, cfg.ffn_dim, cfg.vocab_size, cfg.n_layer
        state = 5 * L * C * 4
        prefill = prompt_tokens * (6 * C + 2 * F) * 4          # one layer's sequence-mode tensors
        return state + prefill + 2 * V * 4
    L, H, V, heads, ffn = cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.n_head, cfg.ffn_dim
    kv = 2 * L * T * cfg.n_head * cfg.head_dim * b             # n_head * head_dim need not be n_embd
    if protocol == "paper":                                    # whole sequence every step, no cache
        scores = 2 * heads * T * T * 4                         # one layer's scores and softmax
        acts = T * (4 * H + 2 * ffn) * b                       # one layer's q, k, v, out, MLP
        return kv + scores + acts + 2 * V * 4                  # kv: a fresh cache of T positions
    prefill = prompt_tokens * (4 * H + 2 * ffn) * b + 2 * heads * prompt_tokens * T * 4
    return kv + prefill + 2 * V * 4


def estimate(name, tokens, prompt_tokens=PROMPT_TOKENS, protocol="kv-cache", dtype="float32", weights=None):
    """{'params_bytes', 'runtime_bytes', 'margin_bytes', 'total_bytes'} for one run."""
    params = int(n_params(name) * bytes_per_weight(dtype, weights))
    run = runtime_bytes(name, tokens, prompt_tokens, protocol, dtype)
    margin = int(params * MARGIN_FRACTION) + MARGIN_BYTES
    return {"params_bytes": params, "runtime_bytes": int(run), "margin_bytes": margin,
            "total_bytes": int(params + run + margin)}


@lru_cache(maxsize=None)
def _gpu_free_bytes():
    """Free GPU memory, asked in a child process so this one never holds a CUDA context."""
    code = "import torch; print(torch.cuda.mem_get_info()[0])"
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def available_bytes(device="cpu"):
    """Memory a run may use now: free GPU memory, or available RAM (page cache counts as free)."""
    return _gpu_free_bytes() if device == "cuda" else psutil.virtual_memory().available


def fits(name, device="cpu", tokens=512, prompt_tokens=PROMPT_TOKENS, protocol="kv-cache", dtype="float32",
         budget_bytes=None, weights=None):
    """(True, '') or (False, reason): does one run of `name` fit this machine?"""
    est = estimate(name, tokens, prompt_tokens, protocol, dtype, weights)
    budget = available_bytes(device) if budget_bytes is None else budget_bytes
    if est["total_bytes"] > budget:
        return False, (f"needs ~{est['total_bytes'] / 1e9:.1f} GB ({est['params_bytes'] / 1e9:.1f} GB params"
                       f" + {est['runtime_bytes'] / 1e9:.2f} GB runtime + margin), "
                       f"{budget / 1e9:.1f} GB {'GPU' if device == 'cuda' else 'RAM'} available")
    limit = max_positions(name)
    if limit is not None and prompt_tokens + tokens > limit:
        return False, f"{prompt_tokens}+{tokens} positions exceed its {limit} max positions"
    need_disk = synthetic_checkpoint_missing(name, weights)
    if need_disk:
        from rwkv_engine.checkpoint import cache_dir
        d = cache_dir()
        while not d.exists():
            d = d.parent
        free = shutil.disk_usage(d).free
        if need_disk * 1.05 > free:
            return False, f"its synthetic checkpoint needs {need_disk / 1e9:.1f} GB of disk, {free / 1e9:.1f} GB free"
    return True, ""


def estimate_seconds(name, tokens, machine, prompt_tokens=PROMPT_TOKENS, protocol="kv-cache", dtype="float32",
                     weights=None):
    """Roofline guess of one run's time: each step is bound by weight reads or by FLOPs."""
    P = n_params(name)
    bw = machine["read_bandwidth_GBps"] * 1e9
    flops = machine["gemm_fp32_GFLOPs"] * 1e9
    read = P * bytes_per_weight(dtype, weights) / bw
    total = 2 * P * prompt_tokens / flops
    for step in range(tokens):
        T = prompt_tokens + step if (protocol == "paper" and family_of(name) != RWKV) else 1
        total += max(read, 2 * P * T / flops)
    return total
