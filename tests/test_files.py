"""rwkv_engine.files: output-path checks before any work, atomic file/directory writes that leave
nothing behind, cleanup of dead writers' temporaries, and the shared readers' refusals."""
import os
import stat
import subprocess
import sys
import threading

import pytest
import torch

from rwkv_engine import files
from rwkv_engine.files import CheckpointError, WriteError


def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_cache_dir_and_synthetic_path_have_one_home(monkeypatch, tmp_path):
    monkeypatch.setenv("RWKV_ENGINE_CACHE", str(tmp_path))
    assert files.cache_dir() == tmp_path
    assert files.synthetic_path("rwkv-4-tiny") == tmp_path / "synthetic" / "rwkv-4-tiny-fp32-seed0.pth"
    assert files.synthetic_path("x", torch.bfloat16, 3, "safetensors").name == "x-bf16-seed3.safetensors"
    assert files.synthetic_path("opt-125m", torch.float16, 0, "hf") == tmp_path / "synthetic" / "opt-125m"
    assert files.synthetic_path("opt-125m", torch.float16, 2, "hf").name == "opt-125m-fp16-seed2"


@pytest.mark.parametrize("setup, kind, message", [
    (lambda p: p.mkdir(), "file", "is a directory"),
    (lambda p: p.parent.rmdir() or p.parent.write_text("x"), "file", "not a directory"),
    (lambda p: p.symlink_to(p.parent / "target"), "file", "not a regular file"),
    (lambda p: os.mkfifo(p), "file", "not a regular file"),
    (lambda p: p.write_text("x"), "dir", "exists and is not a directory"),
    (lambda p: p.mkdir() or (p / "old").write_text("x"), "dir", "directory is not empty"),
])
def test_output_path_refused_before_work(tmp_path, setup, kind, message):
    path = tmp_path / "sub" / "out"
    path.parent.mkdir()
    setup(path)
    called = []
    write = files.atomic_write if kind == "file" else files.atomic_dir
    with pytest.raises(WriteError, match=message) as err:
        write(path, called.append, overwrite=kind == "file")
    assert not called and "\n" not in str(err.value)


def test_unwritable_directory_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(files.os, "access", lambda *a: False)         # root ignores chmod; force the answer
    with pytest.raises(WriteError, match="is not writable"):
        files.check_output_path(tmp_path / "x.pth")


def test_atomic_write_replaces_whole_and_leaves_nothing_on_failure(tmp_path):
    path = tmp_path / "f.bin"
    files.atomic_write(path, lambda p: p.write_bytes(b"new"))
    assert path.read_bytes() == b"new"

    def dies(p):
        p.write_bytes(b"part")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing "
                           "file data/0: file write failed")
    with pytest.raises(WriteError, match="f.bin: disk full while writing"):
        files.atomic_write(path, dies)
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["f.bin"]

    def interrupted(p):
        p.write_bytes(b"part")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        files.atomic_write(path, interrupted)
    assert os.listdir(tmp_path) == ["f.bin"]


def test_new_files_get_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        files.atomic_write(tmp_path / "a", lambda p: p.write_bytes(b"x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o644


def test_atomic_dir_replaces_the_whole_set(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    for name in ("model.safetensors.index.json", "model-00001-of-00002.safetensors"):
        (d / name).write_text("old")
    files.atomic_dir(d, lambda t: (t / "model.safetensors").write_text("new"), overwrite=True)
    assert os.listdir(d) == ["model.safetensors"] and sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_stale_temps_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    dead, live = dead_pid(), os.getppid()
    stale = [tmp_path / f".x.pth.tmp-{dead}-abc123", tmp_path / f".x.pth.tmp{dead}"]     # new and old naming
    for f in stale:
        f.write_bytes(b"partial")
    (tmp_path / f".x.pth.tmp-{dead}-dir").mkdir()
    (tmp_path / f".x.pth.tmp-{dead}-dir" / "model.safetensors").write_bytes(b"partial")
    keep = [tmp_path / f".x.pth.tmp-{live}-abc", tmp_path / f".y.pth.tmp-{dead}-abc"]
    for f in keep:
        f.write_bytes(b"in progress")
    files.atomic_write(tmp_path / "x.pth", lambda p: p.write_bytes(b"done"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["x.pth"] + [f.name for f in keep])


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "weights.pth"
    os.mkfifo(fifo)
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("e", _raises(files.open_weights, fifo)), daemon=True)
    t.start()
    t.join(20)
    assert not t.is_alive(), "opening a FIFO blocked"
    assert isinstance(out["e"], CheckpointError) and "not a regular file" in str(out["e"])


def _raises(fn, *args):
    try:
        fn(*args)
    except Exception as e:          # returned for the assertion
        return e
    return None


@pytest.mark.parametrize("write, message", [
    (lambda d: d.write_text("[1, 2]"), "expected a JSON object, got list"),
    (lambda d: d.write_bytes(b"\xff\xfe\x00binary"), "invalid JSON"),
    (lambda d: d.mkdir(), "not a regular file"),
])
def test_config_json_that_is_not_an_object(tmp_path, write, message):
    write(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match=message) as err:
        files.read_config_json(tmp_path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("index, message", [
    ('{"weight_map": []}', "not a valid index"),
    ('{"weight_map": {"a": 3}}', "not a valid index"),
    ('{"weight_map": {"a": "../../etc/passwd"}}', "not a valid index"),
    ('[]', "expected a JSON object"),
])
def test_bad_index(tmp_path, index, message):
    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointError, match=message):
        files.weight_files(tmp_path)


@pytest.mark.parametrize("sd, message", [
    ({3: torch.ones(2)}, "key 3 is a int, expected a string"),
    ({"w": torch.ones(2).to_sparse()}, "sparse_coo tensor; only dense"),
])
def test_pth_contents_refused(tmp_path, sd, message):
    torch.save(sd, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match=message):
        files.open_weights(tmp_path / "x.pth")


def test_dtype_and_value_problems():
    assert files.dtype_problem(torch.bfloat16) is None
    assert "not supported" in files.dtype_problem(torch.float8_e4m3fn)
    assert "not supported" in files.dtype_problem("F8_E5M2")
    assert "expected a floating-point tensor" in files.dtype_problem(torch.int64)
    assert files.value_problem(torch.tensor([1.0, -65504.0])) is None
    assert "NaN or Inf" in files.value_problem(torch.tensor([1.0, float("nan")]))
    assert "magnitude 3e+38" in files.value_problem(torch.tensor([0.0, 3e38]))
    assert "magnitude 7e+04" in files.value_problem(torch.tensor([-70000.0]), chunk=1)


def test_synthetic_generator_takes_a_device_and_is_unchanged_on_cpu(tiny_cfg):
    """bench.gpu_check draws the same recipe on the GPU through device=; on the CPU the values are the
    ones every cached synthetic checkpoint holds (fixed reference values)."""
    from rwkv_engine.checkpoint import synthetic_state_dict
    a = synthetic_state_dict(tiny_cfg, seed=7)
    b = synthetic_state_dict(tiny_cfg, seed=7, device="cpu")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    g = torch.Generator().manual_seed(7)
    emb = torch.randn(1000, 96, generator=g) * 0.1
    assert torch.equal(a["emb.weight"], emb)
