"""Issue 19, round 3: what the outputs of a run say about themselves (synthetic weights, busy
machines, a suspect bandwidth baseline), where the tests write, and one JSON schema for
bench.generate with and without --pipeline."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# The test suite's cache

def project_cache_dirs():
    """Every place the project writes generated files to."""
    import rwkv_kernels.cpu_c
    from bench import machine, peers
    from rwkv_engine import files
    return {"files.cache_dir": files.cache_dir(), "kernels": rwkv_kernels.cpu_c._cache_dir(),
            "bench.machine": machine.machine_cache_dir(), "bench.peers": peers._rwkv_cache()}


def test_the_cache_in_use_is_under_pytests_tmp_dir(tmp_path_factory):
    root = Path(os.environ.get("RWKV_ENGINE_TEST_CACHE") or tmp_path_factory.getbasetemp()).resolve()
    for what, path in project_cache_dirs().items():
        assert path.resolve().is_relative_to(root), f"{what} writes to {path}, outside {root}"


def test_the_users_cache_variables_do_not_reach_the_tests(tmp_path):
    """A user (or CI) with RWKV_ENGINE_CACHE / BENCH_MACHINE_CACHE set: the suite still writes only
    under its own temporary directory."""
    user = tmp_path / "user-cache"
    env = {k: v for k, v in os.environ.items() if k != "RWKV_ENGINE_TEST_CACHE"}
    env.update(RWKV_ENGINE_CACHE=str(user), BENCH_MACHINE_CACHE=str(user / "machine"), PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp",
                        str(tmp_path / "inner"), f"{__file__}::test_the_cache_in_use_is_under_pytests_tmp_dir"],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert not user.exists()


# ---------------------------------------------------------------------------------------------
# The bandwidth baseline: never cached when measured busy or with disagreeing methods

class FakeMeter:
    """OthersMeter stand-in: each start()/stop() pair reports the next share of the CPU."""

    def __init__(self, shares):
        self.shares = shares

    def __call__(self):
        return self

    def start(self):
        return self

    def stop(self):
        return {"others_cpu_s": 0.0, "others_cpu_pct": self.shares.pop(0), "loadavg_1m": 0.0}


@pytest.fixture
def fake_measurements(monkeypatch, tmp_path):
    """bench.machine with its measuring functions replaced: no real bandwidth runs."""
    from bench import machine
    monkeypatch.setenv("BENCH_MACHINE_CACHE", str(tmp_path / "machine"))
    monkeypatch.setattr(machine, "measure_gemm", lambda device: 100.0)
    monkeypatch.setattr(machine, "set_threads", lambda n: None)

    def setup(bandwidths, shares):
        monkeypatch.setattr(machine, "measure_bandwidth", lambda device: bandwidths.pop(0))
        monkeypatch.setattr(machine, "OthersMeter", FakeMeter(shares))
    return machine, setup


AGREE = {"torch_sum": 20.0, "torch_matvec": 21.0, "numpy_sum_1thread": 19.5}
DISAGREE = {"torch_sum": 14.0, "torch_matvec": 23.1, "numpy_sum_1thread": 20.5}      # 1.65x


@pytest.mark.parametrize("case", ["busy", "disagree"])
def test_a_suspect_bandwidth_is_measured_again_and_never_cached(fake_measurements, case, capsys):
    machine, setup = fake_measurements
    first = AGREE if case == "busy" else DISAGREE
    share = 48.0 if case == "busy" else 1.0
    setup([dict(first), dict(first)], [share, share])
    m = machine.measure_and_cache("cpu", 2)
    path = machine.cache_path("cpu", 2)
    assert not path.parent.exists() or list(path.parent.iterdir()) == []
    assert m["baseline_problem"] == machine.baseline_problem(m) != ""
    assert ("48% of the CPU" if case == "busy" else "disagreed 1.65x") in m["baseline_problem"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not cached" in err[0] and "suspect" in err[0]
    assert "suspect" in machine.describe(m)


def test_a_clean_second_measurement_is_the_one_cached(fake_measurements):
    machine, setup = fake_measurements
    setup([dict(AGREE), dict(AGREE)], [48.0, 0.5])               # busy, then quiet
    m = machine.measure_and_cache("cpu", 2)
    assert m["measured_others_cpu_pct"] == 0.5 and m["baseline_problem"] == ""
    assert machine.read_cached(machine.cache_path("cpu", 2)) == m


def test_a_suspect_or_unmetered_cache_file_is_measured_again(fake_measurements):
    import json
    machine, _ = fake_measurements
    path = machine.cache_path("cpu", 2)
    path.parent.mkdir(parents=True)
    clean = {"read_bandwidth_GBps": 20.0, "bandwidth_spread": 1.05, "bandwidth_disagree": False,
             "measured_others_cpu_pct": 1.0}
    for record, usable in ((clean, True), ({**clean, "measured_others_cpu_pct": 50.0}, False),
                           ({**clean, "bandwidth_spread": 1.65, "bandwidth_disagree": True}, False),
                           ({k: v for k, v in clean.items() if k != "measured_others_cpu_pct"}, False)):
        path.write_text(json.dumps(record))
        assert (machine.read_cached(path) is not None) == usable, record


def test_a_full_cache_disk_is_one_line_naming_the_folder_and_leaves_nothing(fake_measurements, monkeypatch, capsys):
    import errno
    machine, setup = fake_measurements
    setup([dict(AGREE)], [0.0])
    real_write_text = Path.write_text

    def disk_fills_up(self, text, *args, **kwargs):
        real_write_text(self, text[:10])                          # a partial temporary, then ENOSPC
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Path, "write_text", disk_fills_up)
    m = machine.measure_and_cache("cpu", 2)
    monkeypatch.setattr(Path, "write_text", real_write_text)
    folder = machine.cache_path("cpu", 2).parent
    assert m["read_bandwidth_GBps"] == 20.0                       # the run goes on with the measurement
    assert list(folder.iterdir()) == []                          # no temporary left behind
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cache folder {folder} is full" in err[0], err


def test_get_turns_a_failed_child_into_one_line(fake_measurements, monkeypatch):
    machine, _ = fake_measurements
    monkeypatch.setattr(machine.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 1, "", "Traceback (most recent call last):\n  ...\nMemoryError\n"))
    with pytest.raises(machine.MachineError, match=r"^measuring the cpu bandwidth failed: MemoryError$"):
        machine.get("cpu", 2)


def test_get_returns_an_uncached_measurement_from_the_child(fake_measurements, monkeypatch, capsys):
    import json
    machine, _ = fake_measurements
    m = {"read_bandwidth_GBps": 9.0, "baseline_problem": "measured while other processes used 50% of the CPU"}
    monkeypatch.setattr(machine.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 0, json.dumps(m) + "\n", "bench.machine: warning: ... not cached\n"))
    assert machine.get("cpu", 2) == m
    assert "not cached" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Tables that divide by the baseline

def machine_record(**over):
    return {"device": "cpu", "device_name": "test cpu", "threads": 2, "hostname": "h", "read_bandwidth_GBps": 20.5,
            "bandwidth_by_method_GBps": DISAGREE, "bandwidth_spread": 1.65, "bandwidth_disagree": True,
            "measured_others_cpu_pct": 48.0, "gemm_fp32_GFLOPs": 100.0, "last_level_cache_bytes": 32 << 20,
            "memory_total_bytes": 8 << 30, **over}


def sweep_row(model="rwkv-4-pile-169m", **over):
    from bench import models
    return {"key": model, "model": model, "device": "cpu", "tokens": 16, "protocol": "kv-cache", "status": "ok",
            "total_s": 2.0, "prefill_s": 0.2, "decode_s": 1.8, "tokens_per_s": 8.0, "decode_tokens_per_s": 8.3,
            "weight_GBps": 23.4, "weight_bytes_per_token": 2 * models.n_params(model), "peak_bytes": 10 ** 6,
            "mem_method": "clear_refs", "expected_runtime_bytes": 10 ** 5, "synthetic": True, "threads": 2,
            "others_cpu_pct": 1.0, **over}


def test_the_sweep_table_flags_a_suspect_baseline_and_says_why_a_share_is_above_100(tmp_path):
    from bench import sweep
    rows = [sweep_row(), sweep_row("pythia-160m", weight_GBps=10.0)]
    sweep.write_outputs(tmp_path, rows, [], "kv-cache", {"cpu": machine_record()})
    md = (tmp_path / "sweep_kv-cache.md").read_text()
    assert "suspect baseline: measured while other processes used 48% of the CPU; its methods disagreed 1.65x" in md
    assert "23.4 (114%, suspect baseline, above 100%: faster than the measured baseline" in md
    assert "10.0 (49%, suspect baseline)" in md
    assert "114%)" not in md


def test_a_share_above_100_of_a_clean_baseline_still_says_why():
    from bench.machine import share_caveats
    clean = machine_record(bandwidth_disagree=False, bandwidth_spread=1.05, measured_others_cpu_pct=1.0)
    assert share_caveats(90, clean, 10 ** 9) == []
    assert share_caveats(114, clean, 10 ** 9) == ["above 100%: faster than the measured baseline, so the baseline "
                                                 "is too low"]
    assert share_caveats(900, clean, 10 ** 6) == ["above 100%: the weights fit in the last-level cache"]


def test_the_generate_table_flags_a_suspect_baseline():
    from bench.generate import add_machine_share, table
    s = {"model": "rwkv-4-pile-169m", "family": "rwkv", "protocol": "recurrent", "n_params": 169_000_000,
         "synthetic": True, "source": "x.pth", "weights": "synthetic", "device": "cpu", "dtype": "float32",
         "weight_format": "float32", "threads": 2, "prompt_tokens": 41, "prompt_note": "20B tokenizer",
         "prefill_s": 0.1, "decode_s": 1.0, "new_tokens": 8, "total_s": 1.1, "tokens_per_s": 7.0,
         "decode_tokens_per_s": 7.0, "batch": 1, "weight_GBps": 23.4, "weight_bytes_per_token": 677_000_000,
         "peak_bytes": 1000, "mem_method": "clear_refs", "expected_runtime_bytes": 100, "others_cpu_pct": None,
         "repeats": 1}
    text = table(add_machine_share(s, machine_record()))
    line = next(ln for ln in text.splitlines() if ln.startswith("weight bandwidth"))
    assert "114% of 20.5 GB/s measured; suspect baseline; above 100%: faster than the measured baseline" in line
    assert re.search(r"^bandwidth baseline +suspect: measured while other processes used 48% of the CPU", text, re.M)


# ---------------------------------------------------------------------------------------------
# Synthetic weights and busy runs in the sweep's table and figures

def summary_rows():
    """Summary rows as bench.sweep.summarize gives them: two quiet, two busy, one failed, one real."""
    from bench import models, sweep
    rows = [sweep_row("rwkv-4-pile-169m"), sweep_row("rwkv-4-pile-430m", others_cpu_pct=48.0),
            sweep_row("pythia-160m"), sweep_row("pythia-410m", others_cpu_pct=51.0),
            {"key": "x", "model": "opt-125m", "device": "cpu", "tokens": 16, "protocol": "kv-cache",
             "status": "timeout", "error": "killed after 5 s"}]
    summary = sweep.summarize(rows, "kv-cache")
    assert {r["model"] for r in summary} == {r["model"] for r in rows} and models.RWKV
    return summary


def figure_texts(fig):
    """The title and footnotes: every text placed on the figure itself (not in a panel)."""
    return " ".join(t.get_text() for t in fig.texts)


def hollow_points(fig):
    """(x, y) of every point drawn with a hollow marker, per panel."""
    return [sorted((x, y) for line in ax.get_lines() if line.get_markerfacecolor() == "white"
                   for x, y in zip(line.get_xdata(), line.get_ydata())) for ax in fig.axes]


@pytest.mark.parametrize("kind", ["memory", "time"])
def test_sweep_figures_say_synthetic_and_draw_busy_runs_hollow(kind):
    import matplotlib.pyplot as plt
    from bench import models, plots
    summary = summary_rows()
    fig = plots.sweep_figure(summary, kind, "kv-cache")
    try:
        text = figure_texts(fig)
        assert "[synthetic weights]" in fig._suptitle.get_text()
        assert "Synthetic weights (random values in each release's shapes" in text and "every model" in text
        assert "Hollow markers: other processes used more than 5% of the CPU" in text
        y = (lambda r: r["peak_bytes"] / 1e6) if kind == "memory" else (lambda r: r["total_s"])
        busy = sorted((models.n_params(m), y(r)) for r in summary for m in [r["model"]]
                      if m in ("rwkv-4-pile-430m", "pythia-410m"))
        cpu, gpu = hollow_points(fig)
        assert cpu == busy and gpu == []
    finally:
        plt.close(fig)


def test_a_quiet_sweep_on_real_weights_has_no_footnotes():
    import matplotlib.pyplot as plt
    from bench import plots, sweep
    summary = sweep.summarize([sweep_row("rwkv-4-pile-169m", synthetic=False), sweep_row("pythia-160m",
                                                                                        synthetic=False)], "kv-cache")
    fig = plots.sweep_figure(summary, "time", "kv-cache")
    try:
        assert [t for t in fig.texts if t is not fig._suptitle] == [] and "synthetic" not in figure_texts(fig)
        assert hollow_points(fig) == [[], []]
    finally:
        plt.close(fig)


def test_mixed_weights_name_the_synthetic_models():
    from bench import plots
    rows = [sweep_row("rwkv-4-pile-169m", synthetic=False), sweep_row("pythia-160m")]
    note = plots.synthetic_note(rows)
    assert note.startswith("Synthetic weights") and "for pythia-160m:" in note
    assert not plots.all_synthetic(rows)


def test_the_sweep_markdown_says_synthetic(tmp_path):
    from bench import sweep
    paths, _ = sweep.write_outputs(tmp_path, [sweep_row("rwkv-4-pile-169m"), sweep_row("pythia-160m")], [], "kv-cache",
                                   {})
    md = (tmp_path / "sweep_kv-cache.md").read_text()
    assert "**Synthetic weights (random values in each release's shapes, not the trained weights) for every model" in md
    assert all(p.stat().st_size > 0 for p in paths)


# ---------------------------------------------------------------------------------------------
# bench.generate --json: one schema with and without --pipeline

FROM_THE_MACHINE = {"machine_read_GBps", "bandwidth_pct", "bandwidth_note", "baseline_problem"}


@pytest.fixture
def quiet_machine(tmp_path, monkeypatch):
    """A cached clean measurement, so bench.generate measures no bandwidth."""
    import json
    from bench.machine import cache_path
    from rwkv_engine.process import usable_cores
    monkeypatch.setenv("BENCH_MACHINE_CACHE", str(tmp_path / "machine"))
    path = cache_path("cpu", usable_cores())
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(machine_record(threads=usable_cores(), bandwidth_spread=1.0, bandwidth_disagree=False,
                                              measured_others_cpu_pct=0.0)))


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_generate_json_has_one_schema_with_and_without_pipeline(tmp_path, quiet_machine):
    """A one-rank pipeline (the environment torchrun would give it) against the single-process run."""
    import json
    common = ["-m", "bench.generate", "--model", "rwkv-4-tiny", "--tokens", "4", "--batch", "2"]
    rank0 = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=str(free_port()), PYTHONPATH=str(REPO))
    docs = {}
    for name, extra, env in (("plain", [], None), ("piped", ["--pipeline"], rank0)):
        out = tmp_path / f"{name}.json"
        r = subprocess.run([sys.executable, *common, *extra, "--json", str(out)], capture_output=True, text=True,
                           cwd=REPO, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "synthetic, the release's shapes" in r.stdout
        docs[name] = json.loads(out.read_text())
    plain, piped = docs["plain"], docs["piped"]
    assert set(plain) == set(piped) and plain["schema"] == piped["schema"]
    assert set(plain["summary"]) - FROM_THE_MACHINE <= set(piped["summary"])
    assert set(plain["runs"][0]) <= set(piped["runs"][0])
    for doc in (plain, piped):
        assert "token_ids" not in doc["summary"] and "step_s" not in doc["summary"]
        assert len(doc["runs"]) == 1 and doc["summary"]["synthetic"] is True
        assert doc["summary"]["aggregate_tokens_per_s"] == pytest.approx(2 * doc["summary"]["tokens_per_s"])
    assert piped["runs"][0]["token_ids"] == plain["runs"][0]["token_ids"]          # same seed, same tokens
    assert piped["summary"]["ranks"] == 1 and piped["summary"]["peak_bytes"] is None


# ---------------------------------------------------------------------------------------------
# The sweep's documentation

def test_preset_help_says_what_each_preset_runs_and_the_default(capsys):
    from bench import sweep
    with pytest.raises(SystemExit):
        sweep.parse(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--preset {paper,quick} what to run (default: quick): quick: 8 small models, 64 tokens, 1 repeat; " \
           "paper: every registered size of every family, 512 tokens, 3 repeats" in help_text


def test_the_readme_has_a_sweep_section():
    from bench import sweep
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Sweep\n", 1)[1].split("\n## ", 1)[0]
    for needed in ("--preset paper", "quick", "--plot-only", "results/", "runs.jsonl", "fig14_time_", "minutes"):
        assert needed in section, needed
    assert all(name.split("-")[-1] in section for name in sweep.PRESETS["quick"]["models"])


def test_bench_pipeline_says_synthetic_weights_above_its_table():
    from bench import pipeline
    synthetic = {1: [{"synthetic": True, "source": "cache/synthetic/rwkv-4-tiny-fp32-seed0.pth"}]}
    assert pipeline.weights_line(synthetic).startswith("weights: synthetic, the release's shapes (cache/synthetic/")
    assert pipeline.weights_line({1: [{"synthetic": False, "source": "/data/real.pth"}]}) == "weights: /data/real.pth"
