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


def assert_exact_in_every_build_and_batch(matvec_group, x, packed, ref, bound, isas, batches):
    """Each stream of x [S, in] through `matvec_group` alone is within `bound` of `ref` on every build
    in `isas`; every batch of the first B streams (B in `batches`) gives those streams' one-stream bits;
    the builds give the same bits."""
    import torch
    got = {}
    for isa in isas:
        alone = torch.cat([matvec_group([(x[b:b + 1].contiguous(), packed)], isa=isa)[0] for b in range(x.shape[0])])
        assert bool(((alone - ref).abs() <= bound).all()), isa
        for B in batches:
            assert torch.equal(matvec_group([(x[:B].contiguous(), packed)], isa=isa)[0], alone[:B]), (isa, B)
        got[isa] = alone
    assert all(torch.equal(v, got[isas[0]]) for v in got.values())


def assert_prompt_products(xs, packed, gemm):
    """A prompt's product [B, T, in] x packed: on the path the table picks for its shape (bit-equal to
    the decode kernels on its B * T rows when "short", else the GEMM's), and with the GEMM (`gemm`, an
    implementation name) forced, the dequantised product within float32 rounding."""
    import rwkv_kernels
    import torch
    from rwkv_kernels import dispatch, quant
    B, T, I = xs.shape
    ys = rwkv_kernels.linear(xs, packed)
    assert ys.shape == (B, T, packed.shape[0])
    if dispatch.product_shape(xs, dispatch.format_name(packed)) == "short":
        assert torch.equal(ys, rwkv_kernels.linear(xs.reshape(B * T, I), packed).reshape(B, T, -1))
    else:
        assert torch.allclose(ys, quant.dequantized_linear(xs, packed), rtol=1e-4, atol=1e-4)
    with dispatch.force(linear=gemm):
        assert torch.allclose(rwkv_kernels.linear(xs, packed), quant.dequantized_linear(xs, packed), rtol=1e-4, atol=1e-4)
