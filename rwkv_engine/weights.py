"""Choosing and applying a weight format to a model's matrices, and quantised checkpoint files.

    weights=None        every tensor in the compute dtype (as before)
    weights="float16" | "bfloat16" | "int8" | "float32"
        the large matrices (att/ffn key, value, receptance, output; head) stored in that format
        (`kernels.quant`), the embedding in 16 bits (it is only indexed), everything else and all
        activations, state and accumulation in float32. CPU only.

Quantising happens at load, one matrix at a time straight from the memory-mapped checkpoint; each
source tensor's pages are dropped from this process's memory (madvise) once packed, so peak RSS
stays near the packed size plus one matrix. `save_packed` writes the packed model as safetensors
(format in the metadata) that `read_packed` maps back without converting anything.
"""
import ctypes
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels import quant
from kernels.quant import Int8Weight

from .files import atomic_write, release_pages

META_FORMAT = "rwkv_engine.weights"
META_SHAPES = "rwkv_engine.in_features"
MATRIX_SUFFIXES = ("att.key.weight", "att.value.weight", "att.receptance.weight", "att.output.weight",
                   "ffn.key.weight", "ffn.value.weight", "ffn.receptance.weight")
EMBEDDING_DTYPE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                   "int8": torch.float16}


def is_matrix(key):
    return key == "head.weight" or key.endswith(MATRIX_SUFFIXES)


def resolve(weights, dtype, device):
    """-> the weight format to pack into, or None for "same as the compute dtype" (plain casts)."""
    if weights is None:
        return None
    quant.check_format(weights)
    if dtype != torch.float32 or torch.device(device).type != "cpu":
        if quant.FLOAT_FORMATS.get(weights) == dtype and torch.device(device).type != "cpu":
            return None
        raise ValueError(f"weights={weights!r} needs dtype float32 on CPU (activations stay float32); "
                         f"got dtype {dtype} on {torch.device(device)}")
    return weights


def pack_matrix(t, fmt, scale=1):
    """A checkpoint matrix -> the packed weight; already packed ones (a quantised file) pass through."""
    if isinstance(t, Int8Weight):
        if fmt != "int8" or scale != 1:
            raise ValueError(f"an int8 checkpoint loads with weights='int8', not {fmt!r}")
        return t
    if fmt == "int8" and scale == 1:
        return quant.quantize_int8(t, after_slice=release)     # source pages dropped slice by slice
    src = t.float() / scale if scale != 1 else t
    packed = quant.pack(src, fmt)
    release(t)
    return packed


def pack_embedding(emb, fmt):
    """The embedding table (only indexed) in 16 bits; the same rounding at load and in converted files."""
    return emb if emb.dtype == EMBEDDING_DTYPE[fmt] else emb.to(EMBEDDING_DTYPE[fmt])


def embedding_with_ln0(emb, ln_w, ln_b, eps, fmt, rows_per_step=2048):
    """LayerNorm(pack_embedding(emb)) in float32, stored in the format's embedding dtype, computed in
    slices of rows so that no float32 copy of the whole table (1 GB at 14B) is ever made."""
    out = torch.empty(emb.shape, dtype=EMBEDDING_DTYPE[fmt], device=emb.device)
    for r0 in range(0, emb.shape[0], rows_per_step):
        rows = pack_embedding(emb[r0:r0 + rows_per_step], fmt).float()
        out[r0:r0 + rows_per_step] = F.layer_norm(rows, (emb.shape[1],), ln_w.float(), ln_b.float(), eps)
        release(emb[r0:r0 + rows_per_step])
    return out


def all_finite(t, step=1 << 22):
    """torch.isfinite(t).all() in slices (no whole-tensor temporaries), dropping mapped pages as it goes."""
    flat = t.reshape(-1)
    for i in range(0, flat.numel(), step):
        part = flat[i:i + step]
        if not bool(torch.isfinite(part).all()):
            return False
        release(part)
    return True


def trim_heap():
    """Return freed heap memory to the OS (glibc keeps freed slices of packing between long-lived
    packed tensors, which would otherwise show as resident memory)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def release(t):
    """Drop a memory-mapped tensor's pages from this process's resident set (the file keeps the data;
    a later read maps it back in); a no-op for anything not inside a private file mapping."""
    release_pages([t])


# ---------------------------------------------------------------------------------------------
# Packed checkpoint files (safetensors)

def packed_tensors(sd, fmt, progress=None):
    """Yield the tensors of a packed checkpoint: matrices packed (int8 as KEY + KEY.scale), the
    embedding in 16 bits, the rest unchanged. `progress`: a tqdm-like callable wrapping the keys."""
    keys = list(sd)
    for key in (progress(keys) if progress else keys):
        t = sd[key]
        if is_matrix(key):
            w = pack_matrix(t, fmt)
            if isinstance(w, Int8Weight):
                yield key, w.q, w.in_features
                yield key + ".scale", w.scale, None
            else:
                yield key, w, None
        elif key == "emb.weight":
            yield key, pack_embedding(t, fmt).contiguous(), None
        else:
            yield key, t.contiguous(), None


def save_packed(sd, fmt, path, metadata=None, progress=None, overwrite=True):
    """Write a checkpoint with its matrices in format `fmt` to one safetensors file (atomically)."""
    from safetensors.torch import save_file
    out, in_features = {}, {}
    for key, t, n_in in packed_tensors(sd, fmt, progress):
        out[key] = t
        if n_in is not None:
            in_features[key] = n_in
    meta = dict(metadata or {}, format="pt", **{META_FORMAT: fmt, META_SHAPES: json.dumps(in_features)})
    need = sum(t.nbytes for t in out.values())
    return atomic_write(Path(path), lambda p: save_file(out, str(p), metadata=meta), overwrite=overwrite, need=need)


def unpack_file(sd, meta, source):
    """The tensors of a packed file -> a state dict whose int8 matrices are Int8Weight (checked)."""
    fmt = meta.get(META_FORMAT)
    if fmt not in quant.FORMATS:
        raise ValueError(f"{source}: unknown weight format {fmt!r} in the file's metadata")
    if fmt != "int8":
        return sd, fmt
    try:
        in_features = json.loads(meta.get(META_SHAPES, "{}"))
    except json.JSONDecodeError:
        raise ValueError(f"{source}: corrupt {META_SHAPES} metadata") from None
    out = {}
    for key, t in sd.items():
        if key.endswith(".scale"):
            continue
        if is_matrix(key):
            if key + ".scale" not in sd or key not in in_features:
                raise ValueError(f"{source}: int8 matrix {key} has no scales or no in_features entry")
            t = Int8Weight(t, sd[key + ".scale"], int(in_features[key])).check(f"{source}: {key}")
        out[key] = t
    return out, fmt
