"""Convert an RWKV-4 checkpoint between formats and dtypes.

    python -m rwkv_engine.convert SRC DST [--to pth|safetensors|hf] [--dtype float32|float16|bfloat16] [--overwrite]
    python -m rwkv_engine.convert SRC DST.safetensors --weights FORMAT [--overwrite]

SRC is any format `rwkv_engine.load` reads. DST is written atomically (a file, or a directory for
--to hf, replaced as one set): an existing DST is replaced only with --overwrite. A synthetic SRC
stays labelled synthetic in DST's metadata. Typical use: turn a released bf16 .pth into fp32 so that
this engine, BlinkDL's `rwkv` package and transformers can be compared bit for bit on the same weights.
With --weights FORMAT (a weight format of `kernels.formats`: float16, bfloat16, the 8-bit blocks
of ggml's Q8_0, or a registered one), the matrices are packed (`rwkv_engine.weights`) into one safetensors file whose
metadata records the format; `rwkv_engine.load(DST)` maps it back without converting anything.
"""
import argparse
import sys
from pathlib import Path

from kernels import formats

from . import weights as wformat
from .checkpoint import read_checkpoint, read_metadata, save_pth, save_safetensors, write_hf, SYNTHETIC
from .checkpoint import weight_format as format_of_file
from .files import CheckpointError, WriteError, atomic_write, check_output_path
from .model import as_dtype

FORMATS = ("pth", "safetensors", "hf")
DTYPE_CHOICES = ("float32", "float16", "bfloat16")
SUFFIX_FORMATS = {".pth": "pth", ".safetensors": "safetensors"}


def target_format(dst, to=None):
    """--to, else from DST's suffix (.pth, .safetensors; anything else is a HF directory)."""
    return to or SUFFIX_FORMATS.get(Path(dst).suffix, "hf")


def convert(src, dst, to="pth", dtype="float32", overwrite=False, weights=None):
    """Read SRC, cast to `dtype` (or pack the matrices into `weights`), write DST in format `to`;
    returns DST. The output path is checked before SRC is read, so a bad DST fails at once and
    nothing partial is left."""
    if to not in FORMATS:
        raise ValueError(f"unknown target format {to!r}: use pth, safetensors or hf")
    if weights is not None:
        return convert_packed(src, dst, to, weights, overwrite)
    dt = as_dtype(dtype)
    dst = check_output_path(dst, "dir" if to == "hf" else "file", overwrite)
    metadata = SYNTHETIC if read_metadata(src).get("synthetic") == "true" else {}
    sd, cfg = read_checkpoint(src)
    sd = {k: v.to(dt).contiguous() for k, v in sd.items()}
    if to == "hf":
        return write_hf(sd, cfg, dst, overwrite=overwrite, metadata=metadata)
    save = save_safetensors if to == "safetensors" else save_pth
    need = sum(t.numel() * t.element_size() for t in sd.values())
    return atomic_write(dst, lambda p: save(sd, p, metadata), overwrite=overwrite, need=need)


def convert_packed(src, dst, to, weight_format, overwrite=False):
    """SRC -> one safetensors file with its matrices in `weight_format` (progress bar on stderr)."""
    formats.get(weight_format)
    if to != "safetensors":
        raise ValueError(f"--weights writes a .safetensors file, not {to!r}")
    dst = check_output_path(dst, "file", overwrite)
    if format_of_file(src) is not None:
        raise ValueError(f"{src}: already a packed ({format_of_file(src)}) checkpoint; convert the original")
    metadata = SYNTHETIC if read_metadata(src).get("synthetic") == "true" else {}
    sd, _ = read_checkpoint(src)
    from tqdm import tqdm
    bar = lambda keys: tqdm(keys, desc="packing", unit="tensor", file=sys.stderr, disable=None)
    return wformat.save_packed(sd, weight_format, dst, metadata, bar, overwrite)


def parser():
    ap = argparse.ArgumentParser(prog="python -m rwkv_engine.convert", description=__doc__.splitlines()[0])
    ap.add_argument("src", metavar="SRC", help="checkpoint to read: BlinkDL .pth, .safetensors, or a Hugging Face "
                                               "RwkvForCausalLM directory")
    ap.add_argument("dst", metavar="DST", help="output: a .pth or .safetensors file, or a directory for --to hf")
    ap.add_argument("--to", default=None, choices=FORMATS,
                    help="output format (default: from DST's suffix: .pth, .safetensors; otherwise a HF directory)")
    ap.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES, help="dtype of the written weights (default float32)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing DST (a directory is replaced whole)")
    ap.add_argument("--weights", default=None, choices=formats.names(), metavar="FORMAT",
                    help=f"pack the matrices into this weight format: {', '.join(formats.names())} "
                         "(one .safetensors file; see rwkv_engine.weights)")
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        out = convert(args.src, args.dst, target_format(args.dst, args.to), args.dtype, args.overwrite, args.weights)
    except (CheckpointError, WriteError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
