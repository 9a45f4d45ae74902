"""bench.contention: runs end to end on a tiny model, rejects bad arguments in one line, and never
leaves a competitor process behind (normal end, SIGTERM, SIGKILL of the benchmark)."""
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest


def _default_sigint():
    """In the child: SIGINT back to its default, so Python turns it into KeyboardInterrupt even when
    the tests run as a background job of a non-interactive shell (which starts with SIGINT ignored,
    and an ignored signal stays ignored across exec)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(args, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    return subprocess.Popen([sys.executable, "-m", "bench.contention", *args], cwd=os.getcwd(), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)


def wait_for_competitor(proc, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        kids = psutil.Process(proc.pid).children(recursive=True)
        if kids:
            return kids
        if proc.poll() is not None:
            raise AssertionError(f"bench.contention exited early: {proc.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError("no competitor started")


def assert_gone(procs, timeout=10):
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    assert not alive, f"orphan competitors: {[p.pid for p in alive]}"


def test_runs_and_reports_a_table_and_json(tiny_pth, tmp_path):
    out = tmp_path / "c.json"
    p = start(["--model", str(tiny_pth), "--threads", "1,2", "--competitor", "cpu", "--tokens", "4",
               "--repeats", "1", "--weights", "int8", "--json", str(out)], tmp_path)
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert result["weights"] == "int8"
    assert all(isinstance(r["others_cpu_pct"], float) for r in rows if r["condition"] == "quiet")
    assert [(r["threads"], r["condition"]) for r in rows] == [(1, "quiet"), (1, "cpu"), (2, "quiet"), (2, "cpu")]
    assert all(r["tok_s"] > 0 for r in rows)
    # each busy row is divided by the quiet row of its own thread count, every row by 1 thread quiet
    # (the quiet rows' own 1.0 holds by construction and is not what is checked)
    for busy, quiet in ((rows[1], rows[0]), (rows[3], rows[2])):
        assert busy["vs_quiet"] == round(busy["tok_s"] / quiet["tok_s"], 3)
    assert [r["vs_1thread_quiet"] for r in rows] == [round(r["tok_s"] / rows[0]["tok_s"], 3) for r in rows]
    lines = stdout.strip().splitlines()
    # the line above the table says where the weights come from (a plain .pth of ours: synthetic values,
    # but not marked so, so it is named by its path) and which CPU ran it
    assert result["synthetic"] is False and result["provenance"] == str(tiny_pth) and result["device_name"]
    assert lines[0] == f"{tiny_pth}, int8, weights from {tiny_pth}; cpu: {result['device_name']}"
    assert "x quiet" in lines[1] and len(lines) == 6
    for line, r in zip(lines[2:], rows):                 # the table prints the JSON's rows, in order
        threads, condition, tok_s, vs_quiet, vs_one = line.split()
        assert (int(threads), condition) == (r["threads"], r["condition"])
        assert abs(float(tok_s) - r["tok_s"]) <= 0.05 + 1e-9 and abs(float(vs_quiet) - r["vs_quiet"]) <= 0.005 + 1e-9


def test_the_weights_line_says_synthetic():
    from bench.contention import weights_line
    line = weights_line("rwkv-4-pile-169m", "float32", {"synthetic": True, "provenance": "synthetic", "device_name": "AMD EPYC"})
    assert line == "rwkv-4-pile-169m, float32, synthetic weights (the release's shapes); cpu: AMD EPYC"


@pytest.mark.parametrize("args, message", [
    (["--threads", "0"], "--threads must be >= 1"),
    (["--threads", "a,b"], "--threads must be comma-separated integers"),
    (["--competitor", "gpu"], "unknown --competitor 'gpu'"),
    (["--json", "/"], "--json /: is a directory, expected a file path"),
    (["--weights", "int4"], "unknown --weights 'int4'"),
])
def test_bad_arguments_fail_in_one_line(args, message, tmp_path):
    p = start(args, tmp_path)
    _, stderr = p.communicate(timeout=60)
    assert p.returncode == 2 and message in stderr and len(stderr.strip().splitlines()) == 1, stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_competitors_die_with_the_benchmark(tiny_pth, tmp_path, sig):
    p = start(["--model", str(tiny_pth), "--threads", "1", "--competitor", "cpu", "--tokens", "1000"], tmp_path)
    try:
        kids = wait_for_competitor(p)
        p.send_signal(sig)
        assert p.wait(timeout=30) == {signal.SIGTERM: 128 + 15, signal.SIGINT: 130, signal.SIGKILL: -9}[sig]
        assert_gone(kids)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def _spin_seen(code, **env):
    """GOMP_SPINCOUNT as a fresh interpreter sees it after running `code`."""
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", code + "\nimport os; print(os.environ.get('GOMP_SPINCOUNT'))"],
                         env={**clean, **env}, capture_output=True, text=True, timeout=120, cwd=os.getcwd())
    assert out.returncode == 0, out.stderr
    return out.stdout.split()[-1]


def test_openmp_spin_is_shortened_only_before_torch_and_only_when_unset():
    assert _spin_seen("import rwkv_engine") == "10000"
    assert _spin_seen("import torch, rwkv_engine") == "None"                  # too late: libgomp has read it
    assert _spin_seen("import rwkv_engine", GOMP_SPINCOUNT="77") == "77"      # the user's value stays
    assert _spin_seen("import rwkv_engine", OMP_WAIT_POLICY="passive") == "None"
    # bench.contention's competitor gets the environment without the engine's setting
    assert _spin_seen("import bench.contention as c, os; os.environ.clear(); os.environ.update(c.competitor_env())") \
        == "None"


def _spin_stderr(code, **env):
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-W", "default", "-c", code], env={**clean, **env},
                         capture_output=True, text=True, timeout=120, cwd=os.getcwd())
    assert out.returncode == 0, out.stderr
    return out.stderr


def test_a_spin_setting_that_came_too_late_is_said_once_at_first_use():
    from rwkv_kernels import cpu_c
    if not cpu_c.available():
        pytest.skip(f"no C kernels here ({cpu_c.unavailable_reason()}): nothing to slow down")
    use = ("import torch, rwkv_kernels, sys\nsys.stderr.write('imported\\n')\n"
           "for _ in range(3): rwkv_kernels.relu_square_(torch.randn(8))\n")
    err = _spin_stderr(use)
    assert err.count("torch was imported before rwkv_engine") == 1, err     # once per process
    assert err.index("imported") < err.index("torch was imported before")    # at first use, not import
    assert "decode slows" in err and "GOMP_SPINCOUNT=10000" in err            # the consequence, the fix
    assert "torch was imported" not in _spin_stderr(use.replace("import torch, rwkv_kernels", "import rwkv_kernels, torch"))
    assert "torch was imported" not in _spin_stderr(use, GOMP_SPINCOUNT="77")    # the user chose
