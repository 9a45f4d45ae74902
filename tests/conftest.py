import os

# Triton kernels run in Triton's CPU interpreter unless told otherwise (TRITON_INTERPRET=0 on a GPU
# machine). Must be set before triton decorates any kernel, i.e. before rwkv_kernels.wkv_triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
# The official `rwkv` package (a test-only reference) reads these at import time.
os.environ.setdefault("RWKV_JIT_ON", "1")
os.environ.setdefault("RWKV_CUDA_ON", "0")

import pytest  # noqa: E402
import rwkv_kernels  # noqa: E402,F401  (before torch: its OpenMP spin default, as the CLIs get it)
import torch  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long cases, excluded from the default run (-m 'not slow'); "
                                       "a faster test covers the same property")


# Every generated file of the project (synthetic checkpoints, compiled kernels, bench.peers' copies,
# the machine measurement) lives under RWKV_ENGINE_CACHE; BENCH_MACHINE_CACHE moves the last one.
CACHE_VARS = ("RWKV_ENGINE_CACHE", "BENCH_MACHINE_CACHE")
# Opt-in: tests use this directory as their cache instead of a fresh one (to reuse checkpoints
# written before, e.g. a 169m one for the slow tests). The user's RWKV_ENGINE_CACHE is never used.
TEST_CACHE_ENV = "RWKV_ENGINE_TEST_CACHE"


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """The whole session writes into a cache of its own under pytest's temporary directory (or
    $RWKV_ENGINE_TEST_CACHE when set), whatever RWKV_ENGINE_CACHE / BENCH_MACHINE_CACHE say."""
    saved = {k: os.environ.get(k) for k in CACHE_VARS}
    os.environ.pop("BENCH_MACHINE_CACHE", None)
    os.environ["RWKV_ENGINE_CACHE"] = os.environ.get(TEST_CACHE_ENV) or str(tmp_path_factory.mktemp("rwkv_engine_cache"))
    if not os.environ.get(TEST_CACHE_ENV):
        _seed_machine_cache()
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _seed_machine_cache():
    """A clean machine measurement for every CPU thread count, so no command a test runs spends
    seconds measuring bandwidth (a busy machine's measurement is never cached: each command would
    measure again). Tests of the measurement itself monkeypatch it."""
    import json
    from bench.machine import cache_path, cpu_model
    for threads in range(1, (os.cpu_count() or 1) + 1):
        path = cache_path("cpu", threads)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({
            "hostname": "pytest", "device": "cpu", "device_name": cpu_model(), "threads": threads,
            "read_bandwidth_GBps": 20.0, "read_bandwidth_method": "fixed by tests/conftest.py",
            "bandwidth_by_method_GBps": {"torch_sum": 20.0}, "bandwidth_spread": 1.0, "bandwidth_disagree": False,
            "measured_others_cpu_pct": 0.0, "baseline_problem": "", "last_level_cache_bytes": None,
            "gemm_fp32_GFLOPs": 100.0, "memory_total_bytes": 8 << 30}))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def registrations():
    """What decides which kernels run and which weight formats exist (all registered when
    rwkv_kernels is imported, above): the dispatch table's implementations, forced choices and rows,
    and the weight formats' records."""
    from rwkv_kernels import dispatch, formats
    return {**dispatch.registrations(), "formats": formats.all_formats()}


@pytest.fixture(autouse=True)
def _no_leaked_registration(request):
    """A test that registers a kernel implementation or a weight format, or forces a choice, undoes it
    (dispatch.registered, dispatch.force, formats.unregister, monkeypatch): one test's registrations
    must not change what later tests run. Set up before the test's own fixtures, checked after theirs
    are torn down."""
    before = registrations()
    yield
    after = registrations()
    changed = sorted(k for k in before if before[k] != after[k])
    if changed:
        pytest.fail(f"{request.node.nodeid} left registrations behind ({', '.join(changed)}): "
                    "undo them in the test (dispatch.registered, formats.unregister)", pytrace=False)


@pytest.fixture(scope="session")
def tiny_cfg():
    from rwkv_engine.config import RWKVConfig
    return RWKVConfig(n_layer=3, n_embd=96, vocab_size=1000, name="")


@pytest.fixture(scope="session")
def tiny_pth(tmp_path_factory, tiny_cfg):
    """A small fp32 BlinkDL-format checkpoint with decays pushed to trained models' extremes."""
    from rwkv_engine.checkpoint import synthetic_state_dict
    sd = synthetic_state_dict(tiny_cfg, seed=1)
    C = tiny_cfg.n_embd
    sd["blocks.1.att.time_decay"] = torch.linspace(-8, 10, C)        # w from -3e-4 to -2.2e4
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    torch.save(sd, path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_pth):
    import rwkv_engine
    return rwkv_engine.load(str(tiny_pth))
