"""Loading baseline checkpoints: both key-prefix styles, buffers and tied heads, sharded and .bin files,
every bad input with its one-line message, and synthetic checkpoints (deterministic, atomic, reused,
readable by transformers)."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import baselines
from baselines import loader
from baselines.config import MODELS, GPTNeoXConfig, OPTConfig
from rwkv_engine.checkpoint import CheckpointError
from test_baselines import CASES, V, prompt, randomize

FAMILY_CASES = {"pythia": "gpt_neox.", "opt": "model.", "gpt-neo": "transformer.", "bloom": "transformer."}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """case -> (transformers model, save_pretrained directory, our prompt logits)."""
    built = {}

    def get(case):
        if case not in built:
            hf = randomize(transformers.AutoModelForCausalLM.from_config(CASES[case]()).eval())
            path = tmp_path_factory.mktemp(case)
            hf.save_pretrained(path)
            built[case] = hf, path, logits_of(path)
        return built[case]
    return get


def logits_of(path, **kw):
    logits, _ = baselines.load(str(path), **kw).forward(prompt(), all_logits=True)
    return logits


def copy_of(src, dst, weights=True):
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    if weights:
        shutil.copy(src / "model.safetensors", dst / "model.safetensors")
    return dst


def rewrite(path, edit):
    """Apply edit(state_dict) -> state_dict to model.safetensors in place."""
    sd = load_file(path / "model.safetensors")
    save_file(edit(sd), path / "model.safetensors")


# ---------------------------------------------------------------------------------------------
# Layouts that must load

@pytest.mark.parametrize("case", list(FAMILY_CASES))
def test_keys_without_prefix(saved, tmp_path, case):
    """Base-model-style files (no 'gpt_neox.'/'model.'/'transformer.' prefix) load the same."""
    _, src, ref = saved(case)
    prefix = FAMILY_CASES[case]
    path = copy_of(src, tmp_path / "stripped")
    rewrite(path, lambda sd: {k.removeprefix(prefix): v for k, v in sd.items()})
    assert not any(k.startswith(prefix) for k in load_file(path / "model.safetensors"))
    assert torch.equal(logits_of(path), ref)


def test_buffers_tied_head_and_head_alias_ignored(saved, tmp_path):
    _, src, ref = saved("pythia")
    path = copy_of(src, tmp_path / "buffers")
    extra = {"gpt_neox.layers.0.attention.bias": torch.ones(1, 1, 8, 8, dtype=torch.bool),
             "gpt_neox.layers.0.attention.masked_bias": torch.tensor(-1e9),
             "gpt_neox.layers.1.attention.rotary_emb.inv_freq": torch.ones(2)}
    rewrite(path, lambda sd: {**{("lm_head.weight" if k == "embed_out.weight" else k): v for k, v in sd.items()}, **extra})
    assert torch.equal(logits_of(path), ref)
    _, src, ref = saved("opt")
    path = copy_of(src, tmp_path / "tied")
    rewrite(path, lambda sd: {**sd, "lm_head.weight": sd["model.decoder.embed_tokens.weight"].clone()})
    assert torch.equal(logits_of(path), ref)


def test_sharded_safetensors(saved, tmp_path):
    hf, _, ref = saved("bloom")
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (tmp_path / "model.safetensors").exists()
    assert torch.equal(logits_of(tmp_path), ref)


def test_bin_and_sharded_bin_load_with_weights_only_and_mmap(saved, tmp_path, monkeypatch):
    _, src, ref = saved("gpt-neo")
    sd = load_file(src / "model.safetensors")
    calls, real_load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw) or real_load(*a, **kw))
    single = copy_of(src, tmp_path / "single", weights=False)
    torch.save(sd, single / "pytorch_model.bin")
    assert torch.equal(logits_of(single), ref)
    sharded = copy_of(src, tmp_path / "sharded", weights=False)
    keys = sorted(sd)
    weight_map = {}
    for i, part in enumerate((keys[:len(keys) // 2], keys[len(keys) // 2:])):
        name = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: sd[k] for k in part}, sharded / name)
        weight_map.update({k: name for k in part})
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert torch.equal(logits_of(sharded), ref)
    assert len(calls) == 3 and all(kw.get("weights_only") is True and kw.get("mmap") is True for kw in calls)


def test_registered_name_with_checkpoint_must_match(saved):
    _, src, _ = saved("opt")
    with pytest.raises(CheckpointError, match=r"does not match registered opt-125m: model\.decoder\.embed_positions"):
        baselines.load("opt-125m", checkpoint=str(src))
    with pytest.raises(CheckpointError, match="is a opt checkpoint, pythia-160m is gpt_neox"):
        baselines.load("pythia-160m", checkpoint=str(src))


# ---------------------------------------------------------------------------------------------
# Bad checkpoints: each a one-line error naming the file/key/shape

def _set(key, value):
    return lambda sd: {**sd, key: value}


Q = "model.decoder.layers.0.self_attn.q_proj.weight"
BAD = {
    "missing key": (lambda p: rewrite(p, lambda sd: {k: v for k, v in sd.items() if k != Q}),
                    r"missing key 'model\.decoder\.layers\.0\.self_attn\.q_proj\.weight'"),
    "unexpected key": (lambda p: rewrite(p, _set("model.decoder.layers.0.adapter.weight", torch.ones(2))),
                       r"model\.safetensors: unexpected key 'model\.decoder\.layers\.0\.adapter\.weight'"),
    "wrong shape": (lambda p: rewrite(p, _set(Q, torch.ones(64, 63))),
                    r"key 'model\.decoder\.layers\.0\.self_attn\.q_proj\.weight' has shape \[64, 63\], expected \[64, 64\]"),
    "int dtype": (lambda p: rewrite(p, _set(Q, torch.ones(64, 64, dtype=torch.int32))), r"q_proj\.weight' has non-float dtype I32"),
    "nan": (lambda p: rewrite(p, _set(Q, torch.full((64, 64), float("nan")))), r"q_proj\.weight' contains NaN or Inf"),
    "inf": (lambda p: rewrite(p, _set(Q, torch.full((64, 64), float("inf")))), r"q_proj\.weight' contains NaN or Inf"),
    "truncated safetensors": (lambda p: _truncate(p / "model.safetensors"), r"model\.safetensors: truncated or not a safetensors file"),
    "not a checkpoint": (lambda p: (p / "model.safetensors").write_text("hello"), r"model\.safetensors: truncated or not a safetensors file"),
    "truncated bin": (lambda p: _as_bin(p, truncate=True), r"pytorch_model\.bin: truncated or not a PyTorch checkpoint"),
    "text as bin": (lambda p: _as_bin(p, text=True), r"pytorch_model\.bin: truncated or not a PyTorch checkpoint"),
    "bin of a list": (lambda p: _as_bin(p, obj=[torch.ones(1)]), r"pytorch_model\.bin: holds a list, expected a dict of tensors"),
    "no weights": (lambda p: (p / "model.safetensors").unlink(), r"no model\.safetensors, pytorch_model\.bin or \*\.index\.json found"),
    "missing shard": (lambda p: (p / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {Q: "x.safetensors"}})),
                      r"x\.safetensors: shard listed in model\.safetensors\.index\.json is missing"),
    "bad index": (lambda p: (p / "model.safetensors.index.json").write_text("{}"), r"index\.json: not a valid index"),
    "config missing": (lambda p: (p / "config.json").unlink(), r"config\.json: missing"),
    "config not json": (lambda p: (p / "config.json").write_text("{hidden_size: 64"), r"config\.json: invalid JSON"),
    "config without a size": (lambda p: _edit_config(p, hidden_size=None), r"config\.json: missing key 'hidden_size'"),
    "unknown model_type": (lambda p: _edit_config(p, model_type="llama"), r"config\.json: unsupported model_type 'llama'"),
    "config shapes disagree": (lambda p: _edit_config(p, ffn_dim=100),
                               r"key .model\.decoder\.layers\.0\.fc1\.(weight|bias). has shape \[128(, 64)?\], expected \[100(, 64)?\]"),
    "bad tokenizer": (lambda p: (p / "tokenizer.json").write_text("{}"), r"tokenizer\.json: not a valid tokenizer\.json"),
}


def _truncate(f):
    data = f.read_bytes()
    f.write_bytes(data[:len(data) // 2])


def _as_bin(p, truncate=False, text=False, obj=None):
    sd = load_file(p / "model.safetensors")
    (p / "model.safetensors").unlink()
    f = p / "pytorch_model.bin"
    if text:
        f.write_text("not a checkpoint\n")
        return
    torch.save(sd if obj is None else obj, f)
    if truncate:
        _truncate(f)


def _edit_config(p, **changes):
    d = json.loads((p / "config.json").read_text())
    d.update(changes)
    (p / "config.json").write_text(json.dumps(d))


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoint(saved, tmp_path, case):
    _, src, _ = saved("opt")
    path = copy_of(src, tmp_path / "bad")
    corrupt, message = BAD[case]
    corrupt(path)
    with pytest.raises(CheckpointError, match=message) as err:
        baselines.load(str(path))
    assert "\n" not in str(err.value)


class _Payload:
    """Unpickling this calls Path.touch(marker): code a weights_only load must never run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_bin_with_pickled_code_is_refused_and_never_runs(saved, tmp_path):
    _, src, _ = saved("opt")
    path = copy_of(src, tmp_path / "evil", weights=False)
    marker = tmp_path / "code-ran"
    sd = load_file(src / "model.safetensors")
    sd["model.decoder.layers.0.fc1.weight"] = _Payload(marker)
    torch.save(sd, path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: refused to unpickle") as err:
        baselines.load(str(path))
    assert "\n" not in str(err.value)
    assert not marker.exists()
    torch.load(path / "pytorch_model.bin", weights_only=False)      # the payload is real: a plain load runs it
    assert marker.exists()


# ---------------------------------------------------------------------------------------------
# Bad calls

def test_bad_tokens_and_states(saved):
    _, src, _ = saved("opt")
    model = baselines.load(str(src))
    cases = [
        (lambda: model.forward([[V]]), rf"token id {V} out of range \[0, {V}\)"),
        (lambda: model.forward([-1]), r"token id -1 out of range"),
        (lambda: model.forward(torch.zeros(1, 0, dtype=torch.long)), r"shape \[B, T\] with B, T >= 1, got \[1, 0\]"),
        (lambda: model.forward([]), r"shape \[B, T\] with B, T >= 1"),
        (lambda: model.forward(torch.ones(1, 3)), r"tokens must be a LongTensor"),
        (lambda: model.forward(torch.ones(1, 6, dtype=torch.long), model.new_state(1, 5)),
         r"6 tokens at position 0 exceed the cache's 5 positions"),
        (lambda: model.forward(torch.ones(2, 1, dtype=torch.long), model.new_state(1, 5)),
         r"cache holds 1 streams but tokens have 2"),
        (lambda: model.forward([1], state=object()), r"state must be a baselines KVCache"),
        (lambda: model.new_state(1, 2049), r"max_len 2049 exceeds the 2048 positions"),
        (lambda: model.new_state(0), r"batch_size must be an int >= 1"),
        (lambda: model.generate("hello", max_new_tokens=2), r"prompt is text but this model has no tokenizer"),
        (lambda: baselines.load(str(src), protocol="paper").forward([1, 2, 3], baselines.load(str(src), protocol="paper").new_state(1, 2)),
         r"3 tokens at position 0 exceed the state's 2 positions"),
        (lambda: baselines.load(str(src), protocol="fast"), r"unknown protocol 'fast'"),
        (lambda: baselines.load("gpt-5"), r"'gpt-5' is neither a registered model nor a checkpoint directory"),
        (lambda: baselines.load("gpt-5", checkpoint=str(src)), r"checkpoint= needs a registered model name"),
        (lambda: baselines.load(str(src), dtype="int8"), r"unsupported dtype 'int8'"),
    ]
    if not torch.cuda.is_available():
        cases.append((lambda: baselines.load(str(src), device="cuda"), r"no CUDA GPU is available"))
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            call()
        assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------
# Tokenizers

def test_tokenizers(saved, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    import rwkv_engine
    _, src, _ = saved("opt")
    path = copy_of(src, tmp_path / "with-tokenizer")
    words = {w: i for i, w in enumerate(["[UNK]"] + [f"w{i}" for i in range(V - 1)])}
    tok = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    model = baselines.load(str(path))
    assert model.tokenizer.encode("w1 w2") == [2, 3]
    out = model.generate("w1 w2", max_new_tokens=3, temperature=0)
    assert isinstance(out.text[0], str) and len(out.tokens[0]) == 3
    # Pythia-sized vocabularies without tokenizer.json get the packaged GPT-NeoX-20B tokenizer
    cfg = GPTNeoXConfig(1, 32, 2, 50304, ffn_dim=32, name="pythia-vocab")
    model = baselines.load(str(loader.write_synthetic(cfg, tmp_path / "pythia-vocab")))
    assert model.tokenizer is rwkv_engine.tokenizer()


# ---------------------------------------------------------------------------------------------
# Synthetic checkpoints

TINY_OPT = OPTConfig(2, 64, 4, V, ffn_dim=128, embed_dim=32, pre_ln=False, name="opt-tiny")


def test_synthetic_checkpoint_is_real_hf_layout(tmp_path):
    path = loader.write_synthetic(TINY_OPT, tmp_path / "a", seed=3)
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]
    again = loader.write_synthetic(TINY_OPT, tmp_path / "b", seed=3)
    assert (path / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()
    other = loader.write_synthetic(TINY_OPT, tmp_path / "c", seed=4)
    assert (path / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert f.metadata()["synthetic"] == "true"
        sd = {k: f.get_tensor(k) for k in f.keys()}
    assert {k: tuple(v.shape) for k, v in sd.items()} == TINY_OPT.shapes()
    assert all(v.dtype == torch.float16 for v in sd.values())
    assert torch.equal(sd["model.decoder.layers.0.final_layer_norm.weight"], torch.ones(64, dtype=torch.float16))
    assert torch.equal(sd["model.decoder.layers.1.fc2.bias"], torch.zeros(64, dtype=torch.float16))
    assert abs(sd["model.decoder.layers.1.fc1.weight"].float().std() - 0.02) < 0.002
    # transformers reads it as its own checkpoint and computes the same logits as our loader
    ours = baselines.load(str(path))
    assert ours.synthetic and ours.source == "synthetic"
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(prompt()).logits
    logits, _ = ours.forward(prompt(), all_logits=True)
    assert (logits - ref).abs().max() <= 1e-4


def test_synthetic_by_name_cached_atomic_and_reused(tmp_path, monkeypatch):
    monkeypatch.setitem(MODELS, "opt-tiny", TINY_OPT)
    monkeypatch.setenv("RWKV_ENGINE_CACHE", str(tmp_path / "env-cache"))
    model = baselines.load("opt-tiny")
    path = tmp_path / "env-cache" / "synthetic" / "opt-tiny"
    assert model.synthetic and model.source == "synthetic" and model.path == str(path)
    assert model.config == TINY_OPT
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    logits, _ = model.forward([1, 2, 3])
    logits2, _ = baselines.load("opt-tiny").forward([1, 2, 3])                 # reused, not rewritten
    assert torch.equal(logits, logits2) and (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert baselines.load("opt-tiny", cache_dir=tmp_path / "arg").path == str(tmp_path / "arg" / "synthetic" / "opt-tiny")

    def fail(*a, **kw):                 # dies mid-write: no checkpoint appears, no temporary is left
        (Path(a[0])).write_bytes(b"partial")
        raise KeyboardInterrupt
    monkeypatch.setattr(loader, "write_safetensors", fail)
    with pytest.raises(KeyboardInterrupt):
        baselines.load("opt-tiny", cache_dir=tmp_path / "crash")
    assert os.listdir(tmp_path / "crash" / "synthetic") == []


def test_synthetic_writes_in_bounded_blocks(tmp_path):
    """make_rows is never asked for more than `chunk` elements, and the file is still exact."""
    shapes = {"big.weight": (100, 30), "norm.weight": (30,), "norm.bias": (30,)}
    asked = []

    def make_rows(key, shape, rows):
        asked.append(rows * (shape[1] if len(shape) > 1 else 1))
        return torch.full((rows, *shape[1:]), float(len(asked)))
    loader.write_safetensors(tmp_path / "x.safetensors", shapes, make_rows, torch.float32, chunk=300)
    sd = load_file(tmp_path / "x.safetensors")
    assert max(asked) <= 300 and {k: tuple(v.shape) for k, v in sd.items()} == shapes
    assert sd["big.weight"][0, 0] == 1 and sd["big.weight"][-1, 0] == 10


def test_registry_configs_round_trip_through_config_json():
    for name, cfg in MODELS.items():
        assert loader.config_from_hf(json.loads(json.dumps(cfg.to_hf())), name=name) == cfg


@pytest.mark.slow
def test_real_size_synthetic_opt_125m(tmp_path):
    model = baselines.load("opt-125m", cache_dir=tmp_path)
    assert model.synthetic and model.n_params == 125_239_296
    assert model.generate([2, 100, 200], max_new_tokens=4, temperature=0).tokens[0].__len__() == 4
    with pytest.raises(CheckpointError, match="does not match registered opt-350m"):
        baselines.load("opt-350m", checkpoint=model.path)
