"""How busy the machine was while a measurement ran: CPU time used by *other* processes.

A decode on 2 threads slows 10-20x when something else runs on the same cores, so every run
records, from /proc/stat (all CPUs' busy jiffies) minus this process's own CPU time:

    others_cpu_s     CPU seconds other processes used during the run
    others_cpu_pct   that as a share of the machine's capacity (wall time x online CPUs)
    loadavg_1m       the 1-minute load average at the end

Tables show others_cpu_pct; above BUSY_PCT the commands print a loud warning.
"""
import os
import time

BUSY_PCT = 5.0                        # above this, a timing is not a quiet-machine timing
_BUSY_FIELDS = (0, 1, 2, 5, 6, 7)     # user nice system irq softirq steal (not idle, iowait)


def read_proc_stat(path="/proc/stat"):
    """Busy CPU seconds of the whole machine since boot (None where /proc/stat is missing)."""
    try:
        with open(path) as f:
            fields = f.readline().split()
    except OSError:
        return None
    ticks = [int(x) for x in fields[1:]]
    return sum(ticks[i] for i in _BUSY_FIELDS if i < len(ticks)) / os.sysconf("SC_CLK_TCK")


def own_cpu_s():
    """CPU seconds of this process (all threads) and of its children that were waited for."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def n_cpus():
    return os.cpu_count() or 1


def others_share(busy_before, busy_after, own_before, own_after, wall_s, cpus):
    """{'others_cpu_s', 'others_cpu_pct'} from two snapshots (pure: the formula the meter uses)."""
    capacity = wall_s * cpus
    # both counters tick in jiffies (10 ms per CPU), so on a run of a few ticks the difference can
    # come out past the machine's capacity or below zero: clamp it to what is physically possible
    others = min(max(0.0, (busy_after - busy_before) - (own_after - own_before)), max(capacity, 0.0))
    return {"others_cpu_s": others, "others_cpu_pct": 100 * others / capacity if capacity > 0 else None}


class OthersMeter:
    """start() ... stop() -> {'others_cpu_s', 'others_cpu_pct', 'loadavg_1m'} (Nones off Linux)."""

    def __init__(self, busy=read_proc_stat, own=own_cpu_s, clock=time.perf_counter, cpus=n_cpus):
        self._busy, self._own, self._clock, self._cpus = busy, own, clock, cpus

    def start(self):
        self._t0, self._b0, self._o0 = self._clock(), self._busy(), self._own()
        return self

    def stop(self):
        wall, busy = self._clock() - self._t0, self._busy()
        loadavg = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        if busy is None or self._b0 is None:
            return {"others_cpu_s": None, "others_cpu_pct": None, "loadavg_1m": loadavg}
        return {**others_share(self._b0, busy, self._o0, self._own(), wall, self._cpus()), "loadavg_1m": loadavg}


def busy_warning(pct):
    """A loud one-line warning when other processes took more than BUSY_PCT of the machine, else ''."""
    if pct is None or pct <= BUSY_PCT:
        return ""
    return (f"WARNING: other processes used {pct:.0f}% of this machine's CPU time during the run "
            f"(> {BUSY_PCT:.0f}%): timings are not quiet-machine timings")


def wait_quiet(max_wait_s, sample_s=1.0, threshold_pct=BUSY_PCT, sleep=None, meter=None):
    """Wait (at most max_wait_s) until other processes use <= threshold_pct over one sample.
    -> (quiet: bool, last measured pct)."""
    deadline = time.monotonic() + max_wait_s
    pct = None
    while True:
        m = (meter or OthersMeter()).start()
        (sleep or time.sleep)(sample_s)
        pct = m.stop()["others_cpu_pct"]
        if pct is None or pct <= threshold_pct:
            return True, pct
        if time.monotonic() >= deadline:
            return False, pct
