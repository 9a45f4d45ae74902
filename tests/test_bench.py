"""The benchmark harness (bench/): output schema, the memory meter, the sweep's resume and skip
rules, figures, and one-line errors. Tiny models only (rwkv-4-tiny and a 2-layer Pythia-shaped
checkpoint); every CLI runs as a subprocess, as a user would run it."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import memory, models, sweep
from bench.machine import cache_path
from rwkv_engine.process import usable_cores
from helpers import fake_machine_cache

REPO = Path(__file__).resolve().parent.parent
TINY = "rwkv-4-tiny"


@pytest.fixture(scope="module", autouse=True)
def fake_machine(tmp_path_factory):
    """A cached machine measurement in a private folder, so no test spends seconds measuring
    bandwidth (and the real cache is left alone)."""
    with fake_machine_cache(tmp_path_factory.mktemp("machine"), measured_others_cpu_pct=0.0):
        yield


@pytest.fixture(scope="module")
def tiny_pythia(tmp_path_factory):
    from baselines import write_synthetic
    from baselines.config import GPTNeoXConfig
    return write_synthetic(GPTNeoXConfig(2, 64, 4, 1000, max_len=256, name="tiny-pythia"),
                           tmp_path_factory.mktemp("ckpt") / "tiny-pythia")


def cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=REPO, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# bench.generate

def test_generate_json_schema(tmp_path):
    out = tmp_path / "r.json"
    p = cli("bench.generate", "--model", TINY, "--tokens", "8", "--repeats", "2", "--json", str(out))
    assert p.returncode == 0, p.stderr
    data = json.loads(out.read_text())
    assert data["schema"] == "bench.generate/1"
    assert len(data["runs"]) == 2
    s = data["summary"]
    for key in ("model", "family", "n_params", "synthetic", "weights", "prompt_tokens", "prefill_s", "decode_s",
                "total_s", "tokens_per_s", "decode_tokens_per_s", "weight_bytes_per_token", "weight_GBps",
                "bandwidth_pct", "peak_bytes", "mem_method", "expected_runtime_bytes", "repeats"):
        assert key in s, key
    assert s["family"] == "rwkv" and s["synthetic"] is True and s["prompt_tokens"] == 41
    assert s["mem_method"] in ("clear_refs", "sampler") and s["peak_bytes"] >= 0
    assert s["total_s"] == pytest.approx(s["prefill_s"] + s["decode_s"], rel=0.5)
    for run in data["runs"]:
        assert run["status"] == "ok" and len(run["step_s"]) == 7 and run["new_tokens"] == 8
    assert "peak memory excl. params" in p.stdout and "synthetic" in p.stdout


def test_generate_baseline_without_tokenizer(tmp_path, tiny_pythia):
    out = tmp_path / "r.json"
    p = cli("bench.generate", "--model", str(tiny_pythia), "--tokens", "6", "--json", str(out))
    assert p.returncode == 0, p.stderr
    s = json.loads(out.read_text())["summary"]
    assert s["family"] == "pythia" and s["protocol"] == "kv-cache"
    assert "20B tokenizer" in s["prompt_note"] and s["prompt_tokens"] == 41
    assert s["expected_runtime_bytes"] == 2 * 2 * 64 * (41 + 6) * 4          # K and V, 2 layers, fp32


GENERATE_BAD = ["unknown-model", "zero-tokens", "cuda", "missing-checkpoint", "bad-checkpoint", "truncated-checkpoint",
                "empty-dir-checkpoint", "negative-timeout", "negative-threads", "zero-batch", "unknown-weights"]


@pytest.mark.parametrize("case", GENERATE_BAD)
def test_generate_bad_arguments(tmp_path, case):
    if case == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    truncated = tmp_path / "truncated.pth"
    torch.save({"emb.weight": torch.zeros(1000, 64)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:2000])
    (tmp_path / "empty").mkdir()
    args = {"unknown-model": ["--model", "rwkv-9-nope"], "zero-tokens": ["--model", TINY, "--tokens", "0"],
            "cuda": ["--model", TINY, "--device", "cuda"],
            "missing-checkpoint": ["--model", TINY, "--checkpoint", str(tmp_path / "absent.pth")],
            "bad-checkpoint": ["--model", TINY, "--checkpoint", str(bad), "--tokens", "4"],
            "truncated-checkpoint": ["--model", TINY, "--checkpoint", str(truncated), "--tokens", "4"],
            "empty-dir-checkpoint": ["--model", TINY, "--checkpoint", str(tmp_path / "empty"), "--tokens", "4"],
            "negative-timeout": ["--model", TINY, "--tokens", "4", "--timeout", "-5"],
            "negative-threads": ["--model", TINY, "--tokens", "4", "--threads", "-2"],
            "zero-batch": ["--model", TINY, "--tokens", "4", "--batch", "0"],
            "unknown-weights": ["--model", TINY, "--tokens", "4", "--weights", "int4"]}[case]
    names = {"negative-timeout": "--timeout", "negative-threads": "--threads", "zero-batch": "--batch",
             "unknown-weights": "--weights", "truncated-checkpoint": "truncated.pth", "empty-dir-checkpoint": "empty"}
    out = tmp_path / "r.json"
    p = cli("bench.generate", *args, "--json", str(out))
    assert p.returncode == 2
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("bench.generate: error:"), p.stderr
    assert names.get(case, "") in lines[0], lines[0]
    assert not out.exists() and not list(tmp_path.glob(".r.json*"))


# ---------------------------------------------------------------------------------------------
# Memory meter

@pytest.mark.parametrize("method", ["clear_refs", "sampler"])
def test_memory_meter_known_allocation(method):
    if method == "clear_refs" and not memory.clear_refs_works():
        pytest.skip("/proc/self/clear_refs is not writable here")
    size = 200_000_000
    meter = memory.PeakMemory("cpu", method)
    meter.reset()
    block = np.ones(size // 8)                                      # allocated and touched: 200 MB
    if method == "sampler":
        import time
        time.sleep(0.05)                                            # >= 10 samples at 200 Hz
    got = meter.read()
    assert got["method"] == method
    assert abs(got["peak_bytes"] - size) < 0.10 * size + 8e6, got
    del block


def test_sampler_overhead_times_with_and_without_the_sampler():
    """A fake clock makes every plain call last 1.0 s and every sampled one 1.2 s; the sampler
    thread must be running during (and only during) the sampled calls."""
    import itertools
    import threading
    ticks = itertools.chain.from_iterable((10 * i, 10 * i + 1.0, 10 * i + 5, 10 * i + 6.2) for i in itertools.count())
    threads_seen = []
    ratio, plain, sampled = memory.sampler_overhead(lambda: threads_seen.append(threading.active_count()),
                                                    repeats=3, clock=lambda: next(ticks))
    assert (plain, sampled) == (pytest.approx(1.0), pytest.approx(1.2)) and ratio == pytest.approx(1.2)
    assert threads_seen[1::2] == [n + 1 for n in threads_seen[0::2]], threads_seen


# ---------------------------------------------------------------------------------------------
# bench.sweep: planning, resume, outputs

def test_sweep_skips_what_does_not_fit():
    runs, skipped = sweep.plan_runs(["rwkv-4-pile-169m", "rwkv-4-pile-14b", "opt-13b"], ["cpu"], tokens=512, repeats=2,
                               budget_bytes=2e9)
    assert {s["model"] for s in skipped} == {"rwkv-4-pile-14b", "opt-13b"}
    assert all("GB" in s["reason"] and "needs" in s["reason"] for s in skipped)
    assert [spec["model"] for _, spec in runs] == ["rwkv-4-pile-169m"] * 2
    _, skipped = sweep.plan_runs(["opt-125m"], ["cpu"], tokens=4096, repeats=1, budget_bytes=1e12)
    assert "max positions" in skipped[0]["reason"]


def _fake_result(spec, timeout):
    return {"status": "ok", "model": spec["model"], "family": models.family_of(spec["model"]),
            "total_s": 1.0 + spec["tokens"] / 100, "prefill_s": 0.1, "decode_s": 0.9, "tokens_per_s": 10.0,
            "decode_tokens_per_s": 11.0, "weight_GBps": 1.0, "peak_bytes": 1000, "mem_method": "clear_refs",
            "expected_runtime_bytes": 100, "synthetic": True, "threads": 2, "step_s": [0.1] * 3}


def test_sweep_resume_loses_and_duplicates_nothing(tmp_path):
    names = ["rwkv-4-pile-169m", "pythia-160m", "opt-125m"]
    runs, _ = sweep.plan_runs(names, ["cpu"], tokens=16, repeats=2, budget_bytes=1e12)
    results = tmp_path / "runs.jsonl"
    calls = []

    def dies_after_3(spec, timeout):
        if len(calls) == 3:
            raise KeyboardInterrupt                              # the sweep is killed mid-run
        calls.append(spec)
        return _fake_result(spec, timeout)

    with pytest.raises(KeyboardInterrupt):
        sweep.execute(runs, results, runner=dies_after_3, progress=False)
    assert len(sweep.read_rows(results)) == 3
    with open(results, "a") as f:
        f.write('{"key": "torn by a kill')                        # a row half-written when killed
    calls.clear()
    assert sweep.execute(runs, results, runner=lambda s, t: calls.append(s) or _fake_result(s, t), progress=False) == 3
    keys = [r["key"] for r in sweep.read_rows(results)]
    assert sorted(keys) == sorted(k for k, _ in runs)               # every run once, none twice
    assert sweep.execute(runs, results, runner=lambda s, t: pytest.fail("nothing left to run"), progress=False) == 0


def test_sweep_outputs_and_figures(tmp_path):
    import matplotlib.image
    runs, _ = sweep.plan_runs(["rwkv-4-pile-169m", "rwkv-4-pile-430m", "pythia-160m", "bloom-560m"], ["cpu"], tokens=16,
                         repeats=1, budget_bytes=1e12)
    results = tmp_path / "runs.jsonl"
    sweep.execute(runs, results, runner=_fake_result, progress=False)
    sweep.append_row(results, {"key": "x", "model": "opt-125m", "device": "cpu", "tokens": 16, "protocol": "kv-cache",
                               "status": "timeout", "error": "killed after 5 s"})
    machines = {"cpu": json.loads(cache_path("cpu", usable_cores()).read_text())}
    skipped = [{"model": "opt-13b", "device": "cpu", "reason": "needs ~58 GB"}]
    paths, summary = sweep.write_outputs(tmp_path, sweep.read_rows(results), skipped, "kv-cache", machines)
    assert {p.name for p in paths} == {"sweep_kv-cache.csv", "sweep_kv-cache.md", "sweep_kv-cache.json",
                                       "fig13_memory_kv-cache.png", "fig14_time_kv-cache.png"}
    for p in paths:
        assert p.stat().st_size > 0
        if p.suffix == ".png":
            assert matplotlib.image.imread(p).shape[0] > 100
    md = (tmp_path / "sweep_kv-cache.md").read_text()
    assert "bloom-560m" in md and "timeout" in md and "opt-13b" in md
    assert {r["model"] for r in summary} == {"rwkv-4-pile-169m", "rwkv-4-pile-430m", "pythia-160m", "bloom-560m",
                                             "opt-125m"}


def test_sweep_end_to_end_on_tiny_model(tmp_path):
    p = cli("bench.sweep", "--models", TINY, "--tokens", "4", "--repeats", "1", "--out", str(tmp_path))
    assert p.returncode == 0, p.stderr
    rows = sweep.read_rows(tmp_path / "runs.jsonl")
    assert len(rows) == 1 and rows[0]["status"] == "ok"
    assert (tmp_path / "fig14_time_kv-cache.png").stat().st_size > 0
    assert TINY in (tmp_path / "sweep_kv-cache.md").read_text()


# ---------------------------------------------------------------------------------------------
# bench.seqlen and bench.peers

def test_seqlen_curves_and_figure(tmp_path):
    from bench import seqlen
    todo, notes = seqlen.lengths_for("opt-125m", [512, 1024, 2048, 4096], "cpu", budget_bytes=1e12)
    assert todo == [512, 1024, 2048 - 41] and "2048 positions" in notes[0]
    todo, _ = seqlen.lengths_for("bloom-560m", [512, 16384], "cpu", budget_bytes=1e12)
    assert todo == [512, 16384]
    rows = [dict(_fake_result({"model": m, "tokens": n}, None), key=f"{m}{n}", device="cpu", tokens=n,
                 prompt_tokens=41, peak_bytes=n * (1000 if m == "opt-125m" else 0) + 500, step_s=[0.01] * (n - 1),
                 mem_trace=[0] * n)
            for m in ("rwkv-4-pile-169m", "opt-125m") for n in (16, 32)]
    paths, curves = seqlen.write_outputs(tmp_path, rows, "test")
    assert all(p.stat().st_size > 0 for p in paths)
    assert {c["model"]: c["positions"] for c in curves}["opt-125m"] == [57, 73]


def test_peers_tiny_rwkv(tmp_path):
    pytest.importorskip("rwkv")
    out = tmp_path / "peers.json"
    p = cli("bench.peers", "--model", TINY, "--tokens", "4", "--peers", "ours,blinkdl", "--json", str(out))
    assert p.returncode == 0, p.stderr
    results = json.loads(out.read_text())["results"]
    assert [r["peer"] for r in results] == ["ours", "blinkdl"] and all(r["status"] == "ok" for r in results)
    assert "ours / peer" in p.stdout


# ---------------------------------------------------------------------------------------------
# The child process

def test_child_trace_mode_records_peak_per_step():
    from bench.runner import run_child
    r = run_child({"model": TINY, "tokens": 5, "mode": "trace"}, timeout=120)
    assert r["status"] == "ok", r
    trace = r["mem_trace"]
    assert len(trace) == 5 and len(r["step_s"]) == 4
    if r["mem_method"] == "clear_refs":                               # a high-water mark never goes down
        assert all(a <= b for a, b in zip(trace, trace[1:])) and trace[-1] <= r["peak_bytes"]


def test_child_is_killed_at_the_timeout():
    from bench.runner import run_child
    r = run_child({"model": TINY, "tokens": 100_000}, timeout=1)
    assert r["status"] == "timeout" and "killed after" in r["error"]


# ---------------------------------------------------------------------------------------------
# Outputs are checked before any work; nothing partial is left

@pytest.mark.parametrize("case", ["directory", "under-a-file"])
def test_generate_checks_json_path_before_running(tmp_path, case):
    (tmp_path / "file").write_text("x")
    target = {"directory": tmp_path, "under-a-file": tmp_path / "file" / "r.json"}[case]
    p = cli("bench.generate", "--model", TINY, "--tokens", "4", "--json", str(target))
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "--json" in lines[0], p.stderr
    assert "run 1/1" not in p.stderr                                  # refused before any run
    assert sorted(x.name for x in tmp_path.iterdir()) == ["file"]     # no .r.json.PID.tmp


def test_write_json_atomic_leaves_no_temp_file_on_failure(tmp_path):
    from bench.cli import write_json_atomic
    with pytest.raises(ValueError):
        write_json_atomic(tmp_path / "r.json", {"x": float("nan")})  # allow_nan=False
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# bench.sweep arguments, lock and rows

SWEEP_BAD = {"empty-models": ["--models", ""], "zero-tokens": ["--tokens", "0"], "zero-repeats": ["--repeats", "0"],
             "negative-timeout": ["--timeout", "-1"], "negative-threads": ["--threads", "-2"],
             "negative-wait": ["--wait-quiet", "-1"], "unknown-weights": ["--weights", "int4"]}


@pytest.mark.parametrize("case", sorted(SWEEP_BAD))
def test_sweep_rejects_bad_arguments(tmp_path, case):
    out = tmp_path / "out"
    args = SWEEP_BAD[case] if case == "empty-models" else ["--models", TINY, *SWEEP_BAD[case]]
    p = cli("bench.sweep", *args, "--out", str(out), "--dry-run")
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("bench.sweep: error:"), p.stderr
    assert not out.exists()


def test_sweep_models_are_deduplicated(tmp_path):
    p = cli("bench.sweep", "--models", f"{TINY},{TINY}", "--tokens", "4", "--repeats", "1", "--out", str(tmp_path),
            "--dry-run")
    assert p.returncode == 0 and p.stdout.count(TINY) == 1, p.stdout + p.stderr
    names = sweep.expand_models("rwkv-4-pile-169m,rwkv,RWKV-4-PILE-169M", sweep.PRESETS["quick"])
    assert names[0] == "rwkv-4-pile-169m" and names.count("rwkv-4-pile-169m") == 1
    assert names == list(dict.fromkeys(names)) and "rwkv-4-pile-430m" in names
    runs, _ = sweep.plan_runs([TINY], ["cpu"], tokens=4, repeats=2, budget_bytes=1e12)
    assert len({k for k, _ in runs}) == 2


def test_sweep_refuses_an_output_directory_in_use(tmp_path):
    with sweep.locked(tmp_path):
        p = cli("bench.sweep", "--models", TINY, "--tokens", "4", "--out", str(tmp_path), "--dry-run")
    assert p.returncode == 2 and "another sweep" in p.stderr and str(os.getpid()) in p.stderr, p.stderr
    p = cli("bench.sweep", "--models", TINY, "--tokens", "4", "--out", str(tmp_path), "--dry-run")
    assert p.returncode == 0, p.stderr                                 # the lock went with its holder


@pytest.mark.parametrize("case", ["foreign-row", "out-under-a-file"])
def test_sweep_one_line_errors(tmp_path, case):
    out = tmp_path / "out"
    out.mkdir()
    (out / "runs.jsonl").write_text('{"key": "a", "model": "m", "status": "ok"}\n{"foo": 1}\n')
    (tmp_path / "file").write_text("x")
    target = out if case == "foreign-row" else tmp_path / "file" / "out"
    p = cli("bench.sweep", "--models", TINY, "--tokens", "4", "--out", str(target), "--dry-run")
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert ("line 2" in lines[0]) if case == "foreign-row" else ("not a directory" in lines[0])


def test_weight_format_counts_in_the_fit_check_and_the_run_key():
    per_block = {"int8": 32 + 2, "q5_0": 32 * 5 // 8 + 2, "q4_1": 32 * 4 // 8 + 2 + 2,  # values + fp16 scale (+ min)
                 "q4_k": 32 * 4 // 8 + 16 / 8,      # values + 16 bytes of scales per super-block of 8 blocks
                 "q5_k": 32 * 5 // 8 + 16 / 8}
    expected = {"float32": 4, "float16": 2, "bfloat16": 2, **{k: v / 32 for k, v in per_block.items()}}
    expected.update({f"{k}+cols": v for k, v in expected.items() if k in per_block})   # column scales: O(in), not O(in x out)
    assert models.WEIGHT_BYTES == expected
    n = models.n_params("rwkv-4-pile-1b5")
    assert models.estimate("rwkv-4-pile-1b5", 16, weights="int8")["params_bytes"] == int(n * 1.0625)
    assert models.estimate("rwkv-4-pile-1b5", 16, weights="bfloat16")["params_bytes"] == n * 2
    _, skipped = sweep.plan_runs(["rwkv-4-pile-1b5"], ["cpu"], tokens=16, repeats=1, budget_bytes=3e9)
    assert skipped                                                      # fp32: ~6 GB of weights
    runs, skipped = sweep.plan_runs(["rwkv-4-pile-1b5"], ["cpu"], tokens=16, repeats=1, budget_bytes=3e9, weights="int8")
    assert not skipped and runs[0][1]["weights"] == "int8" and runs[0][0].endswith("|w=int8")
    fp32_key = sweep.plan_runs([TINY], ["cpu"], 16, 1, budget_bytes=1e12)[0][0][0]
    assert fp32_key == sweep.plan_runs([TINY], ["cpu"], 16, 1, budget_bytes=1e12, weights="float32")[0][0][0]
    with pytest.raises(ValueError, match="int4"):
        models.estimate("rwkv-4-pile-169m", 16, weights="int4")


def test_weights_reach_the_loader_only_when_given(monkeypatch):
    import rwkv_engine
    calls = []
    monkeypatch.setattr(rwkv_engine, "load", lambda *a, **kw: calls.append(kw))
    models.load(TINY)
    models.load(TINY, weights="int8")
    assert "weights" not in calls[0] and calls[1]["weights"] == "int8"


# ---------------------------------------------------------------------------------------------
# Batch, token ids, progress

def test_generate_batch_and_token_ids(tmp_path):
    out = tmp_path / "r.json"
    p = cli("bench.generate", "--model", TINY, "--tokens", "6", "--batch", "2", "--repeats", "2", "--json", str(out))
    assert p.returncode == 0, p.stderr
    data = json.loads(out.read_text())
    runs, s = data["runs"], data["summary"]
    vocab = models.config(TINY).vocab_size
    for run in runs:
        assert run["batch"] == 2 and len(run["token_ids"]) == 2
        assert all(len(ids) == 6 and all(0 <= i < vocab for i in ids) for ids in run["token_ids"])
    assert runs[0]["token_ids"] == runs[1]["token_ids"]                  # same seed, same tokens
    assert runs[0]["token_ids"][0] != runs[0]["token_ids"][1]           # two streams, two samples
    assert s["aggregate_tokens_per_s"] == pytest.approx(2 * s["tokens_per_s"], rel=0.3)
    assert s["weight_format"] == "float32" and "token_ids" not in s
    assert "tokens/s, 2 streams" in p.stdout


def test_child_prints_progress_and_the_result_is_unchanged(capfd):
    from bench.runner import run_child
    r = run_child({"model": TINY, "tokens": 5, "progress_every_s": 0}, timeout=120, progress=True)
    assert r["status"] == "ok", r
    err = capfd.readouterr().err
    assert "progress: decoding 5/5 tokens" in err and len(r["token_ids"][0]) == 5


# ---------------------------------------------------------------------------------------------
# The child dies with its parent

def _children_running(pid):
    import psutil

    def is_runner(c):                   # a child that already exited (an unreaped zombie, or gone) is not
        try:
            return "bench.runner" in " ".join(c.cmdline())
        except (psutil.ZombieProcess, psutil.NoSuchProcess, psutil.AccessDenied):
            return False
    try:
        return [c for c in psutil.Process(pid).children(recursive=True) if is_runner(c)]
    except psutil.NoSuchProcess:
        return []


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM", "SIGHUP"])
def test_child_dies_with_its_parent(tmp_path, sig):
    import signal
    import time
    import psutil
    env = dict(os.environ, TMPDIR=str(tmp_path), PYTHONPATH=str(REPO))
    parent = subprocess.Popen([sys.executable, "-m", "bench.generate", "--model", TINY, "--tokens", "10000000"],
                              cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (children := _children_running(parent.pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert children, "the child never started"
    child = children[0]
    try:
        parent.send_signal(getattr(signal, sig))
        parent.wait(timeout=30)
        gone, alive = psutil.wait_procs([child], timeout=5)
        assert not alive, f"child {child.pid} outlived its parent ({sig})"
        assert list(tmp_path.iterdir()) == []                            # no temp dirs or files
        if sig != "SIGKILL":
            assert parent.returncode == 128 + getattr(signal, sig)
    finally:
        for c in [child] + _children_running(parent.pid):
            with __import__("contextlib").suppress(psutil.NoSuchProcess):
                c.kill()


# ---------------------------------------------------------------------------------------------
# Machine: bandwidth estimator and load accounting

def test_bandwidth_is_the_median_and_disagreement_is_flagged():
    from bench.machine import summarize_bandwidth
    s = summarize_bandwidth({"torch_sum": 63.5, "torch_matvec": 25.0, "numpy_sum_1thread": 25.6})
    assert s["read_bandwidth_GBps"] == 25.6 and s["bandwidth_disagree"] and s["bandwidth_spread"] == pytest.approx(2.54)
    s = summarize_bandwidth({"torch_sum": 25.0, "torch_matvec": 24.0, "numpy_sum_1thread": 26.0})
    assert s["read_bandwidth_GBps"] == 25.0 and not s["bandwidth_disagree"]


def test_bandwidth_estimator_on_a_known_timing():
    """Every timed call lasts 0.25 s by a fake clock: 4 MiB read in 0.25 s is 0.016777216 GB/s."""
    import itertools
    from bench.machine import cpu_array_bytes, measure_bandwidth
    ticks = itertools.count(0, 0.25)
    bw = measure_bandwidth("cpu", nbytes=4 << 20, repeats=2, clock=lambda: next(ticks))
    assert set(bw) == {"torch_sum", "torch_matvec", "numpy_sum_1thread"}
    assert all(v == pytest.approx(4 * 2 ** 20 / 0.25 / 1e9) for v in bw.values()), bw
    assert cpu_array_bytes(llc=260 << 20) >= 8 * (260 << 20)            # far beyond a 260 MB L3
    assert cpu_array_bytes(llc=8 << 20) == 1 << 30
    assert cpu_array_bytes(llc=260 << 20, ram=4 << 30) == 1 << 30        # never above a quarter of RAM


def test_others_share_formula():
    from bench.cpuload import busy_warning, others_share
    s = others_share(busy_before=100.0, busy_after=103.0, own_before=10.0, own_after=11.0, wall_s=2.0, cpus=2)
    assert s == {"others_cpu_s": pytest.approx(2.0), "others_cpu_pct": pytest.approx(50.0)}
    assert others_share(100.0, 101.0, 10.0, 11.0, 2.0, 2)["others_cpu_pct"] == 0.0
    # a short run whose tick-rounded counters say others used more than the whole machine: clamped
    short = others_share(busy_before=100.0, busy_after=100.12, own_before=10.0, own_after=10.0, wall_s=0.05, cpus=2)
    assert short["others_cpu_pct"] == 100.0 and short["others_cpu_s"] == pytest.approx(0.1)
    assert "WARNING" in busy_warning(50.0) and busy_warning(1.0) == ""


def test_others_meter_sees_a_busy_process_and_not_itself():
    import time
    from bench.cpuload import OthersMeter
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        meter = OthersMeter().start()
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 1.5:                              # busy ourselves too
            pass
        got = meter.stop()
    finally:
        spinner.kill()
        spinner.wait()
    assert got["others_cpu_s"] >= 0.3 * 1.5, got                        # the spinner, at least in part
    assert got["loadavg_1m"] is not None


def test_wait_quiet_is_bounded():
    from bench.cpuload import wait_quiet

    class Meter:
        def __init__(self, pcts):
            self.pcts = iter(pcts)

        def start(self):
            return self

        def stop(self):
            return {"others_cpu_pct": next(self.pcts)}

    assert wait_quiet(60, sleep=lambda s: None, meter=Meter([80, 40, 2])) == (True, 2)
    assert wait_quiet(0, sleep=lambda s: None, meter=Meter([80, 80])) == (False, 80)


def test_generate_records_machine_load(tmp_path):
    out = tmp_path / "r.json"
    p = cli("bench.generate", "--model", TINY, "--tokens", "4", "--json", str(out))
    assert p.returncode == 0, p.stderr
    run = json.loads(out.read_text())["runs"][0]
    assert 0 <= run["others_cpu_pct"] <= 100 and run["others_cpu_s"] >= 0 and run["loadavg_1m"] >= 0
    assert "machine load" in p.stdout


def test_paper_prompt_length_is_the_named_constant():
    from bench import DRAGON_PROMPT, PROMPT_TOKENS
    from rwkv_engine import tokenizer
    assert len(tokenizer().encode(DRAGON_PROMPT)) == PROMPT_TOKENS


def test_no_import_cycle_in_bench():
    """Every bench module imports alone, in a fresh interpreter, with no lazy import of a module
    that imports it back (checked from the source: bench.X -> bench.Y edges, lazy ones included)."""
    import ast
    edges = {}
    for path in (REPO / "bench").glob("*.py"):
        mod = f"bench.{path.stem}"
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bench"):
                deps |= {node.module} if node.module != "bench" else {f"bench.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("bench.")}
        edges[mod] = {d for d in deps if (REPO / (d.replace(".", "/") + ".py")).exists()} - {mod}

    def reaches(start, target, seen=()):
        return any(d == target or (d not in seen and reaches(d, target, seen + (d,))) for d in edges.get(start, ()))
    cycles = [m for m in edges if reaches(m, m)]
    assert not cycles, {m: sorted(edges[m]) for m in cycles}


def test_modes_against_alternates_two_formats_and_prints_their_ratio(monkeypatch, capsys):
    """The two models' forwards alternate, and the printed rates and ratio come from the timed runs: a
    fake clock makes every int8 forward take 1 s and every float32 forward 4 s."""
    import time

    from bench import modes
    clock, loaded, calls = [0.0], [], []
    real_load = models.load

    def load(*a, **kw):
        m = real_load(*a, **kw)
        loaded.append((kw.get("weights") or "float32", m))
        forward = m.forward

        def timed_forward(*fa, **fkw):
            calls.append(kw.get("weights") or "float32")
            clock[0] += 1.0 if kw.get("weights") == "int8" else 4.0
            return forward(*fa, **fkw)
        m.forward = timed_forward
        return m
    monkeypatch.setattr(models, "load", load)
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    assert modes.main(["--model", TINY, "--weights", "int8", "--against", "float32", "--prompt-tokens", "16",
                       "--repeats", "3"]) == 0
    assert calls == ["int8", "float32"] + ["int8", "float32"] * 3          # warm-ups, then alternating
    out = capsys.readouterr().out
    m = re.search(r"int8 weights: ([\d.]+) tok/s; float32 weights: ([\d.]+) tok/s; ratio ([\d.]+)", out)
    assert m and [float(v) for v in m.groups()] == [16.0, 4.0, 4.0]
    assert f"{TINY} (synthetic weights), 16-token prompt" in out, out
    bad = cli("bench.modes", "--model", TINY, "--against", "int4")
    assert bad.returncode == 2 and "--against" in bad.stderr


def test_modes_chunks_times_short_chunk_kernels_against_the_gemm():
    r = cli("bench.modes", "--model", TINY, "--chunks", "2,40", "--repeats", "1")
    assert r.returncode == 0, r.stderr
    rows = re.findall(r"^\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", r.stdout, re.M)
    assert [int(t) for t, *_ in rows] == [2, 40], r.stdout
    for _, a, per_op, b, ratio in rows:                              # C step, per-op kernels, GEMM, GEMM / C step
        a, per_op, b, ratio = float(a), float(per_op), float(b), float(ratio)   # printed to 0.1 ms and 0.01
        assert a > 0 and per_op > 0 and b > 0 and abs(ratio * a - b) <= 0.06 * (1 + ratio) + 0.01 * a
    from rwkv_kernels import cpu_c, dispatch
    assert f"float32's short rows for the {cpu_c.best_isa()} build: at most {dispatch.short_rows('float32')} (" in r.stdout
    assert f"{TINY} (synthetic weights, float32 weights)" in r.stdout and "of the CPU meanwhile" in r.stdout
    bad = cli("bench.modes", "--model", TINY, "--chunks", "0,4")
    assert bad.returncode == 2 and "--chunks" in bad.stderr


def test_modes_step_rows_times_the_c_step_at_each_rows_per_call(monkeypatch, capsys):
    from bench import modes
    from rwkv_kernels import decode
    seen, real = [], decode.sequence_layers_c

    def spy(plan, x, *a, **kw):                    # the calls the C step makes for its pieces
        seen.append((decode.STEP_ROWS, x.shape[1]))
        return real(plan, x, *a, **kw)
    monkeypatch.setattr(decode, "sequence_layers_c", spy)
    before = decode.STEP_ROWS
    assert modes.main(["--model", TINY, "--chunks", "40", "--step-rows", "8,1000", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "C step, 8 a call (ms)" in out and "C step, 1000 a call (ms)" in out
    row = re.search(r"^\s+40((?:\s+[\d.]+){6})$", out, re.M)
    assert row and all(float(v) > 0 for v in row.group(1).split()), out
    assert (8, 8) in seen and not any(rows == 1000 for rows, _ in seen)     # 40 rows: 5 calls of 8, or one
    assert decode.STEP_ROWS == before
    bad = cli("bench.modes", "--model", TINY, "--step-rows", "8")
    assert bad.returncode == 2 and "--step-rows goes with --chunks" in bad.stderr


def test_a_packed_file_run_without_weights_records_its_own_format(tiny_pth, tmp_path):
    """The runner records the model's own format (before: spec["weights"] or the dtype, so a packed
    int8 file run without --weights was labelled float32); provenance has a word of its own."""
    from bench.runner import run_child
    from rwkv_engine.convert import main as convert_main
    packed = tmp_path / "tiny-int8.safetensors"
    assert convert_main([str(tiny_pth), str(packed), "--weights", "int8"]) == 0
    r = run_child({"model": str(packed), "tokens": 2}, timeout=120)
    assert r["status"] == "ok", r
    assert r["weight_format"] == "int8" and r["dtype"] == "float32"
    assert r["provenance"] == str(packed) == r["weights"]                      # the former key stays


# ---------------------------------------------------------------------------------------------
# bench.formats

def test_formats_table_alternates_each_format_with_float32(tmp_path):
    out, md = tmp_path / "f.json", tmp_path / "f.md"
    r = cli("bench.formats", "--model", TINY, "--formats", "int8,q4_k", "--batch", "1,3", "--repeats", "1",
            "--steps", "2", "--json", str(out), "--md", str(md))
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert data["synthetic"] is True and data["model"] == TINY and data["isa"] in ("avx2", "avx512")
    assert "family" in data["cpu"] or data["cpu"]                     # the CPU is named
    assert [(row["format"], row["streams"]) for row in data["rows"]] == [("int8", 1), ("int8", 3), ("q4_k", 1), ("q4_k", 3)]
    for row in data["rows"]:
        assert row["tokens_per_s"] > 0 and row["float32_tokens_per_s"] > 0 and row["weight_mb_per_step"] > 0
        assert abs(row["ratio"] - row["tokens_per_s"] / row["float32_tokens_per_s"]) < 1e-9
        pair = row["ratio_rounds"]                                # one round: its own ratio, the same as the row's
        assert pair["q1"] == pair["median"] == pair["q3"] == pytest.approx(row["ratio"], rel=1e-9)
    assert "synthetic weights" in r.stdout.splitlines()[0] and "synthetic weights" in md.read_text()
    table = [line.split() for line in r.stdout.splitlines() if line.split() and line.split()[0] in ("int8", "q4_k")]
    assert len(table) == 4 and all(abs(float(t[4]) - row["ratio"]) < 0.006 for t, row in zip(table, data["rows"]))
    assert md.read_text().count("\n| q4_k |") == 2


def test_formats_refuses_unknown_formats_and_stream_counts():
    bad = cli("bench.formats", "--model", TINY, "--formats", "int4")
    assert bad.returncode == 2 and "--formats" in bad.stderr and "int4" in bad.stderr
    bad = cli("bench.formats", "--model", TINY, "--batch", "0")
    assert bad.returncode == 2 and "--batch" in bad.stderr
    bad = cli("bench.formats", "--model", "pythia-160m")
    assert bad.returncode == 2 and "RWKV" in bad.stderr


# ---------------------------------------------------------------------------------------------
# bench.products

def test_products_alternates_two_kernel_sources_and_compares_their_bits():
    src = REPO / "rwkv_kernels" / "csrc"
    r = cli("bench.products", "--model", TINY, "--formats", "float32,bfloat16", "--batch", "1,5", "--repeats", "2",
            "--layers", "1", "--against-src", str(src))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "random weights" in lines[0] and "8 products" in lines[0] and "alternating" in lines[0]
    rows = [line.split() for line in lines[2:]]
    assert [(row[0], row[1]) for row in rows] == [("float32", "1"), ("float32", "5"), ("bfloat16", "1"), ("bfloat16", "5")]
    for row in rows:
        assert float(row[2]) > 0 and float(row[3]) > 0
        assert row[5] == "yes"                                    # the same source gives the same bits
        cur, ag, ratio = float(row[2]), float(row[3]), float(row[4])
        rounding = 0.005 + ratio * (0.005 / cur + 0.005 / ag)             # the ms columns have 2 decimals
        assert abs(ratio - ag / cur) <= rounding + 1e-9, row
        mid, (q1, q3) = float(row[6]), map(float, row[7].strip("()").split("-"))
        assert 0 < q1 <= mid <= q3, row                              # the rounds' own ratios and quartiles


def test_products_paired_ratio_is_the_median_of_the_rounds_own_ratios():
    from bench.products import paired
    # round ratios 1.1, 0.9, 1.3, 1.0, 1.2: median 1.1; quartiles (inclusive) 1.0 and 1.2. The ratio of
    # the medians (1.1 / 1.0 here) can differ from it: a slow round moves both halves of its pair.
    times = {"current": [1.0, 2.0, 1.0, 3.0, 1.0], "against": [1.1, 1.8, 1.3, 3.0, 1.2]}
    assert paired(times) == "1.100 (1.000-1.200)"
    assert paired({"current": [2.0], "against": [3.0]}) == "1.500 (1.500-1.500)"
    from bench.cli import paired_ratio
    with pytest.raises(ValueError):
        paired_ratio([], [])


def test_products_builds_the_other_folder_with_its_own_headers(tmp_path):
    # The same cpu_ops.c beside a changed header is another build: the build cache's key covers the
    # headers of the source's own folder (which its #include "..." finds first), not only csrc/'s.
    import shutil
    other = tmp_path / "csrc"
    shutil.copytree(REPO / "rwkv_kernels" / "csrc", other)
    header = other / "quant_ops.h"
    text = header.read_text()
    assert text.count("return _mm_cvtss_f32(") == 1             # hsum8_fixed, the int8 kernels' last sum
    header.write_text(text.replace("return _mm_cvtss_f32(", "return 1.0f + _mm_cvtss_f32("))
    r = cli("bench.products", "--model", TINY, "--formats", "int8", "--batch", "1", "--repeats", "1",
            "--layers", "1", "--against-src", str(other))
    assert r.returncode == 0, r.stderr
    row = r.stdout.splitlines()[2].split()
    assert row[0] == "int8" and row[5] == "no", r.stdout


def test_products_per_shape_times_each_shape_resident_and_streamed():
    src = REPO / "rwkv_kernels" / "csrc"
    r = cli("bench.products", "--model", TINY, "--formats", "int8", "--batch", "2", "--repeats", "1",
            "--layers", "1", "--per-shape", "--against-src", str(src))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "random weights" in lines[0] and "streamed past 2 x L3" in lines[0]
    assert lines[-1].startswith("others' CPU over the whole table: ")
    rows = [line.split() for line in lines[2:-1]]
    C, F, V = 64, 256, 50277                                        # rwkv-4-tiny: n_embd, ffn, vocab
    shapes = [f"{C}x{C}", f"{F}x{C}", f"{C}x{F}", f"{V}x{C}"]
    assert [(row[2], row[3]) for row in rows] == [(s, w) for s in shapes for w in ("resident", "streamed")]
    for row in rows:
        o, i = map(int, row[2].split("x"))
        ms, gmac = float(row[4]), float(row[5])
        assert ms > 0 and abs(gmac - o * i * 2 / (ms * 1e-3) / 1e9) <= 0.051 + gmac * 0.0005 / ms, row
        assert row[8] == "yes"                                          # clones of one copy: the same bits


def test_products_refuses_bad_input_in_one_line(tmp_path):
    for args, word in ((["--against-src", str(tmp_path)], "cpu_ops.c"), (["--formats", "q4_k"], "--formats"),
                       (["--model", "pythia-160m"], "RWKV"), (["--batch", "0"], "--batch")):
        bad = cli("bench.products", "--model", TINY, *args) if "--model" not in args else cli("bench.products", *args)
        assert bad.returncode == 2 and word in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, (args, bad.stderr)


# ---------------------------------------------------------------------------------------------
# bench.ceiling

def test_ceiling_kernels_compute_the_products_they_time():
    # each kernel's accumulators add up to reps x the sum of its rows' dot products with its streams
    # (numpy, exactly for the integer ones): the timed loops do the work they are said to do
    from bench import ceiling
    from rwkv_kernels import cpu_c
    isas = [i for i in ("avx2", "avx512") if i in cpu_c.supported_isas()]
    assert isas, "the kernels need AVX2"
    for isa in isas:
        lib = ceiling._lib(isa)
        for build, name, _, rows, streams, kind in ceiling.KERNELS:
            if build != isa:
                continue
            w, x = ceiling.operands(kind, rows, streams, n=256, seed=3)    # the scaled loop: 256 a step
            total, sec = ceiling.run_kernel(lib, name, kind, w, x, 3)
            want = ceiling.expected_sum(kind, w, x, 3)
            assert sec >= 0
            if kind == "f32":
                assert abs(total - want) <= 1e-4 * (1 + abs(want)), (name, total, want)
            else:       # integers; i8xors: block dots times scales of 1 in float32, exact at this size
                assert total == want, (name, total, want)


def test_ceiling_prints_every_build_with_float32_as_its_unit():
    from rwkv_kernels import cpu_c
    r = cli("bench.ceiling", "--seconds", "0.05", "--rounds", "2")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "one core" in lines[0] and "L1" in lines[0]
    rows = [line.split() for line in lines[2:]]
    builds = [i for i in ("avx2", "avx512") if i in cpu_c.supported_isas()]
    from bench import ceiling
    assert sorted({row[0] for row in rows}) == sorted(builds)
    assert len(rows) == sum(k[0] in builds for k in ceiling.KERNELS)      # avx2: 5 rows, avx512: 2
    for row in rows:
        gmacs, ratio = float(row[-3]), float(row[-2])
        assert gmacs > 0 and ratio > 0
        if row[1] == "float32":
            assert ratio == 1.0


def test_ceiling_refuses_bad_input_in_one_line():
    import os
    env = {**os.environ, "RWKV_ENGINE_CPU_FEATURES": "avx2,fma,f16c"}     # an AVX2-only CPU
    r = subprocess.run([sys.executable, "-m", "bench.ceiling", "--isa", "avx512"], capture_output=True, text=True,
                       cwd=REPO, timeout=120, env=env)
    assert r.returncode == 2 and "avx512" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    for args, word in ((["--seconds", "0"], "--seconds"), (["--rounds", "0"], "--rounds"), (["--isa", "sse"], "--isa")):
        bad = cli("bench.ceiling", *args)
        assert bad.returncode == 2 and word in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, (args, bad.stderr)
