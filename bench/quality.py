"""How much each weight format changes the model's output, against float32 on the same checkpoint.

    python -m bench.quality --model rwkv-4-pile-169m                       # synthetic weights
    python -m bench.quality --model rwkv-4-pile-169m --outliers            # synthetic + outlier rows/columns
    python -m bench.quality --model rwkv-4-pile-169m --checkpoint RWKV-4-Pile-169M.pth --text book.txt
    python -m bench.quality ... --json quality.json

For each format: the prompt (PROMPT tokens of the text, or of a built-in paragraph) in sequence mode,
then a greedy continuation (float32's greedy tokens, fed to every format, so positions line up) in
token mode. Per format, over all those positions: max |logit - fp32 logit| / std(fp32 logits),
mean KL(fp32 || format) in nats per token, top-1 agreement with float32 and, with --text, perplexity
of the text. Synthetic logits are nearly flat, so top-1 flips mean little there; KL and the relative
error are the figures that matter.

The formats are the registered weight formats (`rwkv_kernels.formats`, all but float32), each as the
engine runs it (e.g. the 8-bit blocks with float16 scales and activations quantised per block in the
decode kernels; the 5- and 4-bit blocks; "+cols": with per-input-channel scales, the outlier treatment).
Rows marked "sim" are not engine formats: float32 runs with matrices rounded through another scheme
(8 bits with one scale per row; 4 bits in blocks of 32) to compare schemes on equal terms.

--outliers writes (once, into the cache) the synthetic checkpoint with what trained models have and
random weights lack: a few channels (--outlier-channels, default 4) with activations S times the
others (--outlier-strength S, default 16) entering every matrix, outlier rows and columns S/2 times
the others, and heavy-tailed weights, injected so that the float32 model computes nearly the same
function (see `outlier_state_dict`). That is where a quantisation scheme breaks. It measures the
plain synthetic checkpoint too and prints one table: per format, both checkpoints' figures and the
ratio of the mean KLs (outliers / plain).
"""
import sys
from pathlib import Path

import torch

import rwkv_engine
from bench.cli import OneLineParser, check_writable_file, command, write_json_atomic
from rwkv_kernels import formats as weight_formats
from rwkv_engine.checkpoint import SYNTHETIC, CheckpointError, cache_dir, read_checkpoint, save_pth, synthetic_state_dict
from rwkv_engine.files import atomic_write, regular_file
from rwkv_engine.config import get_config
from rwkv_engine.model import RWKV
from rwkv_engine.weights import is_matrix

FORMATS = tuple(f.name for f in weight_formats.all_formats() if f.name != weight_formats.FLOAT32.name)
OUTLIER_STRENGTH, OUTLIER_CHANNELS = 16.0, 4
SIMULATED = ("8bit-row", "4bit-block")
TEXT = ("The RWKV language model is a recurrent neural network that can be trained like a transformer. "
        "It keeps a fixed-size state per layer instead of a growing cache of keys and values, so the "
        "memory it needs does not depend on how long the conversation has been. Each layer mixes the "
        "current token with the previous one, then applies a time-decaying weighted average over the "
        "past, followed by a channel-mixing feed-forward block. ")


# ---------------------------------------------------------------------------------------------
# checkpoints

def outlier_state_dict(cfg, seed=0, n_channels=OUTLIER_CHANNELS, tails=True, strength=OUTLIER_STRENGTH):
    """The synthetic checkpoint with outliers that (almost) leave the float32 model's function
    unchanged, so that the figures measure what outliers do to a quantiser's scales, not a different
    model (SmoothQuant's equivalence, used in reverse); S = strength, n_channels of each kind:
      * activation outliers: LayerNorm gain and bias xS on a few channels, the columns of the matrices
        that read them (time-mix is linear) /S;
      * outlier rows: att.value rows xS/2 with the matching att.output columns /(S/2) (WKV is linear
        in v); ffn.key rows x2 with ffn.value columns /4 (relu^2 is 2-homogeneous);
      * outlier columns: ffn.value columns xS/2 with ffn.key rows / sqrt(S/2);
      * heavy tails: 1 in 10^4 weights of every matrix x10 (these do change the function, a little).
    """
    half = strength / 2
    sd = synthetic_state_dict(cfg, seed)
    g = torch.Generator().manual_seed(seed + 1)
    pick = lambda n: torch.randperm(n, generator=g)[:n_channels]
    for i in range(cfg.n_layer):
        b = f"blocks.{i}."
        m = lambda name: sd[b + name]
        for ln, readers in (("ln1", ("att.key", "att.value", "att.receptance")), ("ln2", ("ffn.key", "ffn.receptance"))):
            c = pick(cfg.n_embd)
            m(ln + ".weight")[c] *= strength
            m(ln + ".bias")[c] *= strength
            for name in readers:
                m(name + ".weight")[:, c] /= strength
        c = pick(cfg.n_embd)
        m("att.value.weight")[c] *= half
        m("att.output.weight")[:, c] /= half
        f = pick(cfg.ffn_dim)
        m("ffn.key.weight")[f] *= 2
        m("ffn.value.weight")[:, f] /= 4
        f = pick(cfg.ffn_dim)
        m("ffn.value.weight")[:, f] *= half
        m("ffn.key.weight")[f] /= half ** 0.5
    for key, t in sd.items():
        if is_matrix(key) and tails:
            t[torch.rand(t.shape, generator=g) < 1e-4] *= 10
    return sd


def read_text(path):
    """--text: a regular file (a FIFO would block) holding text -> str; ValueError (one line) if not."""
    try:
        regular_file(path)
        text = Path(path).read_text()
    except CheckpointError as e:
        raise ValueError(f"--text {e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"--text {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ValueError(f"--text {path}: cannot read ({e.strerror})") from None
    if not text.strip():
        raise ValueError(f"--text {path}: the file is empty (nothing to measure perplexity on)")
    return text


def checkpoint_path(model, checkpoint, outliers, seed=0, strength=OUTLIER_STRENGTH, channels=OUTLIER_CHANNELS):
    if checkpoint:
        return Path(checkpoint)
    if not outliers:
        from rwkv_engine.checkpoint import synthetic_notice
        if synthetic_notice(model, seed=seed):
            print(synthetic_notice(model, seed=seed), file=sys.stderr, flush=True)
        return rwkv_engine.write_synthetic(model, seed=seed)
    tag = "" if (strength, channels) == (OUTLIER_STRENGTH, OUTLIER_CHANNELS) else f"-s{strength:g}-c{channels}"
    path = cache_dir() / "synthetic" / f"{get_config(model).name}-fp32-seed{seed}-outliers2{tag}.pth"
    if not path.exists():
        sd = outlier_state_dict(get_config(model), seed, channels, strength=strength)
        atomic_write(path, lambda p: save_pth(sd, p, SYNTHETIC))
    return path


def simulated_model(path, scheme):
    """float32 model whose matrices went through `scheme` and back (weights-only error)."""
    sd, cfg = read_checkpoint(path)
    rounded = {}
    for key, t in sd.items():
        rounded[key] = round_trip(t.float(), scheme) if is_matrix(key) else t
    return RWKV(cfg, rounded, source=str(path))


def round_trip(w, scheme):
    if scheme == SIMULATED[0]:
        scale = (w.abs().amax(1, keepdim=True) / 127).clamp(min=1e-12)
        return torch.round(w / scale).clamp(-127, 127) * scale
    if scheme == SIMULATED[1]:
        O, I = w.shape
        blocks = torch.nn.functional.pad(w, (0, -I % 32)).view(O, -1, 32)
        scale = (blocks.abs().amax(-1, keepdim=True) / 7).clamp(min=1e-12)
        return (torch.round(blocks / scale).clamp(-7, 7) * scale).view(O, -1)[:, :I]
    raise ValueError(f"unknown scheme {scheme!r}")


# ---------------------------------------------------------------------------------------------
# measuring

def run(model, prompt, continuation):
    """All logits [T, V]: the prompt in sequence mode, then the continuation one token at a time."""
    state = model.new_state(1)
    logits, _ = model.forward(prompt[None], state, all_logits=True)
    steps = [logits[0]]
    for tok in continuation[:-1]:
        out, _ = model.forward(torch.tensor([[tok]]), state)
        steps.append(out)
    return torch.cat(steps)


def compare(ref, logits, targets):
    lp, lq = torch.log_softmax(ref.double(), -1), torch.log_softmax(logits.double(), -1)
    out = {"max_rel_diff": float((logits - ref).abs().max() / ref.std()),
           "mean_kl": float((lp.exp() * (lp - lq)).sum(-1).mean()),
           "top1_agreement": float((ref.argmax(-1) == logits.argmax(-1)).float().mean())}
    if targets is not None:
        nll = -lq[:len(targets)].gather(1, targets[:, None]).mean()
        out["perplexity"] = float(torch.exp(nll))
    return out


def measure(path, prompt_len, new_tokens, text, formats, simulate=True):
    ref_model = rwkv_engine.load(str(path))
    tok = rwkv_engine.tokenizer()
    ids = torch.tensor(tok.encode(text if text else TEXT * (1 + prompt_len // 60)))
    ids = ids % ref_model.vocab_size                 # a test checkpoint with a small vocabulary
    if text and len(ids) < 2:
        raise ValueError(f"--text: {len(ids)} token, needs at least 2 (a prompt and a target)")
    prompt = ids[:prompt_len] if not text else ids[:-1]
    state = ref_model.new_state(1)
    logits, _ = ref_model.forward(prompt[None], state)
    greedy = [int(logits.argmax())]
    for _ in range(new_tokens - 1):
        logits, _ = ref_model.forward(torch.tensor([[greedy[-1]]]), state)
        greedy.append(int(logits.argmax()))
    continuation = torch.tensor(greedy)
    targets = ids[1:] if text else None              # next-token targets over the text (prompt part)
    ref = run(ref_model, prompt, continuation)
    del ref_model
    rows = {"float32": compare(ref, ref, targets)}
    for fmt in formats:
        rows[fmt] = compare(ref, run(rwkv_engine.load(str(path), weights=fmt), prompt, continuation), targets)
    for scheme in (SIMULATED if simulate else ()):
        rows[scheme + " (sim)"] = compare(ref, run(simulated_model(path, scheme), prompt, continuation), targets)
    return {"checkpoint": str(path), "prompt_tokens": len(prompt), "new_tokens": new_tokens, "formats": rows}


def table(result):
    lines = [f"{result['checkpoint']}: {result['prompt_tokens']} prompt + {result['new_tokens']} greedy tokens",
             f"{'format':<18}{'max|dlogit|/std':>16}{'mean KL (nats)':>16}{'top-1 agree':>13}{'ppl':>10}"]
    for fmt, r in result["formats"].items():
        ppl = f"{r['perplexity']:.3f}" if "perplexity" in r else "-"
        lines.append(f"{fmt:<18}{r['max_rel_diff']:>16.2e}{r['mean_kl']:>16.2e}{r['top1_agreement']:>13.3f}{ppl:>10}")
    return "\n".join(lines)


def outlier_table(plain, outliers, strength, channels):
    """One table: per format, mean KL, max |dlogit| / std and top-1 agreement on the plain and on the
    outlier checkpoint, and the ratio of the mean KLs."""
    lines = [f"synthetic weights, {outliers['prompt_tokens']} prompt + {outliers['new_tokens']} greedy tokens; "
             f"outliers: {channels} channels {strength:g}x, rows and columns {strength / 2:g}x, in every layer",
             f"{'':<14}{'---------- plain ----------':>33}{'--------- outliers ---------':>33}",
             f"{'format':<14}{'mean KL':>11}{'max|dl|/std':>12}{'top-1':>8}   {'mean KL':>11}{'max|dl|/std':>12}"
             f"{'top-1':>8}{'KL ratio':>10}"]
    for fmt, o in outliers["formats"].items():
        p = plain["formats"].get(fmt)
        if p is None:
            continue
        ratio = f"{o['mean_kl'] / p['mean_kl']:.2f}" if p["mean_kl"] > 0 else "-"
        lines.append(f"{fmt:<14}{p['mean_kl']:>11.2e}{p['max_rel_diff']:>12.2e}{p['top1_agreement']:>8.3f}   "
                     f"{o['mean_kl']:>11.2e}{o['max_rel_diff']:>12.2e}{o['top1_agreement']:>8.3f}{ratio:>10}")
    return "\n".join(lines)


@command("bench.quality")
def main(argv=None):
    ap = OneLineParser(prog="bench.quality", description=__doc__)
    ap.add_argument("--model", required=True, help="registered name, e.g. rwkv-4-pile-169m")
    ap.add_argument("--checkpoint", help="real weights (else synthetic weights of the model's shapes)")
    ap.add_argument("--text", help="a text file: the prompt, and perplexity over it")
    ap.add_argument("--outliers", action="store_true", help="synthetic weights with injected outliers (and the plain "
                                                                "ones: one table of both)")
    ap.add_argument("--outlier-strength", type=float, default=OUTLIER_STRENGTH,
                    help=f"with --outliers: activation outliers this many times the others (default {OUTLIER_STRENGTH:g})")
    ap.add_argument("--outlier-channels", type=int, default=OUTLIER_CHANNELS,
                    help=f"with --outliers: outlier channels of each kind per layer (default {OUTLIER_CHANNELS})")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated (default {','.join(FORMATS)})")
    ap.add_argument("--no-sim", action="store_true", help="skip the simulated schemes")
    ap.add_argument("--json", help="write the results here too (checked before any work, written atomically)")
    args = ap.parse_args(argv)
    formats = [f for f in args.formats.split(",") if f]
    get_config(args.model)
    for f in formats:
        weight_formats.get(f)
    if not (args.outlier_strength >= 1 and args.outlier_channels >= 1):
        raise ValueError("--outlier-strength must be >= 1 and --outlier-channels >= 1")
    if args.checkpoint and args.outliers:
        raise ValueError("--outliers applies to synthetic weights, not to --checkpoint")
    if args.prompt_tokens < 1 or args.new_tokens < 1:
        raise ValueError("--prompt-tokens and --new-tokens must be positive")
    if args.json:
        check_writable_file(args.json, "--json")
    text = read_text(args.text) if args.text else None
    path = checkpoint_path(args.model, args.checkpoint, args.outliers, strength=args.outlier_strength,
                           channels=args.outlier_channels)
    result = measure(path, args.prompt_tokens, args.new_tokens, text, formats, not args.no_sim)
    result.update(model=args.model, outliers=args.outliers, synthetic=not args.checkpoint)
    if args.outliers:
        plain = measure(checkpoint_path(args.model, None, False), args.prompt_tokens, args.new_tokens, text,
                        formats, not args.no_sim)
        result.update(plain=plain, outlier_strength=args.outlier_strength, outlier_channels=args.outlier_channels)
        print(outlier_table(plain, result, args.outlier_strength, args.outlier_channels))
    else:
        print(table(result))
    if args.json:
        write_json_atomic(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
