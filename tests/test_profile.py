"""The decode profile: the C kernels' counters (rwkv_kernels.profile) and `bench.modes --profile`, on tiny
shapes. The counters are checked against numbers known without them (products run, weight bytes from
the packed tensors' sizes), and the printed parts against the step they split."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rwkv_kernels import cpu_c, lowbit, profile, quant

REPO = Path(__file__).resolve().parent.parent
needs_c = pytest.mark.skipif(not cpu_c.available(), reason="no C kernels here")


def _weight_bytes(w):
    return w.nbytes if isinstance(w, (quant.Int8Weight, lowbit.BlockWeight)) else w.numel() * w.element_size()


LOWBIT = ["q5_0", "q4_1", "q4_1+cols", "int8+cols"]


@needs_c
@pytest.mark.parametrize("fmt", ["int8", "float16", "float32", *LOWBIT])
def test_counters_count_the_products_and_their_weight_bytes(fmt):
    # int8: 70 -> 96 columns + 3 scales per row; 4 bits: 70 -> 128; 5 bits: 70 -> 256
    w = quant.pack(torch.randn(130, 70), fmt)
    x = torch.randn(3, 70)
    profile.enable()
    try:
        for _ in range(5):
            if fmt == "float32":
                cpu_c.ops().matvec_group([(x, w)])
            elif fmt in LOWBIT:
                lowbit.matvec_group([(x, w)])
            else:
                quant.matvec_group([(x, w)])
        c = profile.read()
    finally:
        profile.enable(False)
    other = c["products"]["other"]
    assert other["products"] == 5 and other["bytes"] == 5 * _weight_bytes(w)
    assert all(v["products"] == 0 for tag, v in c["products"].items() if tag != "other")
    assert (other["quant_ns"] > 0) == (fmt in ("int8", *LOWBIT))
    assert other["work_ns"] > 0 and other["idle_ns"] >= 0
    # wall = quant + work + idle per product, up to the integer rounding of each share (ns)
    assert abs(other["wall_ns"] - other["quant_ns"] - other["work_ns"] - other["idle_ns"]) <= 5 * 3
    assert c["steps"] == 0


@needs_c
def test_counters_stay_zero_when_not_enabled():
    profile.enable(False)
    quant.matvec_group([(torch.randn(1, 64), quant.pack(torch.randn(8, 64), "int8"))])
    assert profile.read()["products"]["other"]["products"] == 0


@needs_c
@pytest.mark.parametrize("fmt", ["int8", "bfloat16", "float32", "q5_0", "q4_1+cols"])
def test_decode_steps_count_each_matrix_of_each_layer(tiny_pth, fmt):
    import rwkv_engine
    model = rwkv_engine.load(str(tiny_pth), weights=fmt)
    B, steps = 2, 3
    state = model.new_state(B)
    profile.enable()
    try:
        for t in range(steps):
            model.forward(torch.full((B, 1), t + 1), state)
        c = profile.read()
    finally:
        profile.enable(False)
    n_layer = len(model.blocks)
    assert c["steps"] == steps and c["step_ns"] > 0
    for tag in profile.TAGS[1:]:
        expected = sum(_weight_bytes(getattr(blk, tag)) for blk in model.blocks)
        assert c["products"][tag]["products"] == n_layer * steps, tag
        assert c["products"][tag]["bytes"] == expected * steps, tag
    assert c["products"]["other"]["bytes"] == _weight_bytes(model.head) * steps      # the head, once per step
    assert all(c["elementwise_ns"][op] > 0 for op in ("ln_shift_mix_att", "wkv_step_gated", "add_gated"))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "bench.modes", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=180)


@needs_c
def test_modes_profile_prints_and_writes_the_parts_of_the_step(tmp_path):
    out = tmp_path / "p.json"
    r = _cli("--model", "rwkv-4-tiny", "--profile", "--weights", "int8", "--against", "float32", "--steps", "3",
             "--repeats", "1", "--batch", "2", "--json", str(out))
    assert r.returncode == 0, r.stderr
    assert "synthetic weights" in r.stdout
    data = json.loads(out.read_text())
    assert data["synthetic"] is True and data["batch"] == 2 and set(data["formats"]) == {"int8", "float32"}
    for fmt, f in data["formats"].items():
        parts = {p["part"]: p for p in f["parts"]}
        for name in ("att k products", "ffn v products", "head products", "activation quantisation",
                     "pool idle (hand-offs, last chunk)", "wkv_step_gated", "embedding, final LN and Python"):
            assert name in parts, (fmt, name)
        # the parts add up to the step (the rest is what the counters do not see)
        total = sum(p["ms_per_step"] for p in f["parts"])
        assert total == pytest.approx(f["step_ms"], rel=0.02), fmt
        # bytes per step of a matrix: its packed size in every layer
        per_layer = {"int8": 64 * (64 + 2 * 2), "float32": 64 * 64 * 4}[fmt]
        assert parts["att k products"]["bytes_per_step"] == 2 * per_layer
        assert parts["activation quantisation"]["ms_per_step"] > 0 if fmt == "int8" else \
            parts["activation quantisation"]["ms_per_step"] == 0
    assert re.search(r"step time float32 / int8: [\d.]+x .*; round by round [\d.]+ \([\d.]+-[\d.]+\)", r.stdout), r.stdout
    pair = data["step_ratio_paired"]                               # float32 / int8 round by round
    assert pair["rounds"] == data["repeats"] and 0 < pair["q1"] <= pair["median"] <= pair["q3"]
    for fmt in ("int8", "float32"):
        assert re.search(rf"{fmt} weights, 2 stream\(s\).*\n.*\n(.*\n)*att k products\s+[\d.]+\s+[\d.]+%", r.stdout)
    bad = _cli("--model", "rwkv-4-tiny", "--profile", "--json", str(tmp_path))          # a directory
    assert bad.returncode == 2 and "--json" in bad.stderr and "Traceback" not in bad.stderr


@needs_c
def test_modes_profile_against_the_composed_step(tmp_path):
    """--against-step composed: the same model with its token step op by op, alternating with the one call;
    both count the same products (the composed step runs the layers' C call and the head from Python)."""
    out = tmp_path / "p.json"
    r = _cli("--model", "rwkv-4-tiny", "--profile", "--weights", "int8", "--against-step", "composed", "--steps", "3",
             "--repeats", "1", "--json", str(out))
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert set(data["formats"]) == {"int8", "int8 (composed step)"}
    one, composed = (data["formats"][k]["counters"] for k in ("int8", "int8 (composed step)"))
    assert one["steps"] == composed["steps"] == 3                               # the warm-up round is not counted
    assert one["products"]["other"]["bytes"] == composed["products"]["other"]["bytes"] > 0
    assert re.search(r"step time int8 \(composed step\) / int8: [\d.]+x", r.stdout), r.stdout
    for args in (("--against-step", "composed"), ("--profile", "--against-step", "composed", "--against", "float32"),
                 ("--profile", "--against-step", "ops")):
        bad = _cli("--model", "rwkv-4-tiny", *args)
        assert bad.returncode == 2 and "--against-step" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


@needs_c
def test_modes_profile_against_another_kernel_source(tmp_path):
    """--against-src DIR: the same model on the kernels built from DIR (here a copy of csrc), alternating
    with the current build; the parts of both are counted and the last logits compared."""
    import shutil
    src = tmp_path / "csrc"
    shutil.copytree(Path(REPO) / "rwkv_kernels" / "csrc", src)
    out = tmp_path / "p.json"
    r = _cli("--model", "rwkv-4-tiny", "--profile", "--weights", "int8", "--against-src", str(src), "--steps", "3",
             "--repeats", "1", "--json", str(out))
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    other = f"int8 ({src} kernels)"
    assert set(data["formats"]) == {"int8", other} and data["same_logits"] is True
    for name in ("int8", other):
        assert data["formats"][name]["counters"]["steps"] == 3
    assert "last step's logits: identical" in r.stdout, r.stdout
    # a copy whose relu_square adds 1e-3: the rounds on it run its code (other logits), not the current build's
    kernel = src / "cpu_ops.c"
    text = kernel.read_text()
    assert text.count("vstore_n(k + i, n - i, vmul(t, t));") == 1
    kernel.write_text(text.replace("vstore_n(k + i, n - i, vmul(t, t));",
                                   "vstore_n(k + i, n - i, vadd(vmul(t, t), vset1(1e-3f)));"))
    r = _cli("--model", "rwkv-4-tiny", "--profile", "--weights", "int8", "--against-src", str(src), "--steps", "3",
             "--repeats", "1", "--json", str(out))
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["same_logits"] is False and "last step's logits: DIFFERENT" in r.stdout
    for args in (("--profile", "--against-src", str(tmp_path / "nowhere")),
                 ("--against-src", str(src)),
                 ("--profile", "--against-src", str(src), "--against", "float32")):
        bad = _cli("--model", "rwkv-4-tiny", *args)
        assert bad.returncode == 2 and "--against-src" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
