"""Every checkpoint format loads to the same model; every bad file gets a one-line error."""
import json
import os
import pickle

import pytest
import torch

import rwkv_engine
from rwkv_engine.checkpoint import (CheckpointError, blinkdl_to_hf, read_checkpoint, synthetic_state_dict,
                                    write_hf)


@pytest.fixture(scope="module")
def sd(tiny_pth):
    return torch.load(tiny_pth, weights_only=True)


def logits_of(path):
    m = rwkv_engine.load(str(path))
    return m.forward(torch.arange(10)[None] * 7)[0]


def test_formats_load_to_identical_models(tiny_pth, sd, tmp_path):
    from safetensors.torch import save_file
    ref = logits_of(tiny_pth)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "m.safetensors"))
    assert torch.equal(logits_of(tmp_path / "m.safetensors"), ref)
    # Hugging Face directory: single safetensors
    _, cfg = read_checkpoint(tiny_pth)
    hf_dir = write_hf(sd, cfg, tmp_path / "hf")
    assert torch.equal(logits_of(hf_dir), ref)
    # Hugging Face directory: pytorch_model.bin
    bin_dir = tmp_path / "hf_bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((hf_dir / "config.json").read_text())
    torch.save({blinkdl_to_hf(k): v for k, v in sd.items()}, bin_dir / "pytorch_model.bin")
    assert torch.equal(logits_of(bin_dir), ref)
    # Hugging Face directory: sharded safetensors with an index
    shard_dir = tmp_path / "hf_sharded"
    shard_dir.mkdir()
    (shard_dir / "config.json").write_text((hf_dir / "config.json").read_text())
    keys = sorted(blinkdl_to_hf(k) for k in sd)
    hf_sd = {blinkdl_to_hf(k): v.contiguous() for k, v in sd.items()}
    weight_map = {}
    for n, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        fname = f"model-0000{n + 1}-of-00002.safetensors"
        save_file({k: hf_sd[k] for k in part}, str(shard_dir / fname))
        weight_map.update({k: fname for k in part})
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert torch.equal(logits_of(shard_dir), ref)


def test_bf16_checkpoint_loads_as_upcast_fp32(sd, tmp_path):
    bf = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    torch.save(bf, tmp_path / "bf16.pth")
    torch.save({k: v.float() for k, v in bf.items()}, tmp_path / "upcast.pth")
    assert torch.equal(logits_of(tmp_path / "bf16.pth"), logits_of(tmp_path / "upcast.pth"))


def test_fp32_pth_is_held_once_mapped_or_copied(tmp_path):
    """Loading never holds the weights twice: with copy_weights=False the matrices stay in the file
    mapping (anonymous memory grows by little); by default they are copied out of it once (anonymous
    memory grows by at most about the file). That the mapping's pages are dropped as they go is
    test_weights.py's peak-RSS test."""
    from rwkv_engine import files
    from rwkv_engine.config import RWKVConfig
    from rwkv_engine.model import LoadOptions
    cfg = RWKVConfig(n_layer=4, n_embd=512, vocab_size=256)
    path = tmp_path / "mid.pth"
    torch.save(synthetic_state_dict(cfg), path)
    size = path.stat().st_size

    def rss_anon():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024

    before = rss_anon()
    m = rwkv_engine.load(str(path), options=LoadOptions(copy_weights=False))
    grown = rss_anon() - before
    assert m.blocks[0].att_key.dtype == torch.float32
    assert grown < 0.3 * size, f"anonymous memory grew by {grown} bytes for a {size}-byte checkpoint"
    assert files.in_file_mapping(m.blocks[0].att_key)
    del m
    before = rss_anon()
    m = rwkv_engine.load(str(path))
    grown = rss_anon() - before           # a heap with memory freed by earlier tests may take less
    assert m.blocks[0].att_key.dtype == torch.float32 and not files.in_file_mapping(m.blocks[0].att_key)
    assert grown < 1.3 * size, f"anonymous memory grew by {grown} bytes for a {size}-byte checkpoint"


def test_registry_shapes_must_agree_with_checkpoint(tiny_pth):
    with pytest.raises(CheckpointError, match="n_layer=3 but rwkv-4-pile-169m has n_layer=12"):
        rwkv_engine.load("rwkv-4-pile-169m", checkpoint=tiny_pth)


def save_variant(sd, tmp_path, edit):
    bad = dict(sd)
    edit(bad)
    path = tmp_path / "bad.pth"
    torch.save(bad, path)
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("blocks.2.att.time_first"), "missing key 'blocks.2.att.time_first'"),
    (lambda d: d.__setitem__("blocks.0.att.extra", torch.zeros(3)), "unexpected key 'blocks.0.att.extra'"),
    (lambda d: d.__setitem__("blocks.1.ffn.key.weight", torch.zeros(384, 95)),
     r"blocks.1.ffn.key.weight has shape \[384, 95\], expected \[384, 96\]"),
    (lambda d: d.__setitem__("blocks.0.ln1.weight", torch.ones(96, dtype=torch.int32)),
     "blocks.0.ln1.weight has dtype torch.int32, expected a floating-point tensor"),
    (lambda d: d["head.weight"].__setitem__((3, 4), float("nan")), "head.weight contains NaN or Inf"),
    (lambda d: d.__setitem__("blocks.0.att.time_decay", torch.full((96,), float("inf"))),
     "blocks.0.att.time_decay contains NaN or Inf"),
])
def test_bad_checkpoint_contents(sd, tmp_path, edit, message):
    sd = {k: v.clone() for k, v in sd.items()}
    path = save_variant(sd, tmp_path, edit)
    with pytest.raises(CheckpointError, match=message) as err:
        rwkv_engine.load(str(path))
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_truncated_and_non_checkpoint_files(tiny_pth, tmp_path):
    data = tiny_pth.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pth: truncated or not a checkpoint"):
        rwkv_engine.load(str(tmp_path / "cut.pth"))
    (tmp_path / "notes.pth").write_text("hello")
    with pytest.raises(CheckpointError, match="notes.pth: truncated or not a checkpoint"):
        rwkv_engine.load(str(tmp_path / "notes.pth"))
    (tmp_path / "x.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{bad")
    with pytest.raises(CheckpointError, match="x.safetensors: truncated or not a safetensors file"):
        rwkv_engine.load(str(tmp_path / "x.safetensors"))
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="holds a list, expected a dict of tensors"):
        rwkv_engine.load(str(tmp_path / "list.pth"))
    with pytest.raises(CheckpointError, match="no such file or directory"):
        rwkv_engine.load(str(tmp_path / "missing.pth"))


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_code_is_refused_and_never_executed(sd, tmp_path):
    marker = tmp_path / "pwned"
    bad = dict(sd)
    bad["payload"] = _Exploit(marker)
    torch.save(bad, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="evil.pth: refused to unpickle"):
        rwkv_engine.load(str(tmp_path / "evil.pth"))
    assert not marker.exists()
    with open(tmp_path / "evil_plain.pth", "wb") as f:          # a bare pickle, not a torch zip
        pickle.dump(_Exploit(marker), f)
    with pytest.raises(CheckpointError):
        rwkv_engine.load(str(tmp_path / "evil_plain.pth"))
    assert not marker.exists()


def test_hf_directory_errors(tmp_path):
    d = tmp_path / "hfdir"
    d.mkdir()
    with pytest.raises(CheckpointError, match="needs config.json"):
        rwkv_engine.load(str(d))
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: invalid JSON"):
        rwkv_engine.load(str(d))
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="model_type is 'gpt2', expected 'rwkv'"):
        rwkv_engine.load(str(d))
    (d / "config.json").write_text(json.dumps({"model_type": "rwkv"}))
    with pytest.raises(CheckpointError, match="no model.safetensors, pytorch_model.bin"):
        rwkv_engine.load(str(d))


def test_synthetic_checkpoint_is_deterministic_and_realistic(tiny_cfg):
    a, b = synthetic_state_dict(tiny_cfg, seed=7), synthetic_state_dict(tiny_cfg, seed=7)
    assert all(torch.equal(a[k], b[k]) for k in a)
    decay = torch.cat([a[f"blocks.{i}.att.time_decay"] for i in range(3)])
    assert decay.min() < -5 and decay.max() > 6                         # spread like a trained model
    assert (a["blocks.0.ln1.weight"] - 1).abs().max() < 0.5
    assert a["blocks.0.att.time_mix_k"].shape == (1, 1, 96)


def test_convert_cli_round_trips(tiny_pth, tmp_path):
    from rwkv_engine.convert import main
    ref = logits_of(tiny_pth)
    assert main([str(tiny_pth), str(tmp_path / "out.safetensors")]) == 0
    assert main([str(tiny_pth), str(tmp_path / "hfout")]) == 0
    assert torch.equal(logits_of(tmp_path / "out.safetensors"), ref)
    assert torch.equal(logits_of(tmp_path / "hfout"), ref)
    assert main([str(tmp_path / "nope.pth"), str(tmp_path / "x.pth")]) == 2
    assert not (tmp_path / "x.pth").exists()
