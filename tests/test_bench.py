"""The benchmark harness (bench/): output schema, the memory meter, the sweep's resume and skip
rules, figures, and one-line errors. Tiny models only (rwkv-4-tiny and a 2-layer Pythia-shaped
checkpoint); every CLI runs as a subprocess, as a user would run it."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import memory, models, sweep
from bench.machine import cache_path, default_threads

REPO = Path(__file__).resolve().parent.parent
TINY = "rwkv-4-tiny"


@pytest.fixture(scope="module", autouse=True)
def fake_machine(tmp_path_factory):
    """A cached machine measurement in a private folder, so no test spends seconds measuring
    bandwidth (and the real cache is left alone)."""
    old = os.environ.get("BENCH_MACHINE_CACHE")
    os.environ["BENCH_MACHINE_CACHE"] = str(tmp_path_factory.mktemp("machine"))
    path = cache_path("cpu", default_threads())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "hostname": "test", "device": "cpu", "device_name": "test cpu", "threads": default_threads(),
        "read_bandwidth_GBps": 20.0, "read_bandwidth_method": "torch_sum",
        "bandwidth_by_method_GBps": {"torch_sum": 20.0}, "gemm_fp32_GFLOPs": 100.0,
        "memory_total_bytes": 8 << 30}))
    yield
    if old is None:
        del os.environ["BENCH_MACHINE_CACHE"]
    else:
        os.environ["BENCH_MACHINE_CACHE"] = old


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


@pytest.mark.parametrize("case", ["unknown-model", "zero-tokens", "cuda", "missing-checkpoint", "bad-checkpoint"])
def test_generate_bad_arguments(tmp_path, case):
    if case == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    args = {"unknown-model": ["--model", "rwkv-9-nope"], "zero-tokens": ["--model", TINY, "--tokens", "0"],
            "cuda": ["--model", TINY, "--device", "cuda"],
            "missing-checkpoint": ["--model", TINY, "--checkpoint", str(tmp_path / "absent.pth")],
            "bad-checkpoint": ["--model", TINY, "--checkpoint", str(bad), "--tokens", "4"]}[case]
    out = tmp_path / "r.json"
    p = cli("bench.generate", *args, "--json", str(out))
    assert p.returncode == 2
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("bench.generate: error:"), p.stderr
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


def test_sampler_overhead_reports_a_ratio():
    ratio, plain, sampled = memory.sampler_overhead(lambda: sum(range(20000)), repeats=3)
    assert ratio > 0 and plain > 0 and sampled > 0


# ---------------------------------------------------------------------------------------------
# bench.sweep: planning, resume, outputs

def test_sweep_skips_what_does_not_fit():
    runs, skipped = sweep.plan(["rwkv-4-pile-169m", "rwkv-4-pile-14b", "opt-13b"], ["cpu"], tokens=512, repeats=2,
                               budget_bytes=2e9)
    assert {s["model"] for s in skipped} == {"rwkv-4-pile-14b", "opt-13b"}
    assert all("GB" in s["reason"] and "needs" in s["reason"] for s in skipped)
    assert [spec["model"] for _, spec in runs] == ["rwkv-4-pile-169m"] * 2
    _, skipped = sweep.plan(["opt-125m"], ["cpu"], tokens=4096, repeats=1, budget_bytes=1e12)
    assert "max positions" in skipped[0]["reason"]


def _fake_result(spec, timeout):
    return {"status": "ok", "model": spec["model"], "family": models.family_of(spec["model"]),
            "total_s": 1.0 + spec["tokens"] / 100, "prefill_s": 0.1, "decode_s": 0.9, "tokens_per_s": 10.0,
            "decode_tokens_per_s": 11.0, "weight_GBps": 1.0, "peak_bytes": 1000, "mem_method": "clear_refs",
            "expected_runtime_bytes": 100, "synthetic": True, "threads": 2, "step_s": [0.1] * 3}


def test_sweep_resume_loses_and_duplicates_nothing(tmp_path):
    names = ["rwkv-4-pile-169m", "pythia-160m", "opt-125m"]
    runs, _ = sweep.plan(names, ["cpu"], tokens=16, repeats=2, budget_bytes=1e12)
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
    runs, _ = sweep.plan(["rwkv-4-pile-169m", "rwkv-4-pile-430m", "pythia-160m", "bloom-560m"], ["cpu"], tokens=16,
                         repeats=1, budget_bytes=1e12)
    results = tmp_path / "runs.jsonl"
    sweep.execute(runs, results, runner=_fake_result, progress=False)
    sweep.append_row(results, {"key": "x", "model": "opt-125m", "device": "cpu", "tokens": 16, "protocol": "kv-cache",
                               "status": "timeout", "error": "killed after 5 s"})
    machines = {"cpu": json.loads(cache_path("cpu", default_threads()).read_text())}
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
    from bench._run_one import run_child
    r = run_child({"model": TINY, "tokens": 5, "mode": "trace"}, timeout=120)
    assert r["status"] == "ok", r
    trace = r["mem_trace"]
    assert len(trace) == 5 and len(r["step_s"]) == 4
    if r["mem_method"] == "clear_refs":                               # a high-water mark never goes down
        assert all(a <= b for a, b in zip(trace, trace[1:])) and trace[-1] <= r["peak_bytes"]


def test_child_is_killed_at_the_timeout():
    from bench._run_one import run_child
    r = run_child({"model": TINY, "tokens": 100_000}, timeout=1)
    assert r["status"] == "timeout" and "killed after" in r["error"]
