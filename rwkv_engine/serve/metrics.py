"""What /metrics reports, in Prometheus' text format (prometheus_client, one registry per server)."""
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

disable_created_metrics()          # no `*_created` timestamp series beside every counter

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("rwkv_requests", "Requests by outcome (ok, cancelled, invalid, "
                                "queue_full, error)", ["outcome"], registry=r)
        self.prompt_tokens = Counter("rwkv_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.prefill_tokens = Counter("rwkv_prefill_tokens", "Prompt tokens actually run (the rest came "
                                      "from the prefix cache)", registry=r)
        self.generated_tokens = Counter("rwkv_generated_tokens", "Tokens generated", registry=r)
        self.batch_size = Gauge("rwkv_batch_size", "Streams in the latest decode step", registry=r)
        self.decode_batch = Histogram("rwkv_decode_batch_size", "Streams per decode step",
                                      buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("rwkv_queue_depth", "Requests waiting for a slot", registry=r)
        self.active = Gauge("rwkv_active_streams", "Streams being prefilled or decoded", registry=r)
        self.cache_hits = Counter("rwkv_prefix_cache_hits", "Prompts that started from a cached state",
                                  registry=r)
        self.cache_misses = Counter("rwkv_prefix_cache_misses", "Prompts that found no cached state",
                                    registry=r)
        self.cache_bytes = Gauge("rwkv_prefix_cache_bytes", "Bytes held by the prefix-state cache", registry=r)
        # where the scheduler thread's time goes (wall seconds of each part, summed; on a GPU a forward's
        # part ends once its kernels are queued, and the sampling that reads the logits waits for them)
        self.decode_seconds = Counter("rwkv_decode_forward_seconds", "Wall seconds in the decode steps' "
                                      "batched forwards", registry=r)
        self.prefill_seconds = Counter("rwkv_prefill_forward_seconds", "Wall seconds in the prompt chunks' "
                                       "forwards", registry=r)
        self.output_seconds = Counter("rwkv_output_seconds", "Wall seconds sampling the decode steps' rows and "
                                      "applying each stream's loop (stop, text, events)", registry=r)
        self.ttft = Histogram("rwkv_time_to_first_token_seconds", "Submission to first token",
                              buckets=TTFT_BUCKETS, registry=r)

    def render(self):
        return generate_latest(self.registry)
