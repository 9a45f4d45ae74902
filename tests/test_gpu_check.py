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
