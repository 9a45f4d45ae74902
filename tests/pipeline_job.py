"""One rank of a pipeline test: launched once per rank by tests/test_pipeline.py (not collected).

    python tests/pipeline_job.py SCENARIO CHECKPOINT OUT_DIR KWARGS_JSON     (env: RANK, WORLD_SIZE, ...)

Every rank writes OUT_DIR/rank{r}.json: the layers it holds and the checkpoint keys it was given
and read; rank 0 also writes OUT_DIR/results.pt with the scenario's outputs.
"""
import json
import os
import sys
import time
from pathlib import Path

import torch

import rwkv_engine.model as model_module
from rwkv_engine import SamplingParams, pipeline

PENALISED = SamplingParams(temperature=1.0, repetition_penalty=1.5, presence_penalty=0.4)
PROMPTS = torch.tensor([[5, 17, 3, 99, 42, 7, 250, 11], [8, 1, 300, 2, 64, 33, 12, 9], [400, 6, 7, 8, 9, 10, 11, 12]])


def record_keys(seen):
    """Wrap to_inference_form to record which checkpoint keys a rank is given and reads."""
    original = model_module.to_inference_form

    class Logged(dict):
        def __getitem__(self, key):
            seen["read"].add(key)
            return super().__getitem__(key)

    def wrapped(sd, *args, **kwargs):
        seen["given"] = sorted(sd)
        return original(Logged(sd), *args, **kwargs)
    model_module.to_inference_form = wrapped


def parity(model):
    """Token mode, sequence mode (last and all logits), chunks carried, generation."""
    out = {}
    state = model.new_state(3)
    out["seq_last"], _ = model.forward(PROMPTS, state)
    out["token_steps"] = [model.forward(torch.tensor([[t], [t + 1], [t + 2]]), state)[0] for t in (4, 70, 123)]
    out["all_logits"], _ = model.forward(PROMPTS, model.new_state(3), all_logits=True)
    fork = state.clone()
    out["after_clone"] = [model.forward(torch.tensor([[5], [6], [7]]), s)[0] for s in (state, fork)]
    # the server's moves: pick streams, stack states, then step the stacked batch
    picked = fork.select([2, 0])
    stacked = type(picked).cat([picked, model.new_state(1), fork.select(1)])
    out["select_cat"] = model.forward(torch.tensor([[9], [10], [11], [12]]), stacked)[0]
    out["select_cat_bytes"] = stacked.nbytes
    out["gen_seeded"] = model.generate(PROMPTS[:2], 6, temperature=1.0, seed=123).tokens
    out["gen_greedy"] = model.generate(PROMPTS[0], 6, temperature=0).tokens
    out["interleaved_seeded"] = pipeline.decode_interleaved(
        model, PROMPTS, 6, sampling=SamplingParams(temperature=1.0), seed=123)["tokens"]
    out["interleaved_penalised"] = pipeline.decode_interleaved(model, PROMPTS, 6, sampling=PENALISED, seed=5)["tokens"]
    return out


def main():
    scenario, ckpt, out_dir, kwargs = sys.argv[1], sys.argv[2], Path(sys.argv[3]), json.loads(sys.argv[4])
    rank = int(os.environ["RANK"])
    seen = {"given": [], "read": set()}
    record_keys(seen)
    if scenario == "signal" and rank == 0:
        pipeline.stop_on_signals()
    model = pipeline.load(ckpt, exit_workers=scenario not in ("parity", "idle"), **kwargs)
    stage = model.stage.model
    (out_dir / f"rank{rank}.json").write_text(json.dumps(
        {"layers": [stage.layers.start, stage.layers.stop], "given": seen["given"], "read": sorted(seen["read"]),
         "emb": stage.emb is not None, "head": stage.head is not None}))
    if rank != 0:
        return
    if scenario == "parity":
        torch.save(parity(model), out_dir / "results.pt")
    elif scenario == "idle":                     # idle longer than the timeout: the workers stay
        first, _ = model.forward(PROMPTS)
        time.sleep(2.5 * kwargs["timeout_s"])
        again, _ = model.forward(PROMPTS)
        torch.save({"first": first, "again": again}, out_dir / "results.pt")
    elif scenario == "signal":                   # generate until SIGTERM/SIGINT, as bench.generate does
        (out_dir / "ready").write_text("1")
        try:
            while True:
                model.generate(PROMPTS, 4, temperature=1.0, seed=1)
        except pipeline.Stopped as e:
            (out_dir / "stopped").write_text(str(e))
    elif scenario.startswith("kill"):           # kill:RANK or stop:RANK, then keep using the pipeline
        (out_dir / "ready").write_text("1")
        t0 = time.monotonic()
        try:
            while time.monotonic() - t0 < 60:
                model.forward([[1]])
        except pipeline.PipelineError as e:
            print(f"rank 0: error: {e}", file=sys.stderr, flush=True)
            (out_dir / "elapsed").write_text(str(time.monotonic() - t0))
            os._exit(1)
    model.close()


if __name__ == "__main__":
    main()
