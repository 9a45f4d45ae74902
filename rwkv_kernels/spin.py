"""The one import-time action of the engine: shortening the spin of torch's OpenMP threads.

torch's OpenMP (GNU libgomp) threads spin for ~300000 rounds (~10-20 ms here) after each parallel
region before they sleep, and a spinning thread holds a core that the library's own pool (which runs
the decode and short-prompt products) then waits for. `set_default()`, called by `import rwkv_kernels`,
sets GOMP_SPINCOUNT=10000 (about half a millisecond: threads stay hot between the ops of one forward)
unless the environment already sets GOMP_SPINCOUNT or OMP_WAIT_POLICY (a user's value is never
overridden). libgomp reads it once, when torch loads, so this must happen before `import torch`: a
program that imports torch first keeps the default spin, and the first use of the C kernels then warns
once (`warn_if_too_late`). Measured (169m, 2 threads, a 14-token prompt chunk): 78 ms per forward with
the default spin, 52 ms with 10000.
"""
import os
import sys
import warnings

VARIABLE = "GOMP_SPINCOUNT"
DEFAULT = "10000"
USER_SETTINGS = (VARIABLE, "OMP_WAIT_POLICY")

set_here = False            # this process set GOMP_SPINCOUNT (children inherit it)
too_late = False            # torch was imported first and the user set nothing: the default spin runs
_warned = False


def set_default():
    """Set GOMP_SPINCOUNT unless the user set it (or OMP_WAIT_POLICY) or torch is already loaded."""
    global set_here, too_late
    user_set = bool(set(USER_SETTINGS) & set(os.environ))
    too_late = not user_set and "torch" in sys.modules
    set_here = not user_set and not too_late
    if set_here:
        os.environ[VARIABLE] = DEFAULT


def warn_if_too_late():
    """One RuntimeWarning per process when the setting could not take effect (torch came first)."""
    global _warned
    if too_late and not _warned:
        _warned = True
        warnings.warn("kernels: torch was imported before rwkv_engine, so torch's OpenMP threads keep "
                      "spinning ~10-20 ms after each op and decode slows next to them; import rwkv_engine "
                      f"(or kernels) before torch, or set {VARIABLE}={DEFAULT} in the environment",
                      RuntimeWarning, stacklevel=3)
