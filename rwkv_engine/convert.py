"""Convert an RWKV-4 checkpoint between formats and dtypes.

    python -m rwkv_engine.convert SRC DST [--to pth|safetensors|hf] [--dtype float32|float16|bfloat16] [--overwrite]
    python -m rwkv_engine.convert SRC DST.safetensors --weights FORMAT [--overwrite]

SRC is any format `rwkv_engine.load` reads, or a registered name (e.g. rwkv-4-pile-169m): its
synthetic checkpoint, written to the cache on first use (the line before says what that writes).
DST is written atomically (a file, or a directory for
--to hf, replaced as one set): an existing DST is replaced only with --overwrite. A synthetic SRC
stays labelled synthetic in DST's metadata, with its model's name. Typical use: turn a released bf16 .pth into fp32 so that
this engine, BlinkDL's `rwkv` package and transformers can be compared bit for bit on the same weights.
With --weights FORMAT (a weight format of `rwkv_kernels.formats`: float16, bfloat16, the 8-bit blocks
of ggml's Q8_0, or a registered one), the matrices are packed (`rwkv_engine.weights`) into one safetensors file whose
metadata records the format; `rwkv_engine.load(DST)` maps it back without converting anything.
--weights and --dtype do not combine (--weights sets how the matrices are stored; the other
tensors keep SRC's dtype).
"""
import argparse
import sys
from pathlib import Path

from rwkv_kernels import formats

from . import weights as wformat
from .checkpoint import (MODEL_KEY, model_name, read_checkpoint, read_metadata, save_pth, save_safetensors,
                         synthetic_for, synthetic_metadata, synthetic_notice, recorded_format, write_hf)
from .cli import run_command
from .config import canonical_name
from .files import atomic_write, probe_output
from .model import as_dtype

FORMATS = ("pth", "safetensors", "hf")
DTYPE_CHOICES = ("float32", "float16", "bfloat16")
SUFFIX_FORMATS = {".pth": "pth", ".safetensors": "safetensors"}


def target_format(dst, to=None):
    """--to, else from DST's suffix (.pth, .safetensors; anything else is a HF directory)."""
    return to or SUFFIX_FORMATS.get(Path(dst).suffix, "hf")


def source(src, weights=None, notice=None):
    """SRC -> (path, registered name or None). A registered name that is not a local path means its
    synthetic checkpoint (the one `rwkv_engine.load(name, weights=weights)` reads), written on
    first use; notice(line) hears beforehand what that writes."""
    if Path(src).exists() or Path(src).is_symlink() or canonical_name(str(src)) is None:
        return Path(src), None
    name = canonical_name(str(src))
    line = synthetic_notice(name, weights)
    if line and notice:
        notice(line)
    return synthetic_for(name, weights), name


def output_metadata(path, name=None):
    """What DST's metadata keeps of SRC's: the synthetic label and the registered model's name."""
    meta = read_metadata(path)
    name = name or model_name(meta)
    if meta.get("synthetic") == "true":
        return synthetic_metadata(name)
    return {MODEL_KEY: name} if name else {}


def convert(src, dst, to="pth", dtype=None, overwrite=False, weights=None, notice=None):
    """Read SRC, cast to `dtype` (default float32) or pack the matrices into `weights` (not both),
    write DST in format `to`; returns DST. The output path is checked before SRC is read (or
    written, for a registered name), so a bad DST fails at once and nothing partial is left."""
    if to not in FORMATS:
        raise ValueError(f"unknown target format {to!r}: use pth, safetensors or hf")
    if weights is not None:
        if dtype is not None:
            raise ValueError(f"--dtype {dtype} and --weights {weights} do not combine: --weights sets how the "
                             f"matrices are stored (the other tensors keep SRC's dtype); drop one")
        return convert_packed(src, dst, to, weights, overwrite, notice)
    dt = as_dtype(dtype or "float32")
    dst = probe_output(dst, "DST", "dir" if to == "hf" else "file", overwrite)
    path, name = source(src, None, notice)
    metadata = output_metadata(path, name)
    sd, cfg = read_checkpoint(path)
    sd = {k: v.to(dt).contiguous() for k, v in sd.items()}
    if to == "hf":
        return write_hf(sd, cfg, dst, overwrite=overwrite, metadata=metadata)
    save = save_safetensors if to == "safetensors" else save_pth
    need = sum(t.numel() * t.element_size() for t in sd.values())
    return atomic_write(dst, lambda p: save(sd, p, metadata), overwrite=overwrite, need=need)


def convert_packed(src, dst, to, weights, overwrite=False, notice=None):
    """SRC -> one safetensors file with its matrices in format `weights` (progress bar on stderr)."""
    formats.get(weights)
    if to != "safetensors":
        raise ValueError(f"--weights writes a .safetensors file, not {to!r}")
    dst = probe_output(dst, "DST", "file", overwrite)
    path, name = source(src, weights, notice)
    if recorded_format(path) is not None:
        raise ValueError(f"{src}: already a packed ({recorded_format(path)}) checkpoint; convert the original")
    metadata = output_metadata(path, name)
    sd, _ = read_checkpoint(path)
    from tqdm import tqdm
    bar = lambda keys: tqdm(keys, desc="packing", unit="tensor", file=sys.stderr, disable=None)
    return wformat.save_packed(sd, weights, dst, metadata, bar, overwrite)


def parser():
    ap = argparse.ArgumentParser(prog="python -m rwkv_engine.convert", description=__doc__.splitlines()[0])
    ap.add_argument("src", metavar="SRC", help="checkpoint to read: BlinkDL .pth, .safetensors, a Hugging Face "
                                               "RwkvForCausalLM directory, or a registered name (its synthetic weights)")
    ap.add_argument("dst", metavar="DST", help="output: a .pth or .safetensors file, or a directory for --to hf")
    ap.add_argument("--to", default=None, choices=FORMATS,
                    help="output format (default: from DST's suffix: .pth, .safetensors; otherwise a HF directory)")
    ap.add_argument("--dtype", default=None, choices=DTYPE_CHOICES,
                    help="dtype of the written weights (default float32; not with --weights)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing DST (a directory is replaced whole)")
    ap.add_argument("--weights", default=None, choices=formats.names(), metavar="FORMAT",
                    help=f"pack the matrices into this weight format: {', '.join(formats.names())} "
                         "(one .safetensors file; see rwkv_engine.weights)")
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    return run_command("rwkv_engine.convert", _convert, args, exit=False)


def _convert(args):
    notice = lambda line: print(line, file=sys.stderr, flush=True)
    out = convert(args.src, args.dst, target_format(args.dst, args.to), args.dtype, args.overwrite, args.weights,
                  notice)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
