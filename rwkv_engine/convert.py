"""Convert an RWKV-4 checkpoint between formats and dtypes.

    python -m rwkv_engine.convert IN OUT [--to pth|safetensors|hf] [--dtype float32|float16|bfloat16]
    python -m rwkv_engine.convert IN OUT.safetensors --weights int8|float16|bfloat16

IN is any format `rwkv_engine.load` reads. OUT is written atomically (a file, or a directory for
--to hf). Typical use: turn a released bf16 .pth into fp32 so that this engine, BlinkDL's `rwkv`
package and transformers can be compared bit for bit on the same weights. With --weights, the
matrices are packed (rwkv_engine.weights) into one safetensors file whose metadata records the format
(and whether the source was synthetic); `rwkv_engine.load` maps it back without converting.
"""
import argparse
import sys
from pathlib import Path

import torch

from . import weights as wformat
from .checkpoint import CheckpointError, _atomic_save, is_synthetic, read_checkpoint, weight_format, write_hf
from .model import as_dtype


def convert(src, dst, to="pth", dtype="float32", weights=None):
    if weight_format(src) is not None:
        raise ValueError(f"{src}: already a packed ({weight_format(src)}) checkpoint; convert the original")
    sd, cfg = read_checkpoint(src)
    if weights is not None:
        if to != "safetensors":
            raise ValueError(f"--weights writes a .safetensors file, not {to!r}")
        import sys
        from tqdm import tqdm
        bar = lambda keys: tqdm(keys, desc="packing", unit="tensor", file=sys.stderr, disable=None)
        return wformat.save_packed(sd, wformat.quant.check_format(weights), dst, is_synthetic(src), bar)
    dt = as_dtype(dtype)
    sd = {k: v.to(dt).contiguous() for k, v in sd.items()}
    dst = Path(dst)
    synthetic = is_synthetic(src)
    if to == "hf":
        return write_hf(sd, cfg, dst, synthetic)
    if to == "safetensors":
        from safetensors.torch import save_file
        meta = {"format": "pt", "synthetic": str(synthetic).lower()}
        return _atomic_save(lambda p: save_file(sd, str(p), metadata=meta), dst)
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
    ap.add_argument("--weights", default=None, help="pack the matrices: int8, float16, bfloat16 (safetensors)")
    args = ap.parse_args(argv)
    to = args.to or {".pth": "pth", ".safetensors": "safetensors"}.get(Path(args.dst).suffix, "hf")
    try:
        out = convert(args.src, args.dst, to, args.dtype, args.weights)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
