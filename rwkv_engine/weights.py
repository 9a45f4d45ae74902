"""Choosing and applying a weight format to a model's matrices, and packed checkpoint files.

    weights=None        every tensor in the compute dtype (as before)
    weights=<a format of rwkv_kernels.formats> (`rwkv_kernels.formats.names()`: float32, float16, bfloat16, the
        8-bit blocks of ggml's Q8_0, and any registered one)
        the large matrices (att/ffn key, value, receptance, output; head) stored in that format, the
        embedding in the format's embedding dtype (it is only indexed), everything else and all
        activations, state and accumulation in float32. CPU only.

Quantising happens at load, one matrix at a time straight from the memory-mapped checkpoint; each
source tensor's pages are dropped from this process's memory (madvise) once packed, so peak RSS
stays near the packed size plus one matrix. `save_packed` writes the packed model as safetensors
(format in the metadata) that `read_packed` maps back without converting anything.
"""
import json
from pathlib import Path

import torch

from rwkv_kernels import formats
from rwkv_kernels.decode import layer_norm

from .files import atomic_write, in_file_mapping, page_dropper, release_pages

META_FORMAT = "rwkv_engine.weights"         # the file's weight format (the key's name predates the word)
META_SHAPES = "rwkv_engine.in_features"
META_LAYOUT = "rwkv_engine.layout"         # the packed parts' layout, for formats that have one (int8: "g16")
MATRIX_SUFFIXES = ("att.key.weight", "att.value.weight", "att.receptance.weight", "att.output.weight",
                   "ffn.key.weight", "ffn.value.weight", "ffn.receptance.weight")


def is_matrix(key):
    return key == "head.weight" or key.endswith(MATRIX_SUFFIXES)


def pack_target(weight_format, dtype, device):
    """-> the weight format to pack into, or None for "same as the compute dtype" (plain casts)."""
    if weight_format is None:
        return None
    fmt = formats.get(weight_format)
    if dtype != torch.float32 or torch.device(device).type != "cpu":
        if fmt.dtype == dtype and torch.device(device).type != "cpu":
            return None
        raise ValueError(f"weights={weight_format!r} needs dtype float32 on CPU (activations stay float32); "
                         f"got dtype {dtype} on {torch.device(device)}")
    return weight_format


def pack_matrix(t, weight_format, scale=1):
    """A checkpoint matrix -> the packed weight; already packed ones (a packed file) pass through."""
    if formats.is_packed(t):
        if t.format != weight_format or scale != 1:
            raise ValueError(f"an {t.format} checkpoint loads with weights={t.format!r}, not {weight_format!r}")
        return t
    fmt = formats.get(weight_format)
    if scale == 1:
        return fmt.pack(t, after_slice=page_dropper(t))        # source pages dropped slice by slice once packed
    packed = fmt.pack(t.float() / scale)
    release(t)
    return packed


def float_format_dtype(weight_format):
    """The dtype a float weight format stores its matrices in (float32, float16, bfloat16); None for the
    packed formats."""
    return formats.get(weight_format).dtype


def embedding_dtype(weight_format):
    return formats.get(weight_format).embedding_dtype


def pack_embedding(emb, weight_format):
    """The embedding table (only indexed) in the format's embedding dtype; the same rounding at load
    and in converted files."""
    dtype = embedding_dtype(weight_format)
    return emb if emb.dtype == dtype else emb.to(dtype)


def embedding_with_ln0(emb, ln_w, ln_b, eps, weight_format, rows_per_step=2048):
    """LayerNorm(pack_embedding(emb)) in float32, stored in the format's embedding dtype, computed in
    slices of rows so that no float32 copy of the whole table (1 GB at 14B) is ever made."""
    fmt = weight_format
    out = torch.empty(emb.shape, dtype=embedding_dtype(fmt), device=emb.device)
    drop = page_dropper(emb)
    for r0 in range(0, emb.shape[0], rows_per_step):
        rows = pack_embedding(emb[r0:r0 + rows_per_step], fmt).float()
        out[r0:r0 + rows_per_step] = layer_norm(rows, ln_w.float(), ln_b.float(), eps)
        drop(emb[r0:r0 + rows_per_step])
    return out


class LazyEmbedding:
    """The embedding table with ln0 applied row by row as it is looked up, from the checkpoint's
    memory-mapped table: `embedding_with_ln0` of the rows asked for, bit for bit, without a resident
    copy of the whole table (0.51 GB at 14B, which is 5% of a 4-bit 14B's RSS); only the pages of the
    rows read come into memory. Indexed like the tensor it stands for (`emb[tokens]`)."""

    def __init__(self, raw, ln_w, ln_b, eps, weight_format):
        self.raw, self.ln_w, self.ln_b, self.eps, self.weight_format = raw, ln_w, ln_b, eps, weight_format
        self.dtype = embedding_dtype(weight_format)

    @property
    def shape(self):
        return self.raw.shape

    @property
    def nbytes(self):
        return self.raw.nbytes

    def __getitem__(self, index):
        rows = pack_embedding(self.raw[index], self.weight_format).float()
        return layer_norm(rows, self.ln_w, self.ln_b, self.eps).to(self.dtype)

    def ln0_parts(self):
        """(raw table, row dtype, ln0 weight, bias, eps): what the C token step needs to compute the same
        rows itself (rwkv_kernels.DecodeModel)."""
        return self.raw, self.dtype, self.ln_w, self.ln_b, self.eps


def ln0_embedding(emb, ln_w, ln_b, eps, weight_format, lazy):
    """The model's embedding table: LayerNorm(pack_embedding(emb)) stored whole (`embedding_with_ln0`),
    or, with `lazy` and `emb` a CPU tensor inside a file mapping (a memory-mapped checkpoint), a
    `LazyEmbedding` that computes the same rows when they are looked up."""
    ln_w, ln_b = ln_w.float(), ln_b.float()
    if lazy and emb.device.type == "cpu" and in_file_mapping(emb):
        return LazyEmbedding(emb, ln_w, ln_b, eps, weight_format)
    return embedding_with_ln0(emb, ln_w, ln_b, eps, weight_format)


def all_finite(t, step=1 << 22):
    """torch.isfinite(t).all() in slices (no whole-tensor temporaries), dropping mapped pages as it goes."""
    flat = t.reshape(-1)
    drop = page_dropper(flat)
    for i in range(0, flat.numel(), step):
        part = flat[i:i + step]
        if not bool(torch.isfinite(part).all()):
            return False
        drop(part)
    return True


def release(t):
    """Drop a memory-mapped tensor's pages from this process's resident set (the file keeps the data;
    a later read maps it back in); a no-op for anything not inside a private file mapping."""
    release_pages([t])


# ---------------------------------------------------------------------------------------------
# Packed checkpoint files (safetensors)

def packed_tensors(sd, weight_format, progress=None):
    """Yield (key, tensor, in_features or None) of a packed checkpoint: matrices packed (a packed type
    as KEY + each suffix of its format's `file_parts`, e.g. KEY and KEY.scale), the embedding in the
    format's embedding dtype, the rest unchanged. `progress`: a tqdm-like callable wrapping the keys."""
    file_parts = formats.get(weight_format).file_parts
    keys = list(sd)
    for key in (progress(keys) if progress else keys):
        t = sd[key]
        if is_matrix(key):
            w = pack_matrix(t, weight_format)
            if isinstance(w, torch.Tensor):
                yield key, w, None
            else:
                for suffix, part in zip(file_parts, w.parts()):
                    yield key + suffix, part, w.in_features if suffix == "" else None
        elif key == "emb.weight":
            yield key, pack_embedding(t, weight_format).contiguous(), None
        else:
            yield key, t.contiguous(), None


def save_packed(sd, weight_format, path, metadata=None, progress=None, overwrite=True):
    """Write a checkpoint with its matrices in `weight_format` to one safetensors file (atomically)."""
    from safetensors.torch import save_file
    out, in_features = {}, {}
    for key, t, n_in in packed_tensors(sd, weight_format, progress):
        out[key] = t
        if n_in is not None:
            in_features[key] = n_in
    meta = dict(metadata or {}, format="pt", **{META_FORMAT: weight_format, META_SHAPES: json.dumps(in_features)})
    if formats.get(weight_format).layout is not None:
        meta[META_LAYOUT] = formats.get(weight_format).layout
    need = sum(t.nbytes for t in out.values())
    return atomic_write(Path(path), lambda p: save_file(out, str(p), metadata=meta), overwrite=overwrite, need=need)


def read_in_features(meta, source):
    """The file's META_SHAPES metadata, checked: a JSON object of matrix key -> in_features, a
    positive integer; ValueError (one line, naming the key) otherwise."""
    text = meta.get(META_SHAPES, "{}")
    try:
        in_features = json.loads(text, parse_constant=lambda c: float(c))
    except (json.JSONDecodeError, TypeError, RecursionError):
        raise ValueError(f"{source}: metadata {META_SHAPES} is not valid JSON") from None
    if not isinstance(in_features, dict):
        raise ValueError(f"{source}: metadata {META_SHAPES} must be a JSON object of matrix -> in_features, "
                         f"got {json.dumps(in_features)[:60]}")
    for key, n in in_features.items():
        if isinstance(n, bool) or not isinstance(n, int) or not 0 < n < 1 << 40:
            raise ValueError(f"{source}: metadata {META_SHAPES}[{key!r}] must be a positive integer, got {n!r}"[:300])
    return in_features


def unpack_file(sd, meta, source):
    """The tensors of a packed file -> (a state dict whose matrices are the format's packed type,
    checked; the weight format)."""
    name = meta.get(META_FORMAT)
    if name not in formats.names():
        raise ValueError(f"{source}: unknown weight format {name!r} in the file's metadata")
    fmt = formats.get(name)
    if fmt.packed_type is None:
        return sd, name
    in_features = read_in_features(meta, source)
    extra = fmt.file_parts[1:]
    out = {}
    for key, t in sd.items():
        if extra and key.endswith(extra):
            continue
        if "." in key and is_matrix(key.rsplit(".", 1)[0]):     # a part of another format (KEY.col in a q5_0 file)
            raise ValueError(f"{source}: a {name} file has an unexpected tensor {key}")
        if is_matrix(key):
            if any(key + suffix not in sd for suffix in extra) or key not in in_features:
                raise ValueError(f"{source}: {name} matrix {key} has no scales or no in_features entry")
            parts = (t, *(sd[key + suffix] for suffix in extra))
            if fmt.from_layout is not None:
                try:
                    parts = fmt.from_layout(parts, meta.get(META_LAYOUT))
                except ValueError as e:
                    raise ValueError(f"{source}: {key}: {e}") from None
            t = fmt.packed_type(*parts, in_features[key]).check(f"{source}: {key}")
        out[key] = t
    return out, name
