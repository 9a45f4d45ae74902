"""The server on a pipeline (issue 12, entry points): `python -m rwkv_engine.serve --pipeline` as two
ranks started as torchrun would (gloo, 127.0.0.1): rank 0 serves HTTP, rank 1 holds the second half
of the layers. A greedy completion equals the single-process library's, and SIGTERM to rank 0 ends
both ranks with status 0."""
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import queue
from pathlib import Path

import httpx
import psutil
import pytest

import rwkv_engine
from rwkv_engine.checkpoint import write_synthetic

REPO = Path(__file__).resolve().parents[1]
MODEL = "rwkv-4-tiny"                                   # 2 layers: one per rank


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(args, world=2, model=MODEL):
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        procs.append(subprocess.Popen([sys.executable, "-m", "rwkv_engine.serve", "--model", str(model), "--port", "0",
                                       "--pipeline", *args], env=env, cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, start_new_session=True))
    return procs


def ready_url(proc, timeout=120):
    found, lines = queue.Queue(), []

    def drain():
        for line in proc.stdout:
            lines.append(line)
            m = re.search(r"ready at (http://\S+)", line)
            if m:
                found.put(m.group(1))
        found.put(None)
    threading.Thread(target=drain, daemon=True).start()
    try:
        url = found.get(timeout=timeout)
    except queue.Empty:
        url = None
    if url is None:
        raise AssertionError("rank 0 did not serve:\n" + "".join(lines))
    return url


def test_server_on_a_two_rank_pipeline_matches_one_process():
    write_synthetic(MODEL)
    ids = [187, 688, 247, 29103, 4560]
    want = rwkv_engine.load(MODEL).generate(ids, 12, temperature=0).tokens[0]
    procs = start_ranks(["--layers-per-rank", "1,1"])
    try:
        url = ready_url(procs[0])
        r = httpx.post(url + "/v1/completions", timeout=60,
                       json={"model": MODEL, "prompt": ids, "max_tokens": 12, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        got = rwkv_engine.tokenizer().encode(r.json()["choices"][0]["text"])
        assert rwkv_engine.tokenizer().decode(got) == rwkv_engine.tokenizer().decode(want)
        procs[0].send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=60) for p in procs]
        assert codes == [0, 0], codes
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def test_layers_per_rank_needs_pipeline():
    proc = subprocess.run([sys.executable, "-m", "rwkv_engine.serve", "--model", MODEL, "--layers-per-rank", "1,1"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--layers-per-rank needs --pipeline" in proc.stderr


def test_sigterm_to_every_rank_on_a_checkpoint_path_ends_both_with_0(tmp_path):
    """torchrun forwards SIGTERM to every rank: the worker outlives it until rank 0, draining, shuts it
    down (it used to die of the signal). The model is a checkpoint path (issue 19.11)."""
    path = write_synthetic(rwkv_engine.get_config(MODEL), tmp_path / "tiny.pth", seed=5)
    procs = start_ranks([], model=path)
    try:
        url = ready_url(procs[0])
        r = httpx.post(url + "/v1/completions", timeout=60, json={"model": str(path), "prompt": [1, 2, 3], "max_tokens": 4})
        assert r.status_code == 200, r.text
        for p in procs:
            p.send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=60) for p in procs]
        assert codes == [0, 0], codes
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


@pytest.mark.parametrize("fmt", ["pth", "int8"])
def test_bench_generate_pipeline_takes_the_checkpoint_paths_it_takes_alone(tmp_path, fmt):
    """`--pipeline` used to refuse any --model not named rwkv* ("splits RWKV models only, not
    ckpt.pth"), and a stage could not read a file packed by convert --weights int8."""
    import json
    from rwkv_engine.config import RWKVConfig
    path = write_synthetic(RWKVConfig(n_layer=2, n_embd=64, vocab_size=500), tmp_path / "ckpt.pth", seed=3)
    if fmt == "int8":
        subprocess.run([sys.executable, "-m", "rwkv_engine.convert", str(path), str(tmp_path / "c8.safetensors"),
                        "--weights", "int8"], cwd=REPO, check=True, capture_output=True)
        path = tmp_path / "c8.safetensors"
    out = tmp_path / "p.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "bench.generate", "--model", str(path), "--pipeline", "--tokens", "4", "--batch", "2",
                        "--json", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    run = json.loads(out.read_text())["runs"][0]
    assert run["weight_format"] == ("int8" if fmt == "int8" else "float32")     # the file's, not --dtype's
    got = run["token_ids"]                                                   # one schema: token ids per run
    model = rwkv_engine.load(path)
    ids = [i % model.vocab_size for i in range(7, 7 + 41 * 97, 97)]           # bench.generate's prompt without a tokenizer
    assert got == model.generate([ids] * 2, 4, temperature=1.0, seed=0).tokens


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_the_launcher_stopped_by_a_signal_exits_0_with_every_rank(tmp_path, sig):
    """torchrun signalled itself reports the signal as its failure (exit 1, a SignalException
    traceback) although its ranks shut down cleanly; rwkv_engine.launch is torchrun, stopped cleanly."""
    path = write_synthetic(rwkv_engine.get_config(MODEL), tmp_path / "tiny.pth", seed=5)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, "-m", "rwkv_engine.launch", "--standalone", "--nproc-per-node", "2",
                             "-m", "rwkv_engine.serve", "--model", str(path), "--pipeline", "--port", "0"],
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        url = ready_url(proc)
        r = httpx.post(url + "/v1/completions", timeout=60, json={"model": str(path), "prompt": [1, 2, 3], "max_tokens": 4})
        assert r.status_code == 200, r.text
        (torchrun,) = psutil.Process(proc.pid).children()
        ranks = torchrun.children()
        assert len(ranks) == 2 and all("rwkv_engine.serve" in " ".join(p.cmdline()) for p in ranks)
        proc.send_signal(sig)
        assert proc.wait(timeout=90) == 0
        assert not [p for p in ranks if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]    # no orphan
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_the_launcher_without_a_command_is_one_line():
    r = subprocess.run([sys.executable, "-m", "rwkv_engine.launch"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "torchrun's options" in r.stderr
