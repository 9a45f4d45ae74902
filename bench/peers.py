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
`generate`, timed per token with a streamer. Peers that are not installed are skipped with a message.
The table gives tokens/s and ours / peer (above 1: ours is faster).
"""
import importlib.util
import os
import sys
import time
from pathlib import Path

from bench import DRAGON_PROMPT, models
from bench._run_one import WARMUP_TOKENS, run_child
from bench.generate import OneLineParser, fail, fmt_bytes, write_json_atomic

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
    'weights': the source path or "synthetic"}."""
    key = models.canonical(name)
    given = checkpoint or (key if Path(key).exists() else None)      # --checkpoint, or --model PATH
    if models.family_of(name) != models.RWKV:
        if given is None:
            from baselines import write_synthetic
            return {"checkpoint": None, "hf_dir": str(write_synthetic(key)), "weights": "synthetic"}
        return {"checkpoint": checkpoint, "hf_dir": str(given), "weights": str(given)}
    from rwkv_engine.checkpoint import read_checkpoint, write_hf, write_synthetic
    src = Path(given) if given else write_synthetic(key)
    tag = f"{src.stem}-{src.stat().st_size if src.is_file() else 'dir'}"
    pth = src if src.suffix == ".pth" else _rwkv_cache() / f"{tag}.pth"
    hf_dir = src if src.is_dir() else _rwkv_cache() / f"{tag}-hf"
    if not pth.exists() or not (hf_dir / "config.json").exists():
        import torch
        sd, cfg = read_checkpoint(src)
        if not pth.exists():
            pth.parent.mkdir(parents=True, exist_ok=True)
            torch.save(sd, pth)
        if not (hf_dir / "config.json").exists():
            write_hf(sd, cfg, hf_dir)
    return {"checkpoint": str(checkpoint) if checkpoint else None, "pth": str(pth), "hf_dir": str(hf_dir),
            "weights": str(given) if given else "synthetic"}


def prompt_ids(name, prompt):
    """The 20B tokenizer's ids of the prompt, clipped to the model's vocabulary: one id list for all."""
    from rwkv_engine import tokenizer
    V = models.config(name).vocab_size
    return [min(i, V - 1) for i in tokenizer().encode(prompt)]


# ---------------------------------------------------------------------------------------------
# Child side (called by bench._run_one for spec["peer"] != "ours")

class BlinkDLModel:
    """BlinkDL's rwkv.model.RWKV behind the model contract of our generation loop."""

    def __init__(self, pth, device, vocab_size):
        os.environ.setdefault("RWKV_JIT_ON", "1")
        os.environ["RWKV_CUDA_ON"] = "0"
        import torch
        from rwkv.model import RWKV
        self.model = RWKV(model=str(pth)[:-len(".pth")], strategy="cuda fp16" if device == "cuda" else "cpu fp32",
                          verbose=False)
        self.device, self.vocab_size, self.tokenizer = torch.device(device), vocab_size, None

    def new_state(self, batch_size=1, max_len=None):
        return None

    def forward(self, tokens, state=None, all_logits=False):
        out, state = self.model.forward(tokens[0].tolist(), state)
        return out.float()[None], state


class _Clock:
    """A transformers streamer that only records when each token arrives (prompt first)."""

    def __init__(self, sync):
        self.times, self.sync = [], sync

    def put(self, value):
        self.sync()
        self.times.append(time.perf_counter())

    def end(self):
        pass


def _hf_generate(model, ids, n, seed, streamer=None):
    import torch
    torch.manual_seed(seed)
    return model.generate(ids, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=n,
                          min_new_tokens=n, use_cache=True, streamer=streamer, pad_token_id=0)


def measure_peer(spec):
    """One peer run: load, warm up, reset the meter, generate spec['tokens'] tokens."""
    import torch
    from bench.machine import set_threads
    from bench.memory import PeakMemory
    from rwkv_engine.generation import generate
    from rwkv_engine.sampling import SamplingParams

    set_threads(spec["threads"])
    device, n, seed, peer = spec["device"], spec["tokens"], spec["seed"], spec["peer"]
    ids = torch.tensor([spec["prompt_ids"]], dtype=torch.long, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    if peer == "blinkdl":
        model = BlinkDLModel(spec["pth"], device, models.config(spec["model"]).vocab_size)
        run = lambda k: generate(model, ids, k, sampling=SamplingParams(), seed=seed)
    elif peer == "transformers":
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(spec["hf_dir"], dtype=torch.float32).eval().to(device)
        run = lambda k: _hf_generate(model, ids, k, seed)
    else:
        raise ValueError(f"unknown peer {peer!r}")
    load_s = time.perf_counter() - t0
    with torch.inference_mode():
        run(min(WARMUP_TOKENS, n))
        meter = PeakMemory(device)
        meter.reset()
        if peer == "transformers":
            clock = _Clock(sync)
            start = time.perf_counter()
            _hf_generate(model, ids, n, seed, clock)
            arrivals = [start] + clock.times[1:]            # times[0]: the prompt being echoed
            steps = [b - a for a, b in zip(arrivals, arrivals[1:])]
            prefill_s, step_s = steps[0], steps[1:]
        else:
            res = run(n)
            prefill_s, step_s = res.prefill_s, res.step_s
        mem = meter.read()
    decode_s = sum(step_s)
    return {"model": spec["model"], "peer": peer, "device": device, "threads": spec["threads"],
            "dtype": "float16" if (peer == "blinkdl" and device == "cuda") else "float32",
            "prompt_tokens": ids.shape[1], "new_tokens": n, "load_s": load_s, "prefill_s": prefill_s,
            "decode_s": decode_s, "total_s": prefill_s + decode_s, "tokens_per_s": n / (prefill_s + decode_s),
            "decode_tokens_per_s": len(step_s) / decode_s if decode_s > 0 else None,
            "peak_bytes": mem["peak_bytes"], "mem_method": mem["method"], "step_s": step_s,
            "version": _version(PACKAGES[peer])}


def _version(package):
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(package)
    except PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------
# Parent side

def available(peer):
    if peer == "ours":
        return True, ""
    pkg = PACKAGES[peer]
    if importlib.util.find_spec(pkg) is None:
        return False, f"{peer}: package '{pkg}' is not installed (pip install {pkg}); skipped"
    return True, ""


def table(results):
    ours = next((r for r in results if r["peer"] == "ours" and r["status"] == "ok"), None)
    head = f"{'implementation':<14} {'dtype':<8} {'total s':>8} {'tokens/s':>9} {'decode tok/s':>12} " \
           f"{'peak excl. params':>17} {'ours / peer':>11}"
    lines = [head, "-" * len(head)]
    for r in results:
        if r["status"] != "ok":
            lines.append(f"{r['peer']:<14} {r['status']}: {r.get('error', '')}")
            continue
        ratio = ours["tokens_per_s"] / r["tokens_per_s"] if ours else float("nan")
        dec = f"{r['decode_tokens_per_s']:.2f}" if r.get("decode_tokens_per_s") else "-"
        lines.append(f"{r['peer']:<14} {r['dtype']:<8} {r['total_s']:>8.2f} {r['tokens_per_s']:>9.2f} {dec:>12} "
                     f"{fmt_bytes(r['peak_bytes']):>17} {ratio:>11.2f}")
    return "\n".join(lines)


def main(argv=None):
    prog = "bench.peers"
    p = OneLineParser(prog="python -m bench.peers", description=__doc__)
    p.add_argument("--model", default="rwkv-4-pile-169m")
    p.add_argument("--checkpoint", help="real weights: BlinkDL .pth / HF dir for RWKV, HF dir for the others")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peers", help="comma-separated subset of ours,blinkdl,transformers")
    p.add_argument("--timeout", type=float, default=None)
    p.add_argument("--json", help="write all results here (atomically, at the end)")
    args = p.parse_args(argv)
    try:
        family = models.family_of(args.model)
    except ValueError as e:
        fail(prog, str(e))
    if args.tokens <= 0:
        fail(prog, f"--tokens must be >= 1, got {args.tokens}")
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            fail(prog, "--device cuda but no CUDA GPU is available")
    if args.checkpoint and not Path(args.checkpoint).exists():
        fail(prog, f"--checkpoint {args.checkpoint}: no such file or directory")
    from bench.machine import default_threads
    threads = args.threads or default_threads()
    peers = RWKV_PEERS if family == models.RWKV else BASELINE_PEERS
    if args.peers:
        peers = [x for x in peers if x in args.peers.split(",")]
    try:
        paths = prepare(args.model, args.checkpoint)
    except Exception as e:                                   # noqa: BLE001 - one line, whatever it was
        fail(prog, f"{args.model}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    ids = prompt_ids(args.model, DRAGON_PROMPT)
    base = dict(model=args.model, device=args.device, tokens=args.tokens, threads=threads, seed=args.seed,
                prompt_ids=ids, **paths)
    results = []
    for peer in peers:
        ok, why = available(peer)
        if not ok:
            print(why, file=sys.stderr)
            continue
        r = run_child(dict(base, peer=peer), args.timeout)
        r.setdefault("peer", peer)
        if r["status"] == "ok" and peer == "ours":
            r["dtype"] = "float32"
        print(f"{peer}: {r['status']}" + (f" ({r['total_s']:.2f} s)" if r["status"] == "ok" else f": {r['error']}"),
              file=sys.stderr)
        results.append(r)
    print(f"{args.model} on {args.device}, {threads} threads, {len(ids)} prompt tokens + {args.tokens} generated, "
          f"weights: {paths['weights']}")
    print(table(results))
    if args.json:
        write_json_atomic(args.json, {"schema": "bench.peers/1", "args": vars(args), "results": results})


if __name__ == "__main__":
    main()
