"""A bounded LRU cache of RWKV states keyed by the token prefix that produced them (ai00's state
trie, flattened to hashes).

Prompts run in chunks whose boundaries sit at absolute multiples of `chunk` tokens, so a state
cached at a boundary is exactly the state a cold run reaches there: a request that resumes from it
computes the remaining chunks with the same boundaries, and gets bit-identical logits. Two kinds
of entry:
  * boundary entries (prefix length a multiple of `chunk`): the state only; a later prompt that
    extends the prefix resumes from it.
  * prompt entries (a whole prompt): the state and the logits of its last position; the same prompt
    again skips its forward entirely.
Entries are cloned on the way in and on the way out: no request can read or modify another's state.
On the CPU an entry lives in an anonymous memory mapping of its own rather than on the malloc heap,
so the memory of an evicted entry goes back to the OS at once (see `_private_copy`).
"""
import hashlib
import logging
import mmap
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import torch

from ..state import State

log = logging.getLogger("rwkv_engine.serve")

def prefix_keys(tokens, chunk):
    """{prefix length: key} for every chunk boundary < len(tokens) and for the whole prompt.
    Keys are blake2b digests of the int32 token bytes (one incremental pass)."""
    data = torch.as_tensor(tokens, dtype=torch.int32).numpy().tobytes()
    h, keys = hashlib.blake2b(digest_size=16), {}
    for start in range(0, len(tokens), chunk):
        end = min(start + chunk, len(tokens))
        h.update(data[4 * start:4 * end])
        keys[end] = h.copy().digest()
    return keys


@dataclass
class Hit:
    length: int                        # tokens of the prompt covered by the cached state
    state: State                       # a private copy
    logits: Optional[torch.Tensor]     # [V] for a whole-prompt hit, else None


MAPPED_MIN_BYTES = 64 * 1024      # smaller entries stay on the heap (a mapping takes whole pages)


def _mapped_bytes(n):
    """n bytes in an anonymous mapping of their own, as a uint8 tensor that holds the mapping (it is
    unmapped when the tensor and its views are gone); None where no mapping can be made."""
    try:
        return torch.frombuffer(mmap.mmap(-1, n), dtype=torch.uint8)
    except (OSError, ValueError):
        return None


def _private_copy(state, logits):
    """A copy of (state, logits) that shares nothing with the caller. A CPU `State` of at least
    MAPPED_MIN_BYTES is copied into one anonymous mapping (64-byte aligned fields), unmapped when the
    last tensor of the entry dies: entries on the heap are freed in LRU order between live
    allocations of the scheduler and the HTTP threads, and glibc keeps such holes resident; measured
    with the 169m load test, the server's peak RSS grew by ~1.5x the cache's bytes that way, and by
    its bytes this way. Where no mapping can be made (e.g. the process's map count is at its limit),
    the entry is cloned onto the heap instead."""
    def on_the_heap():
        return state.clone(), None if logits is None else logits.detach().clone()
    tensors = dict(state.tensors()) if isinstance(state, State) else None
    if tensors is None or any(t.device.type != "cpu" for t in tensors.values()):
        return on_the_heap()
    if logits is not None:
        tensors["logits"] = logits.detach()
    sizes = {k: t.numel() * t.element_size() for k, t in tensors.items()}
    offsets, total = {}, 0
    for k, n in sizes.items():
        offsets[k], total = total, total + (n + 63) // 64 * 64
    flat = _mapped_bytes(total) if total >= MAPPED_MIN_BYTES else None
    if flat is None:
        return on_the_heap()
    copies = {k: flat[offsets[k]:offsets[k] + sizes[k]].view(t.dtype).view(t.shape).copy_(t)
              for k, t in tensors.items()}
    return State(**{k: copies[k] for k in state.tensors()}), copies.get("logits")


def _nbytes(state, logits):
    return state.nbytes + (0 if logits is None else logits.numel() * logits.element_size())


class PrefixCache:
    """LRU over {key: (state, logits)} holding at most `max_bytes` of tensors (0 disables it)."""

    def __init__(self, max_bytes, chunk):
        if chunk < 1:
            raise ValueError(f"prefix cache chunk must be >= 1, got {chunk}")
        self.max_bytes, self.chunk = int(max_bytes), chunk
        self.bytes, self.hits, self.misses = 0, 0, 0
        self._entries = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self):
        return len(self._entries)

    def lookup(self, tokens) -> Optional[Hit]:
        """The longest cached start for `tokens`: the whole prompt (with its logits), else the
        longest chunk boundary strictly inside it. Counts a hit or a miss."""
        keys = prefix_keys(tokens, self.chunk)
        n = len(tokens)
        with self._lock:
            for length in sorted(keys, reverse=True):
                entry = self._entries.get(self._key(keys[length], whole=length == n))
                if entry is None:
                    continue
                self._entries.move_to_end(self._key(keys[length], whole=length == n))
                self.hits += 1
                state, logits = entry
                return Hit(length, state.clone(), None if logits is None else logits.clone())
            self.misses += 1
        return None

    def put(self, key, state, logits=None):
        """Store a copy of `state` (and `logits` for a whole-prompt entry) under a prefix key."""
        size = _nbytes(state, logits)
        if size > self.max_bytes:
            return
        full_key = self._key(key, whole=logits is not None)
        try:
            entry = _private_copy(state, logits)
        except (MemoryError, RuntimeError) as e:       # out of memory: serve on, without this entry
            log.warning("prefix cache: entry not stored: %s: %s", type(e).__name__, e)
            return
        with self._lock:
            old = self._entries.pop(full_key, None)
            if old is not None:
                self.bytes -= _nbytes(*old)
            self._entries[full_key] = entry
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.bytes -= _nbytes(*evicted)

    @staticmethod
    def _key(digest, whole):
        return digest + (b"P" if whole else b"B")
