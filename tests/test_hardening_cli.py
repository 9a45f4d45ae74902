"""Issue 19's command-line cases: the first-use notice says what is written, convert takes a registered
name and keeps the model's name, every command's top level turns our errors into one line (exit 2),
output paths are probed before any work and written atomically, and signals leave nothing behind."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import rwkv_engine
from bench import generate, pipeline, quality, serve
from bench.cli import check_writable_file
from rwkv_engine.checkpoint import synthetic_path, write_synthetic
from rwkv_engine.convert import main as convert_main
from helpers import fake_machine_cache

REPO = Path(__file__).resolve().parent.parent
TINY = "rwkv-4-tiny"


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("RWKV_ENGINE_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def machine_cache(tmp_path_factory):
    """A cached machine measurement, so no command here spends seconds measuring bandwidth."""
    with fake_machine_cache(tmp_path_factory.mktemp("machine")) as d:
        yield d


def exits_2_with_one_line(call, capsys, *needles):
    with pytest.raises(SystemExit) as e:
        call()
    # a warning about the bandwidth baseline (bench.machine re-measures a fixture it finds stale) is not
    # the error under test
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and not ln.startswith("bench.machine: warning")]
    assert e.value.code == 2 and len(lines) == 1, lines
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def one_stderr_line(p):
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    return lines[0]


# ---------------------------------------------------------------------------------------------
# 19.1 the first-use notice describes what is written, for every format and size

def test_first_use_notice_describes_the_checkpoint_the_format_is_made_from(fresh_cache):
    from rwkv_engine.checkpoint import synthetic_notice
    fp32 = synthetic_notice("rwkv-4-pile-169m")
    assert "677.37 MB float32 .pth file" in fp32 and "about as much RAM as its size" in fp32
    int8 = synthetic_notice("rwkv-4-pile-169m", "int8")
    assert "338.68 MB bfloat16 Hugging Face directory" in int8 and "int8 weights are made from it" in int8
    assert "677" not in int8
    big = synthetic_notice("rwkv-4-pile-14b", "int8")               # 28 GB on disk, one shard in memory
    assert "28.30 GB bfloat16" in big and "at most about 1.59 GB of RAM" in big and "56" not in big
    assert "56.59 GB float32 .pth" in synthetic_notice("RWKV/rwkv-4-14b-pile", "float32")
    assert "bfloat16 Hugging Face directory" in synthetic_notice("rwkv-4-pile-430m", "float16")
    # the fp32 file being there says nothing about the bf16 directory int8 needs
    fp32_file = synthetic_path("rwkv-4-pile-169m")
    fp32_file.parent.mkdir(parents=True)
    fp32_file.write_bytes(b"")
    assert synthetic_notice("rwkv-4-pile-169m") == ""
    assert generate.first_use_note("rwkv-4-pile-169m", "int8") == int8
    synthetic_path("rwkv-4-pile-169m", torch.bfloat16, fmt="hf").mkdir()
    assert generate.first_use_note("rwkv-4-pile-169m", "int8") == ""


def test_generate_announces_and_writes_the_bfloat16_directory_for_int8(fresh_cache, machine_cache, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, "-m", "bench.generate", "--model", TINY, "--weights", "int8", "--tokens", "2"],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    notice = [ln for ln in p.stderr.splitlines() if ln.startswith("first use of")]
    assert len(notice) == 1 and "bfloat16 Hugging Face directory" in notice[0], p.stderr
    assert synthetic_path(TINY, torch.bfloat16, fmt="hf").is_dir() and not synthetic_path(TINY).exists()


# ---------------------------------------------------------------------------------------------
# 19.3 convert accepts a registered name; 19.2 a converted synthetic checkpoint keeps its model's name

def test_convert_accepts_a_registered_name(fresh_cache, tmp_path, capsys):
    out = tmp_path / "tiny-int8.safetensors"
    assert convert_main([TINY, str(out), "--weights", "int8"]) == 0
    err = capsys.readouterr().err
    assert "first use of rwkv-4-tiny with --weights int8" in err and "bfloat16" in err
    model = rwkv_engine.load(str(out))
    assert repr(model).startswith("RWKV(rwkv-4-tiny:") and model.synthetic and model.weights == "int8"
    x = torch.arange(12)[None] * 5
    assert torch.equal(model.forward(x)[0], rwkv_engine.load(TINY, weights="int8").forward(x)[0])
    plain = tmp_path / "tiny.pth"
    assert convert_main([TINY, str(plain)]) == 0
    assert torch.equal(rwkv_engine.load(str(plain)).forward(x)[0], rwkv_engine.load(TINY).forward(x)[0])


@pytest.mark.parametrize("fmt", ["pth", "hf"])
def test_packed_file_from_a_synthetic_checkpoint_keeps_the_name(tmp_path, fmt):
    src = write_synthetic(TINY, path=tmp_path / ("s.pth" if fmt == "pth" else "s_hf"), dtype=torch.float32, fmt=fmt)
    assert convert_main([str(src), str(tmp_path / "p.safetensors"), "--weights", "int8"]) == 0
    model = rwkv_engine.load(str(tmp_path / "p.safetensors"))
    assert repr(model).startswith("RWKV(rwkv-4-tiny:") and model.synthetic
    assert model.config.ctx_len == rwkv_engine.MODELS[TINY].ctx_len


# ---------------------------------------------------------------------------------------------
# 19.25 arguments that did nothing

def test_convert_refuses_dtype_with_weights(tiny_pth, tmp_path, capsys):
    assert convert_main([str(tiny_pth), str(tmp_path / "x.safetensors"), "--weights", "int8", "--dtype", "float16"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--dtype float16 and --weights int8 do not combine" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ["-5", "0"])
def test_pipeline_timeout_must_be_positive(value, capsys):
    exits_2_with_one_line(lambda: generate.main(["--model", TINY, "--pipeline", "--pipeline-timeout", value]),
                          capsys, "--pipeline-timeout", "must be > 0")


# ---------------------------------------------------------------------------------------------
# 19.9 bench.runner is internal; the README's library snippet writes nothing where it runs

def test_runner_says_it_is_internal():
    from bench.runner import spec_argument
    p = subprocess.run([sys.executable, "-m", "bench.runner", "--help"], capture_output=True, text=True, cwd=REPO,
                       timeout=120)
    assert p.returncode == 2 and "internal entry point" in one_stderr_line(p) and p.stdout == ""
    assert [spec_argument(a) for a in ([], ["[1]"], ["{}", "{}"], ['{"model": "x"}'])] == [None, None, None, {"model": "x"}]


def test_readme_library_snippet_labels_its_number_and_writes_nothing_here(tmp_path, monkeypatch, capsys):
    import tempfile
    readme = (REPO / "README.md").read_text()
    snippet = re.search(r"## Library\n+```python\n(.*?)```", readme, re.S).group(1)
    assert "rwkv-4-pile-169m" in snippet
    cwd, temp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    temp.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    exec(compile(snippet.replace("rwkv-4-pile-169m", TINY), "README.md", "exec"), {})
    assert list(cwd.iterdir()) == []
    out = capsys.readouterr().out
    assert re.search(r"[\d.]+ tokens/s", out), out


# ---------------------------------------------------------------------------------------------
# 19.10 / 19.14 output paths are probed before any work, and written atomically

@pytest.mark.parametrize("where", ["proc", "directory", "under-a-file"])
def test_output_probe_refuses_what_cannot_be_written(tmp_path, where):
    (tmp_path / "file").write_text("x")
    path = {"proc": "/proc/no/such/out.json", "directory": tmp_path, "under-a-file": tmp_path / "file" / "o.json"}[where]
    with pytest.raises(ValueError, match="^--json ") as e:
        check_writable_file(path, "--json")
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_output_probe_creates_the_parent_and_leaves_no_file(tmp_path):
    check_writable_file(tmp_path / "a" / "b" / "out.json", "--json")
    assert (tmp_path / "a" / "b").is_dir() and list((tmp_path / "a" / "b").iterdir()) == []


def test_generate_json_under_proc_fails_before_any_run(capsys, monkeypatch):
    monkeypatch.setattr(generate, "run_child", lambda *a, **k: pytest.fail("a run started"))
    exits_2_with_one_line(lambda: generate.main(["--model", TINY, "--tokens", "1", "--json", "/proc/no/such/out.json"]),
                          capsys, "--json /proc/no/such/out.json")


@pytest.mark.parametrize("option", ["--json", "--plot"])
def test_serve_bench_checks_its_outputs_first(tmp_path, capsys, monkeypatch, option):
    monkeypatch.setattr(serve, "library_decode", lambda args: pytest.fail("the benchmark started"))
    exits_2_with_one_line(lambda: serve.main(["--model", TINY, option, str(tmp_path)]), capsys, option, "is a directory")


def test_pipeline_bench_checks_json_first(capsys, monkeypatch):
    monkeypatch.setattr(pipeline, "run_torchrun", lambda *a: pytest.fail("a torchrun started"))
    exits_2_with_one_line(lambda: pipeline.main(["--model", TINY, "--ranks", "1", "--json", "/proc/no/p.json"]),
                          capsys, "--json /proc/no/p.json")


QUALITY = ["--model", TINY, "--prompt-tokens", "4", "--new-tokens", "2", "--formats", "float16", "--no-sim"]


def test_quality_checks_json_first(tiny_pth, capsys, monkeypatch):
    monkeypatch.setattr(quality, "measure", lambda *a: pytest.fail("the measurement started"))
    exits_2_with_one_line(lambda: quality.main([*QUALITY, "--checkpoint", str(tiny_pth), "--json", "/proc/no/q.json"]),
                          capsys, "--json /proc/no/q.json")


def test_quality_json_on_a_full_disk_is_one_line_and_leaves_nothing(tiny_pth, tmp_path, capsys, monkeypatch):
    import errno
    real = Path.write_text

    def full(self, *a, **k):
        if self.parent == tmp_path:
            open(self, "w").write("{\"part")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **k)
    monkeypatch.setattr(Path, "write_text", full)
    exits_2_with_one_line(lambda: quality.main([*QUALITY, "--checkpoint", str(tiny_pth), "--json", str(tmp_path / "q.json")]),
                          capsys, "q.json: disk full")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# 19.15 bench.quality --text: a FIFO fails at once, an empty file says so

@pytest.mark.parametrize("kind, message", [("fifo", "not a regular file"), ("empty", "is empty")])
def test_quality_text_that_is_not_usable(tiny_pth, tmp_path, capsys, kind, message):
    import threading
    text = tmp_path / "book.txt"
    os.mkfifo(text) if kind == "fifo" else text.write_text(" \n")
    outcome = {}

    def attempt():
        try:
            quality.main([*QUALITY, "--checkpoint", str(tiny_pth), "--text", str(text)])
        except SystemExit as e:
            outcome["code"] = e.code
    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(60)
    if t.is_alive():                                    # unblock the reader, then fail
        os.close(os.open(text, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("--text given a FIFO blocked")
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert outcome.get("code") == 2 and len(lines) == 1, lines
    assert lines[0].startswith("bench.quality: error: --text") and message in lines[0], lines[0]


# ---------------------------------------------------------------------------------------------
# 19.13 our errors become one line at every command's top level, wherever they are raised

@pytest.fixture(scope="module")
def bad_models(tmp_path_factory):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    d = tmp_path_factory.mktemp("bad")
    src = write_synthetic(TINY, path=d / "tiny.pth")
    assert convert_main([str(src), str(d / "ok.safetensors")]) == 0
    blob = (d / "ok.safetensors").read_bytes()
    (d / "truncated.safetensors").write_bytes(blob[: len(blob) // 2])
    os.mkfifo(d / "fifo.pth")
    (d / "listdir").mkdir()
    (d / "listdir" / "config.json").write_text("[1, 2]")
    assert convert_main([str(src), str(d / "int8.safetensors"), "--weights", "int8"]) == 0
    with safe_open(str(d / "int8.safetensors"), "pt") as f:
        meta = f.metadata()
    t = load_file(d / "int8.safetensors")
    t["blocks.0.att.key.weight.scale"] = t["blocks.0.att.key.weight.scale"].clone()
    t["blocks.0.att.key.weight.scale"].view(-1)[0] = float("nan")
    save_file(t, str(d / "nan-scales.safetensors"), metadata=meta)
    return d


@pytest.mark.parametrize("name, message", [("truncated.safetensors", "truncated"), ("fifo.pth", "not a regular file"),
                                           ("nan-scales.safetensors", "corrupt int8 scales"),
                                           ("listdir", "expected a JSON object, got list")])
def test_generate_bad_model_files_are_one_line(bad_models, capsys, monkeypatch, name, message):
    monkeypatch.setattr(generate, "run_child", lambda *a, **k: pytest.fail("a run started"))
    line = exits_2_with_one_line(lambda: generate.main(["--model", str(bad_models / name), "--tokens", "1"]), capsys,
                                 message)
    assert line.startswith("bench.generate: error: ") and name in line


@pytest.mark.parametrize("command", ["bench.seqlen", "bench.sweep"])
def test_every_command_reports_a_bad_model_in_one_line(bad_models, tmp_path, capsys, command):
    from bench import seqlen, sweep
    main, args = {"bench.seqlen": (seqlen.main, ["--models"]), "bench.sweep": (sweep.main, ["--dry-run", "--models"])}[command]
    line = exits_2_with_one_line(lambda: main([*args, str(bad_models / "listdir"), "--out", str(tmp_path)]), capsys,
                                 "config.json: expected a JSON object, got list")
    assert line.startswith(command + ": error: ")


def test_contention_reports_a_bad_model_in_one_line(bad_models):
    p = subprocess.run([sys.executable, "-m", "bench.contention", "--tokens", "2", "--model", str(bad_models / "listdir")],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    line = one_stderr_line(p)
    assert p.returncode == 2 and line.startswith("bench.contention: error: ") and "expected a JSON object" in line


def test_child_error_reaches_the_parent_as_one_line(tiny_pth, machine_cache, capsys):
    # the registered tiny shape has 2 layers, tiny_pth 3: only the child's load finds out
    line = exits_2_with_one_line(lambda: generate.main(["--model", TINY, "--checkpoint", str(tiny_pth), "--tokens", "1"]),
                                 capsys, "n_layer=3 but rwkv-4-tiny has n_layer=2")
    assert "Traceback" not in line


# ---------------------------------------------------------------------------------------------
# 19.24 signals: SIGTERM during a synthetic write leaves no temporary; Ctrl-C exits quietly with 130

SLOW_WRITER = """
import sys, time
from rwkv_engine import checkpoint
fmt = sys.argv[2]
name = "save_pth" if fmt == "pth" else "save_safetensors"
real = getattr(checkpoint, name)
def slow(*args, **kwargs):
    real(*args, **kwargs)
    print("written", flush=True)
    time.sleep(120)
setattr(checkpoint, name, slow)
checkpoint.write_synthetic("rwkv-4-tiny", path=sys.argv[1], fmt=fmt)
"""


@pytest.mark.parametrize("fmt", ["pth", "hf"])
def test_sigterm_during_a_synthetic_write_removes_the_temporary(tmp_path, fmt):
    out = tmp_path / "out"
    out.mkdir()
    target = out / ("tiny.pth" if fmt == "pth" else "tiny_hf")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(target), fmt], stdout=subprocess.PIPE, text=True,
                            cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert proc.stdout.readline().strip() == "written"               # mid-write: the temporary holds data
        assert [p.name for p in out.iterdir()][0].startswith(f".{target.name}.tmp-")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGTERM                             # still ends as killed by SIGTERM
    assert list(out.iterdir()) == []


def _is_runner(process):
    """Whether a child process is a bench.runner; a child that already exited (a zombie nobody has reaped
    yet, e.g. a compiler the parent ran, or gone) is not."""
    import psutil
    try:
        return "bench.runner" in " ".join(process.cmdline())
    except (psutil.ZombieProcess, psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def test_ctrl_c_on_generate_exits_130_quietly_and_kills_the_child(tmp_path, machine_cache):
    import psutil
    env = dict(os.environ, PYTHONPATH=str(REPO))
    parent = subprocess.Popen([sys.executable, "-m", "bench.generate", "--model", TINY, "--tokens", "10000000"],
                              cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    runners = lambda: [c for c in psutil.Process(parent.pid).children(recursive=True) if _is_runner(c)]
    try:
        deadline = time.monotonic() + 60
        while not (children := runners()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert children, "the child never started"
        time.sleep(0.5)
        parent.send_signal(signal.SIGINT)
        _, err = parent.communicate(timeout=30)
        gone, alive = psutil.wait_procs(children, timeout=5)
        assert not alive, "the child outlived Ctrl-C"
        assert parent.returncode == 130 and "Traceback" not in err and "KeyboardInterrupt" not in err, err
        assert err.strip().splitlines()[-1] == "bench.generate: interrupted"
    finally:
        parent.kill()
        for c in psutil.Process().children(recursive=True):
            if _is_runner(c):
                c.kill()
