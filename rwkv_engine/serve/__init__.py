"""An OpenAI-compatible server for RWKV-4 with continuous batching of states.

    python -m rwkv_engine.serve --model rwkv-4-pile-169m --port 8000

Three pieces, one owner each: `api` (HTTP: validation, OpenAI wire format, SSE), `scheduler` (the
only code that touches the model: batches every active stream into one forward per step) and
`prefix_cache` (states of prompt prefixes, LRU-bounded in bytes).
"""
from .prefix_cache import PrefixCache
from .scheduler import Event, Job, QueueFull, Scheduler, ShuttingDown

__all__ = ["PrefixCache", "Scheduler", "Job", "Event", "QueueFull", "ShuttingDown"]
