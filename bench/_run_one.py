"""Old name of `bench.runner`, kept so that code written against it keeps importing."""
from bench.runner import WARMUP_TOKENS, run_child  # noqa: F401
