"""bench.serve end to end at the smallest size: it starts the server, drives it, stops it, and
writes the table, JSON and plot."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_bench(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "bench.serve", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def test_bench_serve_smoke(tmp_path):
    out = tmp_path / "serve.json"
    r = run_bench("--model", "rwkv-4-tiny", "--clients", "1,2", "--requests-per-client", "2", "--max-tokens", "4",
                  "--library-repeats", "1", "--wait-quiet", "1", "--json", str(out),
                  "--plot", str(tmp_path / "serve.png"))
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert [p["clients"] for p in result["phases"]] == [1, 2]
    assert [p["requests"] for p in result["phases"]] == [2, 4]
    assert all(p["tokens"] == 4 * p["requests"] for p in result["phases"])     # ignore_eos: exactly max_tokens
    # distinct prompts: the server's prefix cache holds more after each phase (its own metric, read back)
    cache = [result["idle_prefix_cache_bytes"]] + [p["prefix_cache_bytes"] for p in result["phases"]]
    assert cache[0] < cache[1] < cache[2], cache
    assert all(p["server_cpu_s"] > 0 and p["client_cpu_s"] > 0 for p in result["phases"])
    assert all(0 <= p["others_cpu_pct"] <= 100 for p in result["phases"])     # steal and other processes
    assert all(0 < p["clients_cpu_pct"] <= 100 for p in result["phases"])      # the load generator's own share
    assert all(p["aggregate_tok_s"] > 0 and p["ttft_p99_s"] >= p["ttft_p50_s"] > 0 for p in result["phases"])
    assert result["library_decode_tok_s"] > 0 and result["server_exit_code"] == 0
    assert (tmp_path / "serve.png").stat().st_size > 0
    assert "aggregate tok/s" in r.stdout and "others %" in r.stdout and "server N=1 per-stream / library decode" in r.stdout
    assert "clients %" in r.stdout
    # the server's own account of its scheduler thread, per phase (read from its /metrics around the phase)
    for p in result["phases"]:
        t, n = p["server_time"], p["clients"]
        assert t["decode_steps"] >= 3 * p["requests"] // n        # 4 tokens: the first from the prompt's logits
        assert 1 <= t["streams_per_step"] <= n and t["step_ms"] > 0
        assert t["decode_pct"] > 0 and t["prefill_pct"] > 0 and t["output_pct"] > 0
        assert t["decode_pct"] + t["prefill_pct"] + t["output_pct"] <= 100
    assert "the server's scheduler thread, per phase" in r.stdout
    # the run says its weights are synthetic (JSON, the line above the table, the figure's title) and names the CPU
    assert result["synthetic"] is True and result["provenance"] == "synthetic"
    assert result["device_name"] and result["kernels"] in ("avx2", "avx512", None)
    assert "rwkv-4-tiny, float32, synthetic weights (the release's shapes); cpu: " + result["device_name"] in r.stdout


def test_server_time_is_the_counters_difference_over_the_phase():
    from bench.serve import server_time
    before = {"prefix_cache_bytes": 0, "decode_s": 10.0, "prefill_s": 2.0, "output_s": 1.0,
              "decode_steps": 100, "decode_rows": 400}
    after = {"prefix_cache_bytes": 9, "decode_s": 14.0, "prefill_s": 2.5, "output_s": 1.25,
             "decode_steps": 300, "decode_rows": 3400}
    t = server_time(before, after, wall_s=5.0)
    assert t == {"decode_steps": 200, "streams_per_step": 15.0, "step_ms": 20.0,
                 "decode_pct": 80.0, "prefill_pct": 10.0, "output_pct": 5.0}
    idle = server_time(before, before, wall_s=5.0)
    assert idle["decode_steps"] == 0 and idle["streams_per_step"] is None and idle["step_ms"] is None


def test_bench_serve_weights_line_names_real_weights_and_never_says_synthetic():
    from bench.serve import weights_line
    real = {"model": "rwkv-4-pile-169m", "weights": "int8", "dtype": "float32", "synthetic": False,
            "provenance": "/data/RWKV-4-Pile-169M.pth", "device": "cpu", "device_name": "AMD EPYC", "kernels": "avx512"}
    line = weights_line(real)
    assert line == "rwkv-4-pile-169m, int8, weights from /data/RWKV-4-Pile-169M.pth; cpu: AMD EPYC, avx512 kernels"
    assert "synthetic" not in line
    assert "synthetic weights" in weights_line({**real, "synthetic": True, "provenance": "synthetic"})


def test_bench_serve_rejects_bad_arguments(capsys):
    from bench.serve import main
    for args in (["--clients", "0,2"], ["--clients", "a"], ["--max-tokens", "0"], ["--library-repeats", "0"],
                 ["--wait-quiet", "-1"], ["--weights", "int8", "--against", "int8"], ["--against", "float32"],
                 ["--rounds", "0"]):
        with pytest.raises(SystemExit) as e:
            main(args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and "error" in err, (args, err)


def test_bench_serve_against_runs_both_servers_alternating_and_prints_the_ratio(tmp_path):
    out = tmp_path / "serve.json"
    r = run_bench("--model", "rwkv-4-tiny", "--clients", "1,2", "--requests-per-client", "1", "--max-tokens", "4",
                  "--library-repeats", "1", "--weights", "int8", "--against", "float32", "--json", str(out),
                  "--plot", str(tmp_path / "serve.png"))
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    other = result["against"]
    assert result["weights"] == "int8" and other["weights"] == "float32"
    for res in (result, other):
        assert [p["clients"] for p in res["phases"]] == [1, 2] and res["server_exit_code"] == 0
        assert all(p["tokens"] == 4 * p["requests"] for p in res["phases"])
    # the phases alternate: N=1 of int8, N=1 of float32, N=2 of int8, ... (the order of the progress lines)
    order = [line.split(":")[0] for line in r.stdout.splitlines() if line.startswith("N=")]
    assert order == ["N=1 (int8)", "N=1 (float32)", "N=2 (int8)", "N=2 (float32)"], order
    for n, p, q in zip(("1", "2"), result["phases"], other["phases"]):
        assert abs(result["aggregate_ratio"][n] - p["aggregate_tok_s"] / q["aggregate_tok_s"]) < 1e-9
        assert f"aggregate at N={n}: int8 / float32 = " in r.stdout
    assert r.stdout.count("aggregate tok/s") == 2                 # both tables


def test_bench_serve_against_checks_the_int8_server_target_only_where_it_applies():
    from bench.serve import against_checks

    def res(weights, rates):
        return {"weights": weights, "dtype": "float32", "phases": [{"clients": n, "aggregate_tok_s": r} for n, r in rates]}
    f32 = res(None, [(1, 50.0), (16, 400.0)])
    assert against_checks(res("int8", [(1, 150.0), (16, 620.0)]), f32) == [("int8 aggregate N=16 >= 1.5x float32's", "1.55x", True)]
    assert against_checks(res("int8", [(1, 150.0), (16, 560.0)]), f32) == [("int8 aggregate N=16 >= 1.5x float32's", "1.40x", False)]
    assert against_checks(res("int8", [(1, 150.0)]), f32) == []                 # no N=16 phase
    assert against_checks(res("q4_k", [(1, 150.0), (16, 620.0)]), f32) == []    # the target is int8's
    assert against_checks(res("int8", [(16, 620.0)]), res("bfloat16", [(16, 400.0)])) == []


def test_bench_serve_rounds_repeat_every_phase_and_report_each_ratio_per_round(tmp_path):
    """--rounds 2: the whole sequence of phases twice, the two servers alternating within each round;
    the JSON keeps every round, the table's phase per N is one of them, and the ratios are per round."""
    out = tmp_path / "serve.json"
    r = run_bench("--model", "rwkv-4-tiny", "--clients", "1,2", "--requests-per-client", "1", "--max-tokens", "4",
                  "--library-repeats", "1", "--weights", "int8", "--against", "float32", "--rounds", "2",
                  "--json", str(out), "--plot", str(tmp_path / "serve.png"))
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    order = [line.split(":")[0] for line in r.stdout.splitlines() if line.startswith("N=")]
    assert order == [f"N={n} ({w}) round {k}/2" for k in (1, 2) for n in (1, 2) for w in ("int8", "float32")], order
    for res in (result, result["against"]):
        assert len(res["rounds"]) == 2 and all([p["clients"] for p in ps] == [1, 2] for ps in res["rounds"])
        for j, p in enumerate(res["phases"]):
            assert p in (res["rounds"][0][j], res["rounds"][1][j])
        # round 2's prompts are new to the server: its prefix cache grows again (it would hold still if
        # round 2 repeated round 1's requests, whose states it has)
        assert res["rounds"][1][-1]["prefix_cache_bytes"] > res["rounds"][0][-1]["prefix_cache_bytes"]
    for n in ("1", "2"):
        j = int(n) - 1
        xs = [result["rounds"][k][j]["aggregate_tok_s"] / result["against"]["rounds"][k][j]["aggregate_tok_s"]
              for k in (0, 1)]
        assert result["aggregate_ratio_rounds"][n] == pytest.approx(xs, rel=1e-12)
        assert result["aggregate_ratio"][n] == pytest.approx(sum(xs) / 2, rel=1e-12)
        assert f"aggregate at N={n}: int8 / float32 = " in r.stdout
    assert r.stdout.count("(median of 2 rounds: ") == 2


def test_bench_serve_median_round_and_round_ratios():
    from bench.serve import median_round, round_ratios, scaling_rounds, spread

    def ph(n, rate):
        return {"clients": n, "aggregate_tok_s": rate}
    rounds = [[ph(1, 10.0), ph(16, 90.0)], [ph(1, 12.0), ph(16, 70.0)], [ph(1, 11.0), ph(16, 80.0)]]
    assert median_round(rounds) == [ph(1, 11.0), ph(16, 80.0)]          # each N's own median round
    assert median_round(rounds[:2]) == [ph(1, 10.0), ph(16, 70.0)]      # an even count: the lower one
    mine = {"phases": median_round(rounds), "rounds": rounds}
    theirs = {"rounds": [[ph(1, 5.0), ph(16, 30.0)], [ph(1, 4.0), ph(16, 35.0)], [ph(1, 5.5), ph(16, 40.0)]]}
    assert round_ratios(mine, theirs) == {1: [2.0, 3.0, 2.0], 16: [3.0, 2.0, 2.0]}     # round k against round k
    assert scaling_rounds(mine) == [9.0, 70.0 / 12.0, 80.0 / 11.0]
    assert spread([2.0, 3.0, 2.0], "{:.2f}") == " (median of 3 rounds: 2.00-3.00)" and spread([2.0], "{:.2f}") == ""
    # one round, as a result written before --rounds existed: its phases
    assert round_ratios({"phases": [ph(16, 60.0)]}, {"phases": [ph(16, 40.0)]}) == {16: [1.5]}
