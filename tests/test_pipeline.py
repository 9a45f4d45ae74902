"""Pipeline parallelism over torch.distributed (gloo, localhost): the pipelined model gives the same
logits and tokens as one process, each rank reads only its tensors, and faults end every rank with
one message naming the rank at fault. Ranks are real processes (tests/pipeline_job.py)."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import rwkv_engine
from rwkv_engine import State
from rwkv_engine.checkpoint import read_checkpoint, release_pages, stage_keys, write_synthetic
from rwkv_engine.config import RWKVConfig
from rwkv_engine.pipeline import PipelineError, plan, split_layers

REPO = Path(__file__).resolve().parent.parent
JOB = Path(__file__).resolve().parent / "pipeline_job.py"
sys.path.insert(0, str(JOB.parent))
from pipeline_job import PENALISED, PROMPTS  # noqa: E402

CFG = RWKVConfig(n_layer=4, n_embd=64, vocab_size=500)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_synthetic(CFG, tmp_path_factory.mktemp("pipe") / "tiny4.pth", seed=3)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def store():
    """The rendezvous store, hosted outside the ranks as torchrun's agent does (it outlives them)."""
    import torch.distributed as dist
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


def launch(world, scenario, ckpts, out, store=None, **kwargs):
    """One process per rank, as torchrun would start them; ckpts: one path, or one per rank."""
    port = store.port if store is not None else free_port()
    ckpts = ckpts if isinstance(ckpts, list) else [ckpts] * world
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   TORCHELASTIC_USE_AGENT_STORE=str(store is not None),
                   OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        procs.append(subprocess.Popen([sys.executable, str(JOB), scenario, str(ckpts[rank]), str(out), json.dumps(kwargs)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      start_new_session=True))
    return procs


def finish(procs, timeout=60):
    """Wait for every rank (killing all on timeout) -> [(returncode, stderr)]."""
    deadline = time.monotonic() + timeout
    results = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
            results.append((p.returncode, err))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.communicate()
    return results


def last_line(err):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


# ---------------------------------------------------------------------------------------------
# In-process pieces

def test_even_and_explicit_splits():
    assert split_layers(12, 2) == [range(0, 6), range(6, 12)]
    assert split_layers(40, 3) == [range(0, 14), range(14, 27), range(27, 40)]
    assert split_layers(32, 3, [10, 10, 12]) == [range(0, 10), range(10, 20), range(20, 32)]
    assert split_layers(5, 1) == [range(0, 5)]


@pytest.mark.parametrize("n_layer, world, per_rank, message", [
    (2, 3, None, "world size 3 is larger than the model's 2 layers"),
    (12, 2, [6, 5], "sums to 11 but the model has 12 layers"),
    (12, 2, [4, 4, 4], "has 3 entries [4, 4, 4] but the world has 2 ranks"),
    (12, 2, [12, 0], "every rank needs at least one layer"),
])
def test_bad_splits_say_why(n_layer, world, per_rank, message):
    with pytest.raises(PipelineError, match=message.replace("[", r"\[").replace("]", r"\]")):
        split_layers(n_layer, world, per_rank)


def test_ranks_started_with_different_arguments_are_refused():
    from rwkv_engine.pipeline import _check_same_checkpoint
    info = lambda host, dtype: {"host": host, "path": "/m.pth", "hash": "h", "summary": "s",
                                "args": {"dtype": dtype, "layers_per_rank": None}}
    _check_same_checkpoint([info("a", "float32"), info("b", "float32")])
    with pytest.raises(PipelineError, match=r"different arguments: rank 1 \(b\) has \{'dtype': 'float16'"):
        _check_same_checkpoint([info("a", "float32"), info("b", "float16")])


def test_load_keywords_become_one_load_options_and_one_pipeline_options():
    from rwkv_engine import LoadOptions
    from rwkv_engine.pipeline import PipelineOptions, split_options
    checkpoint, seed, model, run = split_options(dict(checkpoint="m.pth", dtype="float16", seed=3, micro_batches=2,
                                                      layers_per_rank=[1, 3], timeout_s=5.0))
    assert (checkpoint, seed) == ("m.pth", 3) and model == LoadOptions(device=None, dtype="float16")
    assert run == PipelineOptions(layers_per_rank=[1, 3], micro_batches=2, timeout_s=5.0)
    with pytest.raises(TypeError, match="pipeline.load.. got an unexpected keyword argument 'weigths'"):
        split_options(dict(weigths="int8"))
    with pytest.raises(PipelineError, match="micro_batches must be an int >= 1, got 0"):
        split_options(dict(micro_batches=0))


def test_plan_keeps_each_micro_batch_chunks_in_order():
    items = plan(5, 7, micro_batches=2, chunk=3, all_logits=False)
    assert [(it.rows, it.cols, it.logits) for it in items] == [
        ((0, 2), (0, 3), False), ((2, 5), (0, 3), False), ((0, 2), (3, 6), False), ((2, 5), (3, 6), False),
        ((0, 2), (6, 7), True), ((2, 5), (6, 7), True)]
    assert [it.rows for it in plan(3, 1, micro_batches=8, chunk=None, all_logits=False)] == [(0, 1), (1, 2), (2, 3)]


def test_a_stage_reads_only_its_tensors(ckpt):
    sd, cfg = read_checkpoint(ckpt, range(1, 3))
    assert set(sd) == stage_keys(cfg, range(1, 3))
    assert all(k.startswith(("blocks.1.", "blocks.2.")) for k in sd)
    first, _ = read_checkpoint(ckpt, range(0, 1))
    last, _ = read_checkpoint(ckpt, range(3, 4))
    assert {"emb.weight", "blocks.0.ln0.weight"} <= set(first) and "head.weight" not in first
    assert {"head.weight", "ln_out.weight"} <= set(last) and "emb.weight" not in last
    stage = rwkv_engine.load(ckpt, layers=range(1, 3))       # builds from those keys alone
    assert stage.emb is None and stage.head is None and len(stage.blocks) == 2
    with pytest.raises(ValueError, match="pipeline stage"):
        stage.forward([[1]])


def test_process_tokens_tell_a_running_process_from_an_exited_one_on_this_machine_only():
    from rwkv_engine.stage import process_gone, process_token
    me = process_token()
    boot, ns, pid, started = me.split(":")
    assert pid == str(os.getpid()) and not process_gone(me)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    token = process_token(child.pid)
    try:
        assert not process_gone(token)
        os.kill(child.pid, signal.SIGSTOP)                   # stopped (hung) is not gone
        assert not process_gone(token)
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not process_gone(token) and time.monotonic() < deadline:   # a zombie counts as gone
            time.sleep(0.01)
        assert process_gone(token)
    finally:
        child.kill()
        child.wait()
    assert process_gone(token)                                # reaped
    assert process_gone(f"{boot}:{ns}:{pid}:{int(started) + 1}")       # the pid reused by another process
    assert not process_gone(f"another-boot:{ns}:{pid}:{started}")     # another machine: cannot tell
    assert not process_gone(f"{boot}:{int(ns) + 1}:{child.pid}:{started}") and not process_gone("")


@pytest.mark.parametrize("peer", ["running", "exited"])
def test_a_timeout_on_a_rank_whose_process_exited_is_reported_as_its_death(store, peer):
    """gloo does not always see a killed peer's socket close (CI once timed out on one instead):
    a rank that times out asks its own /proc about the ranks on its machine before reporting."""
    import datetime

    import torch.distributed as dist

    from rwkv_engine.stage import Boundary, process_token
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    boundary = Boundary.__new__(Boundary)
    boundary.rank, boundary.world, boundary.timeout = 0, 3, datetime.timedelta(seconds=3)
    boundary.store = dist.PrefixStore("fault_test/", store)
    boundary.store.set_timeout(datetime.timedelta(seconds=2))
    boundary.hosts = {0: "h0", 1: "h1", 2: "h2"}
    boundary.processes = {0: process_token(), 1: "", 2: process_token(child.pid)}   # rank 1: another machine
    if peer == "exited":
        child.kill()
        child.wait()
    try:
        with pytest.raises(PipelineError) as e:
            boundary.fail(1, "timeout")
    finally:
        child.kill()
        child.wait()
    if peer == "exited":
        assert str(e.value) == f"rank 2 (h2) died: its process (pid {child.pid}) has exited"
        assert boundary.store.get("fault/0").decode().startswith("died|2|")
    else:
        assert str(e.value) == "rank 1 (h1) did not answer within 3 s (hung or unreachable)"


def test_release_pages_drops_only_file_mapped_pages(tmp_path):
    anonymous = torch.randn(1 << 18)
    copy = anonymous.clone()
    assert release_pages([anonymous]) == 0 and torch.equal(anonymous, copy)      # never zeroes memory
    torch.save({"t": copy}, tmp_path / "t.pth")
    mapped = torch.load(tmp_path / "t.pth", mmap=True, weights_only=True)["t"]
    assert torch.equal(mapped, copy)                                              # pages now resident
    assert release_pages([mapped]) > 0
    assert torch.equal(mapped, copy)                                              # re-read from the file


def test_page_dropper_drops_slices_of_a_mapped_tensor_and_never_heap_memory(tmp_path):
    from bench.memory import rss_bytes
    from rwkv_engine.files import page_dropper
    anonymous = torch.randn(1 << 20)
    copy = anonymous.clone()
    drop = page_dropper(anonymous)
    assert drop(anonymous[: 1 << 19]) == 0 and torch.equal(anonymous, copy)      # never zeroes memory
    torch.save({"t": copy}, tmp_path / "t.pth")
    mapped = torch.load(tmp_path / "t.pth", mmap=True, weights_only=True)["t"]
    assert torch.equal(mapped, copy)                                              # 4 MB now resident
    drop = page_dropper(mapped)
    before = rss_bytes()
    dropped = sum(drop(mapped[i:i + (1 << 18)]) for i in range(0, mapped.numel(), 1 << 18))
    assert dropped > 3 * (1 << 20) and before - rss_bytes() > 3 * (1 << 20)
    assert torch.equal(mapped, copy)                                              # re-read from the file
    with pytest.raises(ValueError, match="outside the tensor"):
        drop(copy)
    assert page_dropper(mapped.view(1024, 1024).t())(mapped[:1024]) == 0       # not contiguous: keeps its pages


# ---------------------------------------------------------------------------------------------
# Real ranks

def reference(model, tokens, states, micro_batches, chunk, all_logits=False):
    """One process fed the same micro-batches (rows) and chunks as the pipeline."""
    B, T = tokens.shape
    outs = {}
    for it in plan(B, T, micro_batches, chunk, all_logits):
        rows = slice(*it.rows)
        if it.rows not in states:
            states[it.rows] = model.new_state(it.rows[1] - it.rows[0])
        logits, _ = model.forward(tokens[rows, slice(*it.cols)], states[it.rows], all_logits=all_logits)
        outs.setdefault(it.rows, []).append(logits)
    return torch.cat([torch.cat(v, 1) if all_logits else v[-1] for v in outs.values()])


@pytest.mark.parametrize("world, micro, chunk", [(2, 2, None), (3, 3, 3), (2, 1, 5)])
def test_pipeline_matches_one_process_bit_for_bit(ckpt, tmp_path, world, micro, chunk):
    procs = launch(world, "parity", ckpt, tmp_path, micro_batches=micro, prompt_chunk=chunk, timeout_s=20)
    for rank, (rc, err) in enumerate(finish(procs)):
        assert rc == 0, f"rank {rank}: {err[-2000:]}"
    got = torch.load(tmp_path / "results.pt")
    model = rwkv_engine.load(ckpt)

    states = {}
    assert torch.equal(got["seq_last"], reference(model, PROMPTS, states, micro, chunk))
    for t, logits in zip((4, 70, 123), got["token_steps"]):
        assert torch.equal(logits, reference(model, torch.tensor([[t], [t + 1], [t + 2]]), states, micro, chunk))
    forks = {k: s.clone() for k, s in states.items()}
    for after, st in zip(got["after_clone"], (states, forks)):
        assert torch.equal(after, reference(model, torch.tensor([[5], [6], [7]]), st, micro, chunk))
    full_fork = State.cat([forks[rows] for rows in sorted(forks)])
    stacked = State.cat([full_fork.select([2, 0]), model.new_state(1), full_fork.select(1)])
    by_rows = {it.rows: stacked.select(list(range(*it.rows))) for it in plan(4, 1, micro, chunk, False)}
    assert torch.equal(got["select_cat"], reference(model, torch.tensor([[9], [10], [11], [12]]), by_rows, micro, chunk))
    assert got["select_cat_bytes"] == stacked.nbytes
    assert torch.equal(got["all_logits"], reference(model, PROMPTS, {}, micro, chunk, all_logits=True))
    # and the whole batch in one call agrees to rounding (micro-batches change GEMM shapes only)
    whole, _ = model.forward(PROMPTS, model.new_state(3))
    torch.testing.assert_close(got["seq_last"], whole, rtol=1e-4, atol=1e-4)

    assert got["gen_seeded"] == model.generate(PROMPTS[:2], 6, temperature=1.0, seed=123).tokens
    assert got["gen_greedy"] == model.generate(PROMPTS[0], 6, temperature=0).tokens
    # streams in groups that never wait for each other: the same tokens as generate()
    assert got["interleaved_seeded"] == model.generate(PROMPTS, 6, temperature=1.0, seed=123).tokens
    # with penalties too (decode_interleaved used to drop them): the same per-stream loop as generate()
    assert got["interleaved_penalised"] == model.generate(PROMPTS, 6, sampling=PENALISED, seed=5).tokens

    split = split_layers(CFG.n_layer, world)
    for rank in range(world):
        info = json.loads((tmp_path / f"rank{rank}.json").read_text())
        own = stage_keys(CFG, split[rank])
        assert info["layers"] == [split[rank].start, split[rank].stop]
        assert set(info["given"]) == own and set(info["read"]) <= own
        assert info["emb"] == (rank == 0) and info["head"] == (rank == world - 1)


def wait_for(path, procs, timeout=60):
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            pytest.fail(f"pipeline did not start: {[last_line(err) for _, err in finish(procs, 1)]}")
        time.sleep(0.1)


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_a_dead_or_hung_rank_ends_every_rank_with_its_name(ckpt, tmp_path, how, store):
    timeout_s = 3.0
    procs = launch(3, "kill", ckpt, tmp_path, store, timeout_s=timeout_s)
    wait_for(tmp_path / "ready", procs)
    t0 = time.monotonic()
    os.kill(procs[1].pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
    try:
        results = finish([procs[0], procs[2]], timeout=timeout_s + 15)
    finally:
        os.killpg(procs[1].pid, signal.SIGKILL)
        procs[1].communicate()
    elapsed = time.monotonic() - t0
    assert elapsed < timeout_s + 10          # bounded: the timeout, the 2 s report grace, exiting
    expect = "rank 1 (" + socket.gethostname() + ") " + ("died" if how == "kill" else "did not answer within 3 s")
    for rank, (rc, err) in zip((0, 2), results):
        assert rc == 1, f"rank {rank}: {err[-1500:]}"
        assert expect in last_line(err), f"rank {rank}: {last_line(err)}"


@pytest.mark.parametrize("to", ["every rank", "rank 0"])
def test_sigterm_shuts_the_pipeline_down_and_every_rank_exits_0(ckpt, tmp_path, to):
    """torchrun forwards SIGTERM/SIGINT to every rank: the workers outlive it, rank 0 stops at its next
    operation (rwkv_engine.pipeline.stop_on_signals, as bench.generate --pipeline uses) and shuts
    them down; signalling rank 0 alone does the same."""
    procs = launch(2, "signal", ckpt, tmp_path, timeout_s=20)
    wait_for(tmp_path / "ready", procs)
    for p in procs if to == "every rank" else procs[:1]:
        p.send_signal(signal.SIGTERM)
    for rank, (rc, err) in enumerate(finish(procs, timeout=30)):
        assert rc == 0 and "Traceback" not in err, f"rank {rank}: {err[-1500:]}"
    assert (tmp_path / "stopped").read_text() == "stopped by SIGTERM"


def test_idle_workers_outlive_the_timeout(ckpt, tmp_path):
    """Rank 0 pings idle workers: a pause longer than timeout_s is not a fault."""
    for rank, (rc, err) in enumerate(finish(launch(2, "idle", ckpt, tmp_path, timeout_s=2.0))):
        assert rc == 0, f"rank {rank}: {err[-1500:]}"
    got = torch.load(tmp_path / "results.pt")
    assert torch.equal(got["first"], got["again"])


def test_a_split_that_does_not_fit_fails_on_every_rank_before_work(ckpt, tmp_path):
    results = finish(launch(2, "parity", ckpt, tmp_path, layers_per_rank=[1, 2]))
    for rank, (rc, err) in enumerate(results):
        assert rc != 0 and "--layers-per-rank [1, 2] sums to 3 but the model has 4 layers" in last_line(err), err[-1500:]
    assert not (tmp_path / "results.pt").exists()


def test_mismatched_checkpoints_are_refused_before_work(ckpt, tmp_path):
    other = write_synthetic(CFG, tmp_path / "other.pth", seed=4)          # same shapes, other values
    results = finish(launch(2, "parity", [ckpt, other], tmp_path))
    for rank, (rc, err) in enumerate(results):
        assert rc != 0 and "checkpoints differ across ranks: rank 1" in last_line(err), err[-1500:]
        assert str(other) in last_line(err)
    assert not (tmp_path / "rank0.json").exists()


# ---------------------------------------------------------------------------------------------
# bench.pipeline

def test_bench_pipeline_refuses_bad_arguments_in_one_line():
    for args, message in ((["--model", "nope"], "unknown model name 'nope'"),
                          (["--model", "rwkv-4-tiny", "--tokens", "1"], "--tokens must be >= 2"),
                          (["--model", "rwkv-4-tiny", "--ranks", "0"], "values must be >= 1")):
        r = subprocess.run([sys.executable, "-m", "bench.pipeline", *args], capture_output=True, text=True, cwd=REPO)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr


@pytest.mark.slow
def test_bench_pipeline_runs_torchrun_and_reports(tmp_path):
    out = tmp_path / "pipe.json"
    r = subprocess.run([sys.executable, "-m", "bench.pipeline", "--model", "rwkv-4-tiny", "--ranks", "1,2",
                        "--batch", "1,2", "--tokens", "4", "--json", str(out)], capture_output=True, text=True,
                       cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [row["ranks"] for row in rows] == [1, 2] and rows[1]["split"] == [[0, 1], [1, 2]]
    assert all(row["decode_tok_s"] > 0 and row["B2_interleaved_tok_s"] > 0 for row in rows)
    assert json.loads(out.read_text())["raw"]["2"][0]["runs"]["2"]["same_tokens"]


# ---------------------------------------------------------------------------------------------
# bench.generate --pipeline

def test_bench_generate_pipeline_needs_torchrun():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    r = subprocess.run([sys.executable, "-m", "bench.generate", "--model", "rwkv-4-tiny", "--pipeline"],
                       capture_output=True, text=True, cwd=REPO, env=env)
    assert r.returncode == 2 and "--pipeline runs under torchrun" in r.stderr and len(r.stderr.splitlines()) == 1


@pytest.mark.slow
def test_bench_generate_pipelined_tokens_equal_one_process(tmp_path):
    """Two runs compared token for token through their --json (2 ranks, one micro-batch)."""
    common = ["--model", "rwkv-4-tiny", "--tokens", "8", "--batch", "2"]
    piped, plain = tmp_path / "piped.json", tmp_path / "plain.json"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "bench.generate", *common, "--pipeline", "--micro-batches", "1", "--json", str(piped)],
                       capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "bench.generate", *common, "--json", str(plain)],
                       capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(piped.read_text())["runs"][0]["token_ids"]
    assert got == json.loads(plain.read_text())["runs"][0]["token_ids"] and len(got) == 2 and len(got[0]) == 8
