"""Issue 9's I/O cases: each bad checkpoint, state, output path or name gets a one-line error (exit 2
for the CLI) and leaves nothing partial; converting keeps the synthetic label; hub names map for real."""
import json
import os
import stat
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import baselines
import rwkv_engine
from rwkv_engine import State, files
from rwkv_engine.checkpoint import blinkdl_to_hf, read_checkpoint, read_metadata, write_hf
from rwkv_engine.config import ALIASES, MODELS, canonical_name
from rwkv_engine.convert import main as convert_main
from rwkv_engine.files import CheckpointError, WriteError
from helpers import one_line_error


@pytest.fixture(scope="module")
def sd(tiny_pth):
    return torch.load(tiny_pth, weights_only=True)


# ---------------------------------------------------------------------------------------------
# 9.2 convert --to hf into a directory holding a sharded checkpoint

def sharded_hf(sd, cfg, d, scale):
    d.mkdir()
    write_hf({k: v * scale for k, v in sd.items()}, cfg, d / "tmp")
    (d / "config.json").write_text((d / "tmp" / "config.json").read_text())
    hf = {blinkdl_to_hf(k): v.contiguous() * scale for k, v in sd.items()}
    keys = sorted(hf)
    weight_map = {}
    for n, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"model-0000{n + 1}-of-00002.safetensors"
        save_file({k: hf[k] for k in part}, str(d / name))
        weight_map.update({k: name for k in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for f in (d / "tmp").iterdir():
        f.unlink()
    (d / "tmp").rmdir()
    return d


def test_convert_into_sharded_dir_needs_overwrite_and_replaces_the_whole_set(tiny_pth, sd, tmp_path, capsys):
    _, cfg = read_checkpoint(tiny_pth)
    dst = sharded_hf(sd, cfg, tmp_path / "hf", scale=0.5)
    before = sorted(os.listdir(dst))
    assert convert_main([str(tiny_pth), str(dst)]) == 2
    err = capsys.readouterr().err
    assert "directory is not empty" in err and err.count("\n") == 1
    assert sorted(os.listdir(dst)) == before
    assert convert_main([str(tiny_pth), str(dst), "--overwrite"]) == 0
    assert sorted(os.listdir(dst)) == ["config.json", "model.safetensors"]
    x = torch.arange(10)[None] * 7
    ref = rwkv_engine.load(str(tiny_pth)).forward(x)[0]
    assert torch.equal(rwkv_engine.load(str(dst)).forward(x)[0], ref)          # the new weights, not the old
    assert sorted(os.listdir(tmp_path)) == ["hf"]


# ---------------------------------------------------------------------------------------------
# 9.5 state dtype, device, shape and values

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64, torch.int64])
@pytest.mark.parametrize("T", [1, 4])
def test_state_of_wrong_dtype_is_rejected_in_both_modes(tiny_model, dtype, T):
    state = tiny_model.new_state(1)
    bad = State(**{k: v.to(dtype) for k, v in state.tensors().items()})
    one_line_error(ValueError, lambda: tiny_model.forward(torch.ones(1, T, dtype=torch.long), bad),
                   rf"state\.att_x has dtype {dtype}, expected torch\.float32")


def test_state_of_a_float16_model_is_rejected_by_a_float32_model(tiny_pth, tiny_model):
    fp16_state = rwkv_engine.load(str(tiny_pth), dtype="float16").new_state(1)
    one_line_error(ValueError, lambda: tiny_model.forward([1], fp16_state), r"att_x has dtype torch\.float16")
    wkv_f16 = tiny_model.new_state(1)
    wkv_f16.att_a = wkv_f16.att_a.half()
    one_line_error(ValueError, lambda: tiny_model.forward([1, 2], wkv_f16), r"att_a has dtype torch\.float16, expected torch\.float32")
    on_meta = tiny_model.new_state(1).to(device="meta")
    one_line_error(ValueError, lambda: tiny_model.forward([1], on_meta), r"att_x is on meta, the model on cpu")


def test_state_load_checks_dtype_and_values(tiny_model, tmp_path):
    state = tiny_model.new_state(2)
    tensors = {k: v.clone() for k, v in state.tensors().items()}
    save_file({**tensors, "att_x": tensors["att_x"].long()}, str(tmp_path / "int.st"))
    one_line_error(ValueError, lambda: State.load(tmp_path / "int.st"), r"att_x has dtype torch\.int64")
    save_file({**tensors, "att_b": tensors["att_b"].double()}, str(tmp_path / "f64.st"))
    one_line_error(ValueError, lambda: State.load(tmp_path / "f64.st"), r"att_b has dtype torch\.float64, expected torch\.float32")
    tensors["att_a"][1, 0, 3] = float("nan")
    save_file(tensors, str(tmp_path / "nan.st"))
    one_line_error(ValueError, lambda: State.load(tmp_path / "nan.st"), r"nan\.st\.att_a contains NaN or Inf")
    os.mkfifo(tmp_path / "fifo.st")
    one_line_error(ValueError, lambda: State.load(tmp_path / "fifo.st"), "not a regular state file")


# ---------------------------------------------------------------------------------------------
# 9.14 State.save refuses non-regular destinations; mode from the umask

def test_state_save_refuses_symlink_and_device_and_uses_umask(tiny_model, tmp_path):
    state = tiny_model.new_state(1)
    target = tmp_path / "precious"
    target.write_text("keep me")
    (tmp_path / "link").symlink_to(target)
    one_line_error(WriteError, lambda: state.save(tmp_path / "link"), "not a regular file")
    assert (tmp_path / "link").is_symlink() and target.read_text() == "keep me"
    one_line_error(WriteError, lambda: state.save("/dev/null"), "not a regular file")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    old = os.umask(0o022)
    try:
        state.save(tmp_path / "s.st")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "s.st").stat().st_mode) == 0o644
    assert torch.equal(State.load(tmp_path / "s.st").att_p, state.att_p)


# ---------------------------------------------------------------------------------------------
# 9.10 debris of killed writes

def test_killed_synthetic_write_debris_is_cleaned(tmp_path, monkeypatch):
    from test_files import dead_pid
    monkeypatch.setenv("RWKV_ENGINE_CACHE", str(tmp_path))
    final = files.synthetic_path("rwkv-4-tiny")
    final.parent.mkdir(parents=True)
    dead = dead_pid()
    old_style = final.with_name(f".{final.name}.tmp{dead}")             # what the old writer left
    new_style = final.with_name(f".{final.name}.tmp-{dead}-0a1b2c")
    for f in (old_style, new_style):
        f.write_bytes(b"\0" * 1000)
    assert rwkv_engine.load("rwkv-4-tiny").synthetic
    assert os.listdir(final.parent) == [final.name]


def test_baseline_cache_entry_without_weights_is_rebuilt(tmp_path, monkeypatch):
    from baselines.config import MODELS as BASELINES
    from test_baselines_loader import TINY_OPT
    monkeypatch.setitem(BASELINES, "opt-tiny", TINY_OPT)
    entry = tmp_path / "synthetic" / "opt-tiny"
    entry.mkdir(parents=True)
    (entry / "config.json").write_text(json.dumps(dict(TINY_OPT.to_hf(), synthetic=True)))
    model = baselines.load("opt-tiny", cache_dir=tmp_path)
    assert model.synthetic and sorted(os.listdir(entry)) == ["config.json", "model.safetensors"]
    assert os.listdir(entry.parent) == ["opt-tiny"]


# ---------------------------------------------------------------------------------------------
# 9.11 / 9.3 bad checkpoint parts -> CheckpointError

def saved(sd, tmp_path, edit, name="bad.pth"):
    bad = {k: v.clone() for k, v in sd.items()}
    edit(bad)
    torch.save(bad, tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.__setitem__("blocks.0.ffn.key.weight", torch.tensor(1.0)), r"blocks\.0\.ffn\.key\.weight has shape \[\]"),
    (lambda d: d.__setitem__("blocks.0.ln1.weight", torch.tensor(1.0)), r"blocks\.0\.ln1\.weight has shape \[\], expected \[96\]"),
    (lambda d: d.__setitem__(7, torch.ones(2)), "key 7 is a int, expected a string"),
    (lambda d: d.__setitem__("head.weight", d["head.weight"].to(torch.float8_e4m3fn)),
     r"head\.weight has dtype torch\.float8_e4m3fn, which is not supported"),
    (lambda d: d.__setitem__("head.weight", d["head.weight"].to_sparse()), "sparse_coo tensor; only dense"),
    (lambda d: d["head.weight"].__setitem__((0, 0), 3e38), r"head\.weight has a value of magnitude 3e\+38"),
    (lambda d: d.__setitem__("blocks.1.att.time_decay", torch.full((96,), 100.0)),
     r"time_decay has a value 100 above 88.*overflows float32"),
])
def test_bad_checkpoint_parts(sd, tmp_path, edit, message):
    path = saved(sd, tmp_path, edit)
    err = one_line_error(CheckpointError, lambda: rwkv_engine.load(str(path)), message)
    assert str(path) in str(err)


def test_fp8_safetensors_is_refused(sd, tmp_path):
    save_file({k: (v.to(torch.float8_e5m2) if k == "head.weight" else v).contiguous() for k, v in sd.items()},
              str(tmp_path / "f8.safetensors"))
    one_line_error(CheckpointError, lambda: rwkv_engine.load(str(tmp_path / "f8.safetensors")), "not supported")


@pytest.fixture
def hf_dir(tiny_pth, sd, tmp_path):
    _, cfg = read_checkpoint(tiny_pth)
    return write_hf(sd, cfg, tmp_path / "hf")


@pytest.mark.parametrize("eps", ["abc", None, -1e-5, 0, float("inf")])
def test_layer_norm_epsilon_must_be_positive(hf_dir, eps):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["layer_norm_epsilon"] = eps
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    one_line_error(CheckpointError, lambda: rwkv_engine.load(str(hf_dir)), "layer_norm_epsilon must be a number > 0")


@pytest.mark.parametrize("write, message", [
    (lambda f: f.write_text("[1]"), "expected a JSON object, got list"),
    (lambda f: f.write_bytes(b"\x00\xff\xfe"), "invalid JSON"),
    (lambda f: f.unlink() or f.mkdir(), "not a regular file"),
    (lambda f: f.unlink() or os.mkfifo(f), "not a regular file"),
])
def test_config_json_not_an_object(hf_dir, write, message):
    write(hf_dir / "config.json")
    one_line_error(CheckpointError, lambda: rwkv_engine.load(str(hf_dir)), message)


def test_bad_index_and_empty_dir(hf_dir, tmp_path):
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model.safetensors"]}))
    one_line_error(CheckpointError, lambda: rwkv_engine.load(str(hf_dir)), r"index\.json: not a valid index")
    (tmp_path / "empty").mkdir()
    one_line_error(CheckpointError, lambda: rwkv_engine.load(str(tmp_path / "empty")), "needs config.json")


@pytest.mark.parametrize("change, message", [
    ({"rotary_pct": 2}, r"rotary_pct must be a number in \(0, 1\], got 2"),
    ({"rotary_pct": -1}, r"rotary_pct must be a number in \(0, 1\], got -1"),
    ({"layer_norm_eps": -1e-5}, "layer_norm_eps must be a number > 0"),
])
def test_baseline_config_values(tmp_path, change, message):
    from baselines.config import GPTNeoXConfig
    path = baselines.write_synthetic(GPTNeoXConfig(1, 32, 2, 64, ffn_dim=32, name="p"), tmp_path / "p")
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(change)
    (path / "config.json").write_text(json.dumps(cfg))
    one_line_error(CheckpointError, lambda: baselines.load(str(path)), message)


def test_baseline_window_size(tmp_path):
    from baselines.config import GPTNeoConfig
    path = baselines.write_synthetic(GPTNeoConfig(2, 32, 2, 64, ffn_dim=32, max_len=64, name="n"), tmp_path / "n")
    cfg = json.loads((path / "config.json").read_text())
    cfg["window_size"] = -4
    (path / "config.json").write_text(json.dumps(cfg))
    one_line_error(CheckpointError, lambda: baselines.load(str(path)), "window_size must be a positive int, got -4")


def test_baseline_huge_weight(tmp_path):
    from baselines.config import GPTNeoXConfig
    from safetensors.torch import load_file
    path = baselines.write_synthetic(GPTNeoXConfig(1, 32, 2, 64, ffn_dim=32, name="p"), tmp_path / "p", dtype="float32")
    w = load_file(path / "model.safetensors")
    w["gpt_neox.embed_in.weight"][0, 0] = 1e30
    save_file(w, str(path / "model.safetensors"))
    one_line_error(CheckpointError, lambda: baselines.load(str(path)), "magnitude 1e\\+30")


# ---------------------------------------------------------------------------------------------
# 9.11 convert's output errors: one line, exit 2, nothing partial

def _a_dir(d):
    (d / "adir.pth").mkdir()
    return d / "adir.pth"


def _under_a_file(d):
    (d / "afile").write_text("x")
    return d / "afile" / "out.pth"


def _existing(d):
    (d / "old.pth").write_text("x")
    return d / "old.pth"


@pytest.mark.parametrize("dst, message", [(_a_dir, "is a directory"), (_under_a_file, "which is not a directory"),
                                          (_existing, "exists (pass --overwrite")])
def test_convert_output_errors(tiny_pth, tmp_path, capsys, dst, message):
    out = dst(tmp_path)
    before = sorted(os.listdir(tmp_path))
    assert convert_main([str(tiny_pth), str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and sorted(os.listdir(tmp_path)) == before


def test_convert_to_read_only_dir_and_full_disk(tiny_pth, tmp_path, capsys, monkeypatch):
    real_access = files.os.access
    monkeypatch.setattr(files.os, "access", lambda p, mode: False if str(p) == str(tmp_path / "ro") else real_access(p, mode))
    (tmp_path / "ro").mkdir()
    assert convert_main([str(tiny_pth), str(tmp_path / "ro" / "x.pth")]) == 2
    assert "is not writable" in capsys.readouterr().err

    def disk_full(obj, f, *a, **kw):
        open(f, "wb").write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                           "data/3: file write failed")
    monkeypatch.setattr(torch, "save", disk_full)
    assert convert_main([str(tiny_pth), str(tmp_path / "full.pth")]) == 2
    err = capsys.readouterr().err
    assert "full.pth: disk full while writing" in err and err.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == ["ro"]


# ---------------------------------------------------------------------------------------------
# 9.12 non-regular checkpoint paths never block

def test_fifo_checkpoint_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "model.pth")
    result = {}

    def attempt():
        try:
            rwkv_engine.load(str(tmp_path / "model.pth"))
        except CheckpointError as e:
            result["error"] = str(e)
    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(20)
    assert not t.is_alive(), "loading a FIFO blocked"
    assert "not a regular file" in result["error"]


# ---------------------------------------------------------------------------------------------
# 9.15 hub-style names map to the registered name for real

HUB_NAMES = [f"RWKV/{alias}" for alias in ALIASES] + [f"BlinkDL/{name}" for name in MODELS if name != "rwkv-4-tiny"]


@pytest.mark.parametrize("name", list(MODELS) + list(ALIASES) + HUB_NAMES)
def test_every_registered_name_and_alias_resolves(name):
    canonical = canonical_name(name)
    assert canonical in MODELS
    assert rwkv_engine.resolve(name) == (canonical, None)
    assert rwkv_engine.config.get_config(name) is MODELS[canonical]
    expected = ALIASES.get(name.split("/")[-1].lower(), name.split("/")[-1].lower())
    assert canonical == expected


def test_hub_name_loads_the_registered_model(monkeypatch):
    monkeypatch.setitem(ALIASES, "rwkv-4-tiny-pile", "rwkv-4-tiny")
    model = rwkv_engine.load("RWKV/rwkv-4-tiny-pile")
    assert model.config.name == "rwkv-4-tiny" and model.synthetic
    assert rwkv_engine.resolve("someone/rwkv-4-pile-169m") == (None, Path("someone/rwkv-4-pile-169m"))


# ---------------------------------------------------------------------------------------------
# 9.4 (load side) devices

@pytest.mark.parametrize("device, message", [("meta", "unsupported device 'meta'"), ("xla", "device"),
                                              ("nonsense", "unknown device 'nonsense'")])
def test_load_accepts_only_cpu_and_cuda(tiny_pth, device, message):
    one_line_error(ValueError, lambda: rwkv_engine.load(str(tiny_pth), device=device), message)
    one_line_error(ValueError, lambda: baselines.load("pythia-160m", device=device), message)


# ---------------------------------------------------------------------------------------------
# 9.20 convert's help and the synthetic label

def test_convert_help(capsys):
    with pytest.raises(SystemExit):
        convert_main(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m rwkv_engine.convert")
    assert "SRC" in out and "DST" in out and "{float32,float16,bfloat16}" in out and "--overwrite" in out


@pytest.mark.parametrize("out", ["c.pth", "c.safetensors", "c_hf"])
def test_converting_a_synthetic_checkpoint_keeps_the_label(tmp_path, out):
    src = rwkv_engine.write_synthetic("rwkv-4-tiny", path=tmp_path / "tiny.pth")
    assert read_metadata(src) == {"synthetic": "true", "model": "rwkv-4-tiny"}
    assert convert_main([str(src), str(tmp_path / out), "--dtype", "bfloat16"]) == 0
    model = rwkv_engine.load(str(tmp_path / out))
    assert model.synthetic and "synthetic" in repr(model)
    assert repr(model).startswith("RWKV(rwkv-4-tiny:")
    if out.endswith(".safetensors"):
        with safe_open(str(tmp_path / out), "pt") as f:
            assert f.metadata()["synthetic"] == "true"


def test_a_real_checkpoint_is_not_labelled_synthetic(tiny_pth, tmp_path):
    assert convert_main([str(tiny_pth), str(tmp_path / "r.safetensors")]) == 0
    assert not rwkv_engine.load(str(tmp_path / "r.safetensors")).synthetic
    assert not rwkv_engine.load(str(tiny_pth)).synthetic


# ---------------------------------------------------------------------------------------------
# 9.21 weights.md's download commands parse with the huggingface_hub CLI it names

def test_weights_md_download_commands_parse_with_the_named_cli():
    import re
    import shlex
    import warnings
    import huggingface_hub
    from huggingface_hub.cli.hf import app
    text = (Path(__file__).parents[1] / "weights.md").read_text()
    assert not any(line.startswith("huggingface-cli") for line in text.splitlines())
    named = tuple(int(x) for x in re.search(r"checked with (\d+)\.(\d+)", text).groups())
    assert tuple(int(x) for x in huggingface_hub.__version__.split(".")[:2]) >= named
    commands = [line for line in text.splitlines() if line.startswith("hf download ")]
    assert len(commands) >= 3
    for line in commands:
        ctx = app.make_context("hf", shlex.split(line)[1:])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            name, sub, rest = app.resolve_command(ctx, [*ctx.protected_args, *ctx.args])
        params = sub.make_context(name, rest).params                     # raises on an unknown option
        assert name == "download" and params["local_dir"]
