"""Facts and actions about this process that several commands share: the cores it may use, a child
that dies with its parent, giving freed heap back to the OS."""
import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1            # linux/prctl.h


def usable_cores():
    """The cores this process may run on (its affinity mask; os.cpu_count() where there is none)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def die_with_parent(sig=signal.SIGTERM):
    """Called in a child before exec (subprocess's preexec_fn): the kernel sends it `sig` when the
    parent dies, however it dies (Linux; elsewhere a no-op)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
    except (OSError, AttributeError):
        pass


def trim_heap():
    """Return freed heap memory to the OS (glibc keeps freed slices between long-lived tensors, which
    would otherwise show as resident memory)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
