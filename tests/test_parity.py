"""This engine against the official implementations on the same fp32 checkpoints:
BlinkDL's `rwkv` package (strategy 'cpu fp32', JIT on, CUDA kernel off) and transformers'
RwkvForCausalLM (rescale_every=0). Prompt logits and 64 greedy steps, max |diff| <= 1e-4."""
import pytest
import torch

import rwkv_engine
from rwkv_engine.checkpoint import read_checkpoint, write_hf, write_synthetic

TOL = 1e-4
PROMPT_LEN, STEPS = 64, 64


def official_rwkv(path):
    from rwkv.model import RWKV as Official          # test-only reference
    return Official(model=str(path)[:-len(".pth")], strategy="cpu fp32", verbose=False)


def official_hf(path, out_dir):
    from transformers import RwkvForCausalLM         # test-only reference
    sd, cfg = read_checkpoint(path)
    return RwkvForCausalLM.from_pretrained(write_hf(sd, cfg, out_dir)).eval()


def prompt_ids(vocab, seed=1):
    return torch.randint(0, vocab, (PROMPT_LEN,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy_official(model, prompt):
    """Prompt in one sequence call, then 64 greedy steps; returns (per-step logits, tokens)."""
    logits, state = model.forward(prompt, None)
    outs, toks = [logits.float()], []
    for _ in range(STEPS):
        tok = int(torch.argmax(outs[-1]))
        toks.append(tok)
        logits, state = model.forward([tok], state)
        outs.append(logits.float())
    return outs, toks


def greedy_ours(model, prompt, token_mode):
    state = model.new_state(1)
    ids = torch.tensor(prompt)[None]
    if token_mode:
        for t in range(ids.shape[1]):
            logits, state = model.forward(ids[:, t:t + 1], state)
    else:
        logits, state = model.forward(ids, state)
    outs, toks = [logits[0]], []
    for _ in range(STEPS):
        tok = int(torch.argmax(outs[-1]))
        toks.append(tok)
        logits, state = model.forward(torch.tensor([[tok]]), state)
        outs.append(logits[0])
    return outs, toks


def max_diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def reference_run(tiny_pth):
    return greedy_official(official_rwkv(tiny_pth), prompt_ids(1000))


@pytest.mark.parametrize("token_mode", [False, True], ids=["sequence", "token"])
def test_matches_rwkv_package(tiny_model, reference_run, token_mode):
    ref_logits, ref_toks = reference_run
    logits, toks = greedy_ours(tiny_model, prompt_ids(1000), token_mode)
    assert max_diff(logits, ref_logits) <= TOL
    assert toks == ref_toks


def test_matches_transformers(tiny_pth, tiny_model, tmp_path):
    hf = official_hf(tiny_pth, tmp_path / "hf")
    ids = torch.tensor(prompt_ids(1000))[None]
    with torch.no_grad():
        ref = hf(ids).logits[0]                                   # (T, V)
        gen = hf.generate(ids, max_new_tokens=STEPS, do_sample=False, min_new_tokens=STEPS)
    ours, _ = tiny_model.forward(ids, all_logits=True)
    assert float((ours[0] - ref).abs().max()) <= TOL
    _, toks = greedy_ours(tiny_model, prompt_ids(1000), token_mode=False)
    assert gen[0, PROMPT_LEN:].tolist() == toks


def test_batched_streams_match_rwkv_package_run_alone(tiny_pth, tiny_model):
    off = official_rwkv(tiny_pth)
    prompts = [prompt_ids(1000, seed=s)[:20] for s in (5, 6, 7)]
    logits, _ = tiny_model.forward(torch.tensor(prompts))
    for i, p in enumerate(prompts):
        ref, _ = off.forward(p, None)
        assert float((logits[i] - ref).abs().max()) <= TOL


def test_registered_tiny_size_with_full_vocab_matches(tmp_path):
    path = write_synthetic("rwkv-4-tiny", path=tmp_path / "tiny-full-vocab.pth", seed=3)
    ours = rwkv_engine.load("rwkv-4-tiny", checkpoint=path)
    prompt = prompt_ids(50277)
    ref_logits, ref_toks = greedy_official(official_rwkv(path), prompt)
    logits, toks = greedy_ours(ours, prompt, token_mode=False)
    assert max_diff(logits, ref_logits) <= TOL and toks == ref_toks


@pytest.mark.slow
def test_169m_shape_matches_rwkv_package():
    path = write_synthetic("rwkv-4-pile-169m")
    ours = rwkv_engine.load("rwkv-4-pile-169m")
    prompt = prompt_ids(50277)
    ref_logits, ref_toks = greedy_official(official_rwkv(path), prompt)
    for token_mode in (False, True):
        logits, toks = greedy_ours(ours, prompt, token_mode)
        assert max_diff(logits, ref_logits) <= TOL and toks == ref_toks
