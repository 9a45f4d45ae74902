"""The same checkpoint through our engine and through the reference implementations.

    python -m bench.peers --model rwkv-4-pile-169m --tokens 128
    python -m bench.peers --model pythia-160m --device cuda

RWKV: ours vs BlinkDL's `rwkv` package (`RWKV(model=path, strategy="cpu fp32")`, RWKV_JIT_ON=1,
RWKV_CUDA_ON=0; "cuda fp16" on a GPU, its usual strategy) vs transformers' `RwkvForCausalLM` loaded
from a Hugging Face conversion of the same checkpoint (rescale_every=0).
Pythia / OPT / GPT-Neo / Bloom: ours (KV cache) vs `AutoModelForCausalLM.from_pretrained(dir)` with
`generate(use_cache=True)`.
Same prompt ids, token count, sampling (multinomial, temperature 1) and thread count for all; each
run is a fresh process; the memory meter is reset after load + warm-up as in bench.generate.
BlinkDL's model runs through our generation loop behind a small adapter; transformers runs its own
`generate`, timed per token with a streamer (bench.runners). Peers that are not installed are skipped
with a message. --weights applies to ours only (the peers run their usual fp32 / fp16).
The table gives tokens/s and ours / peer (above 1: ours is faster).
"""
import importlib.util
import sys
from pathlib import Path

from bench import DRAGON_PROMPT, models
from bench.cli import OneLineParser, check_writable_file, fail, first_line, fmt_bytes, positive_int, write_json_atomic
from bench.generate import add_run_arguments
from bench.runner import run_child

RWKV_PEERS = ("ours", "blinkdl", "transformers")
BASELINE_PEERS = ("ours", "transformers")
PACKAGES = {"blinkdl": "rwkv", "transformers": "transformers"}


# ---------------------------------------------------------------------------------------------
# Preparing one checkpoint in every format the peers read

def _rwkv_cache():
    from rwkv_engine.checkpoint import cache_dir
    return cache_dir() / "peers"


def prepare(name, checkpoint=None):
    """-> {'checkpoint': what ours loads, 'pth': BlinkDL .pth (RWKV), 'hf_dir': transformers dir,
    'source': the source path or "synthetic"}."""
    key = models.canonical(name)
    given = checkpoint or (key if Path(key).exists() else None)      # --checkpoint, or --model PATH
    if models.family_of(name) != models.RWKV:
        if given is None:
            from baselines import write_synthetic
            return {"checkpoint": None, "hf_dir": str(write_synthetic(key)), "source": "synthetic"}
        return {"checkpoint": checkpoint, "hf_dir": str(given), "source": str(given)}
    from rwkv_engine.checkpoint import read_checkpoint, save_pth, write_hf, write_synthetic
    from rwkv_engine.files import atomic_write
    src = Path(given) if given else write_synthetic(key)
    tag = f"{src.stem}-{src.stat().st_size if src.is_file() else 'dir'}"
    pth = src if src.suffix == ".pth" else _rwkv_cache() / f"{tag}.pth"
    hf_dir = src if src.is_dir() else _rwkv_cache() / f"{tag}-hf"
    if not pth.exists() or not (hf_dir / "config.json").exists():
        sd, cfg = read_checkpoint(src)
        if not pth.exists():
            atomic_write(pth, lambda tmp: save_pth(sd, tmp))
        if not (hf_dir / "config.json").exists():
            write_hf(sd, cfg, hf_dir, overwrite=True)
    return {"checkpoint": str(checkpoint) if checkpoint else None, "pth": str(pth), "hf_dir": str(hf_dir),
            "source": str(given) if given else "synthetic"}


def peers_prompt_ids(name, prompt):
    """The 20B tokenizer's ids of the prompt, clipped to the model's vocabulary: one id list for all."""
    from rwkv_engine import tokenizer
    V = models.config(name).vocab_size
    return [min(i, V - 1) for i in tokenizer().encode(prompt)]


# ---------------------------------------------------------------------------------------------
# Parent side

def peer_available(peer):
    if peer == "ours":
        return True, ""
    pkg = PACKAGES[peer]
    if importlib.util.find_spec(pkg) is None:
        return False, f"{peer}: package '{pkg}' is not installed (pip install {pkg}); skipped"
    return True, ""


def table(results):
    ours = next((r for r in results if r["peer"] == "ours" and r["status"] == "ok"), None)
    head = f"{'implementation':<14} {'weights':<8} {'total s':>8} {'tokens/s':>9} {'decode tok/s':>12} " \
           f"{'peak excl. params':>17} {'ours / peer':>11} {'others CPU':>10}"
    lines = [head, "-" * len(head)]
    for r in results:
        if r["status"] != "ok":
            lines.append(f"{r['peer']:<14} {r['status']}: {r.get('error', '')}")
            continue
        ratio = ours["tokens_per_s"] / r["tokens_per_s"] if ours else float("nan")
        dec = f"{r['decode_tokens_per_s']:.2f}" if r.get("decode_tokens_per_s") else "-"
        busy = f"{r['others_cpu_pct']:.0f}%" if r.get("others_cpu_pct") is not None else "-"
        fmt = r["weight_format"] if r["peer"] == "ours" else r["dtype"]
        lines.append(f"{r['peer']:<14} {fmt:<8} {r['total_s']:>8.2f} {r['tokens_per_s']:>9.2f} {dec:>12} "
                     f"{fmt_bytes(r['peak_bytes']):>17} {ratio:>11.2f} {busy:>10}")
    return "\n".join(lines)


def parse(argv):
    p = OneLineParser(prog="python -m bench.peers", description=__doc__)
    p.add_argument("--model", default="rwkv-4-pile-169m")
    p.add_argument("--checkpoint", help="real weights: BlinkDL .pth / HF dir for RWKV, HF dir for the others")
    add_run_arguments(p)
    p.add_argument("--tokens", type=positive_int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peers", help="comma-separated subset of ours,blinkdl,transformers")
    p.add_argument("--json", help="write all results here (atomically, at the end)")
    return p.parse_args(argv)


def validate(args, prog):
    """-> the model's family; exits with one line on a bad argument."""
    try:
        family = models.family_of(args.model)
        if args.json:
            check_writable_file(args.json, "--json")
    except ValueError as e:
        fail(prog, str(e))
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            fail(prog, "--device cuda but no CUDA GPU is available")
    if args.checkpoint and not Path(args.checkpoint).exists():
        fail(prog, f"--checkpoint {args.checkpoint}: no such file or directory")
    return family


def run_peers(peers, base, timeout):
    results = []
    for peer in peers:
        ok, why = peer_available(peer)
        if not ok:
            print(why, file=sys.stderr)
            continue
        r = run_child(dict(base, peer=peer), timeout)
        r.setdefault("peer", peer)
        print(f"{peer}: {r['status']}" + (f" ({r['total_s']:.2f} s)" if r["status"] == "ok" else f": {r['error']}"),
              file=sys.stderr)
        results.append(r)
    return results


def main(argv=None):
    prog = "bench.peers"
    args = parse(argv)
    family = validate(args, prog)
    from rwkv_engine.process import usable_cores
    threads = args.threads or usable_cores()
    peers = RWKV_PEERS if family == models.RWKV else BASELINE_PEERS
    if args.peers:
        peers = [x for x in peers if x in args.peers.split(",")]
    try:
        paths = prepare(args.model, args.checkpoint)
    except Exception as e:                                   # noqa: BLE001 - one line, whatever it was
        fail(prog, f"{args.model}: {first_line(e)}")
    ids = peers_prompt_ids(args.model, DRAGON_PROMPT)
    base = dict(model=args.model, device=args.device, dtype=args.dtype, weights=args.weights, tokens=args.tokens,
                threads=threads, seed=args.seed, prompt_ids=ids, **paths)
    results = run_peers(peers, base, args.timeout)
    print(f"{args.model} on {args.device}, {threads} threads, {len(ids)} prompt tokens + {args.tokens} generated, "
          f"weights: {paths['source']}")
    print(table(results))
    if args.json:
        write_json_atomic(args.json, {"schema": "bench.peers/1", "args": vars(args), "results": results})


if __name__ == "__main__":
    main()
