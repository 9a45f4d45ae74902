"""Peak memory *excluding parameters*, measured the same way for every model.

"Excluding parameters" means: the peak during generation minus the footprint once the model is
loaded and warmed up. The reset happens after load + warm-up, the read after generation:

* CPU, method "clear_refs" (Linux): writing "5" to /proc/self/clear_refs resets the kernel's RSS
  high-water mark (VmHWM) to the current RSS; after generation VmHWM - RSS-at-reset is the peak of
  everything generation added: the RWKV state or the KV cache, activations, logits, allocator slack.
  It is exact (the kernel tracks it on every page fault) and costs nothing while generation runs.
* CPU, method "sampler" (fallback when clear_refs is not writable): a thread reads RSS at >= 200 Hz;
  the peak is the largest sample minus the first. It can miss spikes shorter than 5 ms.
* GPU, method "cuda_max_allocated": torch.cuda.reset_peak_memory_stats() at the reset,
  torch.cuda.max_memory_allocated() - memory_allocated-at-reset after. This counts tensor bytes held
  through PyTorch's caching allocator (not the allocator's cached-but-free blocks, not the CUDA
  context, not cuBLAS workspaces).

Memory-mapped weights: pages of a file-backed mmap count in RSS once touched. The warm-up runs a
whole prefill and a few decode steps, which touches every weight before the reset, so they sit in
the baseline and not in the difference. Freed heap memory that glibc keeps after warm-up would hide
later allocations of the same size, so `reset()` first runs `gc.collect()` and `malloc_trim(0)`.
"""
import gc
import os
import re
import threading
import time

CLEAR_REFS = "/proc/self/clear_refs"
SAMPLER_HZ = 200


def _status_kib(field):
    with open("/proc/self/status") as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    return int(m.group(1)) if m else None


def rss_bytes():
    """Current resident set size of this process in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def hwm_bytes():
    """RSS high-water mark (VmHWM) of this process in bytes."""
    return _status_kib("VmHWM") * 1024


def clear_refs_works():
    """True when this process may reset its RSS high-water mark."""
    try:
        with open(CLEAR_REFS, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def collect_and_trim():
    """Collect garbage and give freed memory back to the OS, so it cannot hide later allocations."""
    from rwkv_engine.process import trim_heap       # late: this module is imported before torch
    gc.collect()
    trim_heap()


class _RssSampler(threading.Thread):
    """Reads RSS every 1/hz s: one pread of /proc/self/statm on a descriptor kept open, so each
    sample holds the GIL for a few microseconds."""

    def __init__(self, hz=SAMPLER_HZ):
        super().__init__(daemon=True)
        self.period, self.peak, self.samples = 1.0 / hz, 0, 0
        self._stop_event = threading.Event()
        self._fd = os.open("/proc/self/statm", os.O_RDONLY)
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self):
        return int(os.pread(self._fd, 128, 0).split()[1]) * self._page

    def run(self):
        while not self._stop_event.wait(self.period):
            self.peak = max(self.peak, self._rss())
            self.samples += 1

    def stop(self):
        self._stop_event.set()
        self.join()
        self.peak = max(self.peak, self._rss())
        os.close(self._fd)
        return self.peak


class PeakMemory:
    """Measure the peak memory added between `reset()` and `read()`.

        meter = PeakMemory("cpu")           # or "cuda"; method="sampler" forces the fallback
        meter.reset()                       # after load + warm-up
        ... generate ...
        meter.read()  -> {"peak_bytes": ..., "baseline_bytes": ..., "method": ...}
    `current()` gives the memory added so far (peak so far for clear_refs / CUDA) without stopping.
    """

    def __init__(self, device="cpu", method=None):
        self.device = str(device)
        if self.device.startswith("cuda"):
            self.method = "cuda_max_allocated"
        else:
            self.method = method or ("clear_refs" if clear_refs_works() else "sampler")
        if self.method not in ("clear_refs", "sampler", "cuda_max_allocated"):
            raise ValueError(f"unknown memory method {self.method!r}")
        self.baseline = None
        self._sampler = None

    def reset(self):
        collect_and_trim()
        if self.method == "cuda_max_allocated":
            import torch
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
        elif self.method == "clear_refs":
            with open(CLEAR_REFS, "w") as f:
                f.write("5")
            self.baseline = rss_bytes()
        else:
            self.baseline = rss_bytes()
            self._sampler = _RssSampler()
            self._sampler.peak = self.baseline
            self._sampler.start()

    def current(self):
        """Peak added so far (clear_refs, CUDA) or RSS added now (sampler); does not stop anything."""
        if self.method == "cuda_max_allocated":
            import torch
            return torch.cuda.max_memory_allocated() - self.baseline
        if self.method == "clear_refs":
            return hwm_bytes() - self.baseline
        return max(self._sampler.peak, rss_bytes()) - self.baseline

    def read(self):
        if self.baseline is None:
            raise RuntimeError("PeakMemory.read() before reset()")
        if self.method == "cuda_max_allocated":
            import torch
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        elif self.method == "clear_refs":
            peak = hwm_bytes()
        else:
            peak = self._sampler.stop()
        out = {"peak_bytes": max(0, peak - self.baseline), "baseline_bytes": self.baseline,
               "method": self.method}
        if self._sampler is not None:
            out["samples"] = self._sampler.samples
        return out


def sampler_overhead(fn, repeats=3, clock=time.perf_counter):
    """Time fn() with and without the RSS sampler thread running; return (ratio, t_without, t_with).

    ratio = median time with the sampler / median time without (1.0 = no cost). Runs alternate so
    that drift (thermal, other processes) hits both sides alike.
    """
    plain, sampled = [], []
    for _ in range(repeats):
        t0 = clock()
        fn()
        plain.append(clock() - t0)
        sampler = _RssSampler()
        sampler.start()
        t0 = clock()
        fn()
        sampled.append(clock() - t0)
        sampler.stop()
    med = lambda xs: sorted(xs)[len(xs) // 2]
    return med(sampled) / med(plain), med(plain), med(sampled)
