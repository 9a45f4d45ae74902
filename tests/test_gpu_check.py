"""bench/gpu_check.py refuses to run without CUDA: one line naming CUDA, non-zero exit status."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_without_cuda_exits_with_one_line(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO), OUT=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode != 0
    assert len(lines) == 1 and "CUDA" in lines[0], lines
    assert not (tmp_path / "gpu_check.json").exists()


def _raise(exc):
    raise exc


def test_only_not_applicable_counts_as_skipped():
    """A renamed kernel function (ImportError/AttributeError) is an error, not a skip."""
    from bench import gpu_check
    results = {"sections": {}}
    cases = {"import": ImportError("cannot import name '_launch_config'"), "attr": AttributeError("no _wkv_forward"),
             "skip": gpu_check.Skip("no second GPU"), "boom": RuntimeError("bad")}
    for name, exc in cases.items():
        gpu_check.section(results, name, _raise, exc)
    status = {name: e["status"] for name, e in results["sections"].items()}
    assert status["import"].startswith("error: ImportError") and status["attr"].startswith("error: AttributeError")
    assert status["skip"] == "skipped: no second GPU" and status["boom"].startswith("error: RuntimeError")


def test_the_kernel_functions_it_times_exist():
    """The one place gpu_check imports rwkv_kernels.wkv_triton from resolves here (no GPU needed)."""
    from bench import gpu_check
    launch_config, wkv_forward, is_interpreted = gpu_check.triton_wkv_api()
    block_c, num_warps = launch_config(5120)
    assert block_c > 0 and num_warps > 0 and callable(wkv_forward) and callable(is_interpreted)
    assert callable(gpu_check.engine_synthetic_state_dict())
