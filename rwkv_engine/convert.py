"""Convert an RWKV-4 checkpoint between formats and dtypes.

    python -m rwkv_engine.convert IN OUT [--to pth|safetensors|hf] [--dtype float32|float16|bfloat16]

IN is any format `rwkv_engine.load` reads. OUT is written atomically (a file, or a directory for
--to hf). Typical use: turn a released bf16 .pth into fp32 so that this engine, BlinkDL's `rwkv`
package and transformers can be compared bit for bit on the same weights.
"""
import argparse
import sys
from pathlib import Path

import torch

from .checkpoint import CheckpointError, _atomic_save, read_checkpoint, write_hf
from .model import as_dtype


def convert(src, dst, to="pth", dtype="float32"):
    sd, cfg = read_checkpoint(src)
    dt = as_dtype(dtype)
    sd = {k: v.to(dt).contiguous() for k, v in sd.items()}
    dst = Path(dst)
    if to == "hf":
        return write_hf(sd, cfg, dst)
    if to == "safetensors":
        from safetensors.torch import save_file
        return _atomic_save(lambda p: save_file(sd, str(p)), dst)
    if to == "pth":
        return _atomic_save(lambda p: torch.save(sd, p), dst)
    raise ValueError(f"unknown target format {to!r}: use pth, safetensors or hf")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--to", default=None, choices=["pth", "safetensors", "hf"],
                    help="default: from OUT's suffix (.pth, .safetensors; otherwise a HF directory)")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args(argv)
    to = args.to or {".pth": "pth", ".safetensors": "safetensors"}.get(Path(args.dst).suffix, "hf")
    try:
        out = convert(args.src, args.dst, to, args.dtype)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
