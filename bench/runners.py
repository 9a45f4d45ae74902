"""The registry of runners: each implementation that `bench.runner` can measure, behind one shape.

    RUNNERS[name](spec) -> Loaded            name: "ours", "blinkdl", "transformers"
    Loaded.generate(n, on_step=None) -> GenerationTimes (prefill time, per-step times, chosen ids)

"ours" is this project (RWKV engine or a transformer baseline) through the engine's own generation
loop. "blinkdl" is BlinkDL's `rwkv` package (`RWKV(model=path, strategy="cpu fp32")`, RWKV_JIT_ON=1,
RWKV_CUDA_ON=0; "cuda fp16" on a GPU) behind a small adapter, through the same loop.
"transformers" is `AutoModelForCausalLM.from_pretrained(dir)` with its own `generate(use_cache=True)`,
timed per token with a streamer. Every runner samples multinomially at temperature 1, seeded.
"""
import os
import time
from dataclasses import dataclass
from typing import Callable, List

# ---------------------------------------------------------------------------------------------
# Child side: what a runner returns

@dataclass
class GenerationTimes:
    """What generating N tokens produced: timings and the chosen ids of every stream."""
    prefill_s: float                     # prompt forward + first sample
    step_s: List[float]                  # each later step
    token_ids: List[List[int]]           # per stream


@dataclass
class Loaded:
    """A loaded implementation, ready to generate: `generate(n, on_step)` -> GenerationTimes."""
    generate: Callable
    load_s: float
    prompt_tokens: int
    prompt_note: str
    info: dict                           # RunResult fields this runner knows (n_params, dtype, version...)
    model: object = None                 # ours only: for the trace/overhead modes




# ---------------------------------------------------------------------------------------------
# Child side: our engine (RWKV and the transformer baselines)

def prompt_ids(model, prompt):
    """Token ids of the prompt with the model's own tokenizer, else the 20B tokenizer's ids
    clipped to the model's vocabulary (and a note saying so)."""
    if model.tokenizer is not None:
        return model.tokenizer.encode(prompt), "own tokenizer"
    from rwkv_engine import tokenizer
    ids = tokenizer().encode(prompt)
    clipped = sum(i >= model.vocab_size for i in ids)
    note = f"no tokenizer: 20B tokenizer ids, clipped to vocab {model.vocab_size}"
    return [min(i, model.vocab_size - 1) for i in ids], note + (f" ({clipped} clipped)" if clipped else "")


def expected_runtime_bytes(model, batch, total_len):
    """What the state or KV cache alone should take (a sanity check on the measured peak)."""
    if hasattr(model, "kv_cache_bytes"):
        return int(model.kv_cache_bytes(batch, total_len))
    if hasattr(model, "state_bytes"):
        return int(model.state_bytes(batch))
    return None


def paper_sampling():
    from rwkv_engine.sampling import SamplingParams
    return SamplingParams(temperature=1.0, top_k=0, top_p=1.0)        # multinomial, as the paper


def generate_with_loop(model, ids, n, seed, on_step=None):
    """The engine's own generation loop (`rwkv_engine.generation.stream`) -> GenerationTimes."""
    from rwkv_engine.generation import stream
    run = stream(model, ids, n, sampling=paper_sampling(), seed=seed)
    for i, _ in enumerate(run):
        if on_step:
            on_step(i + 1)
    result = run.result
    return GenerationTimes(result.prefill_s, list(result.step_s), [list(t) for t in result.tokens])


def load_ours(spec):
    import torch
    from bench import DRAGON_PROMPT, models
    t0 = time.perf_counter()
    model = models.load(spec["model"], spec["device"], spec["dtype"], spec["checkpoint"], spec["protocol"],
                        weights=spec["weights"])
    load_s = time.perf_counter() - t0
    if spec["prompt_ids"] is not None:
        ids, note = spec["prompt_ids"], "token ids given"
    else:
        ids, note = prompt_ids(model, spec["prompt"] if spec["prompt"] is not None else DRAGON_PROMPT)
    batch = torch.tensor([ids] * spec["batch"], dtype=torch.long)
    family = models.family_of(spec["model"])
    info = {"family": family, "n_params": int(model.n_params), "synthetic": bool(model.synthetic),
            "provenance": "synthetic" if model.synthetic else str(model.source),
            "weights": "synthetic" if model.synthetic else str(model.source),    # provenance's former key
            "source": str(getattr(model, "path", None) or model.source),
            "weight_bytes_per_token": int(model.weight_bytes_per_token),
            "expected_runtime_bytes": expected_runtime_bytes(model, spec["batch"], len(ids) + spec["tokens"]),
            "protocol": spec["protocol"] if family != models.RWKV else "recurrent",
            "version": None, "torch": torch.__version__}
    return Loaded(lambda n, on_step=None: generate_with_loop(model, batch, n, spec["seed"], on_step),
                  load_s, len(ids), note, info, model=model)


# ---------------------------------------------------------------------------------------------
# BlinkDL's rwkv package

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


def _given_ids(spec):
    import torch
    if spec["batch"] != 1:
        raise ValueError(f"peer {spec['peer']!r} runs one stream; --batch {spec['batch']} needs our engine")
    return torch.tensor([spec["prompt_ids"]], dtype=torch.long, device=spec["device"])


def load_blinkdl(spec):
    from bench import models
    ids = _given_ids(spec)
    t0 = time.perf_counter()
    model = BlinkDLModel(spec["pth"], spec["device"], models.config(spec["model"]).vocab_size)
    info = {"dtype": "float16" if spec["device"] == "cuda" else "float32", "version": package_version("rwkv")}
    return Loaded(lambda n, on_step=None: generate_with_loop(model, ids, n, spec["seed"], on_step),
                  time.perf_counter() - t0, ids.shape[1], "token ids given", info)


# ---------------------------------------------------------------------------------------------
# transformers

class _Clock:
    """A transformers streamer that records when each token arrives (the prompt first)."""

    def __init__(self, sync, on_step=None):
        self.times, self.sync, self.on_step = [], sync, on_step

    def put(self, value):
        self.sync()
        self.times.append(time.perf_counter())
        if self.on_step and len(self.times) > 2:
            self.on_step(len(self.times) - 1)

    def end(self):
        pass


def _hf_generate(model, ids, n, seed, on_step=None):
    import torch
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    clock = _Clock(sync, on_step)
    torch.manual_seed(seed)
    start = time.perf_counter()
    out = model.generate(ids, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=n,
                         min_new_tokens=n, use_cache=True, streamer=clock, pad_token_id=0)
    arrivals = [start] + clock.times[1:]                     # times[0]: the prompt being echoed
    steps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    return GenerationTimes(steps[0], steps[1:], out[:, ids.shape[1]:].tolist())


def load_transformers(spec):
    import torch
    from transformers import AutoModelForCausalLM
    ids = _given_ids(spec)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["hf_dir"], dtype=torch.float32).eval().to(spec["device"])
    info = {"dtype": "float32", "version": package_version("transformers")}
    return Loaded(lambda n, on_step=None: _hf_generate(model, ids, n, spec["seed"], on_step),
                  time.perf_counter() - t0, ids.shape[1], "token ids given", info)


def package_version(package):
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(package)
    except PackageNotFoundError:
        return None


RUNNERS = {"ours": load_ours, "blinkdl": load_blinkdl, "transformers": load_transformers}
