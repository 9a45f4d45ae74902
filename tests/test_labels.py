"""Issue 19, round 3: what the outputs of a run say about themselves (synthetic weights, busy
machines, a suspect bandwidth baseline), where the tests write, and one JSON schema for
bench.generate with and without --pipeline."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# The test suite's cache

def project_cache_dirs():
    """Every place the project writes generated files to."""
    import kernels.cpu_c
    from bench import machine, peers
    from rwkv_engine import files
    return {"files.cache_dir": files.cache_dir(), "kernels": kernels.cpu_c._cache_dir(),
            "bench.machine": machine.cache_dir(), "bench.peers": peers._rwkv_cache()}


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
