"""Small helpers several test modules share (tests/ is on sys.path under pytest)."""
import json
import os
from contextlib import contextmanager

import pytest


def one_line_error(exc_type, call, match):
    """call() raises exc_type matching `match`, in one line -> the exception."""
    with pytest.raises(exc_type, match=match) as err:
        call()
    assert "\n" not in str(err.value)
    return err.value


@contextmanager
def fake_machine_cache(folder, **fields):
    """BENCH_MACHINE_CACHE set to `folder`, holding a clean machine measurement for this CPU's thread
    count (so no command spends seconds measuring bandwidth); the variable is restored after."""
    from bench.machine import cache_path
    from rwkv_engine.process import usable_cores
    old = os.environ.get("BENCH_MACHINE_CACHE")
    os.environ["BENCH_MACHINE_CACHE"] = str(folder)
    path = cache_path("cpu", usable_cores())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "hostname": "test", "device": "cpu", "device_name": "test cpu", "threads": usable_cores(),
        "read_bandwidth_GBps": 20.0, "read_bandwidth_method": "median of torch_sum",
        "bandwidth_by_method_GBps": {"torch_sum": 20.0}, "bandwidth_spread": 1.0, "bandwidth_disagree": False,
        "gemm_fp32_GFLOPs": 100.0, "memory_total_bytes": 8 << 30, **fields}))
    try:
        yield folder
    finally:
        if old is None:
            os.environ.pop("BENCH_MACHINE_CACHE", None)
        else:
            os.environ["BENCH_MACHINE_CACHE"] = old
