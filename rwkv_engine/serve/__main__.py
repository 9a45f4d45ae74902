"""python -m rwkv_engine.serve --model NAME [options]: see `python -m rwkv_engine.serve --help`."""
import argparse
import ctypes
import logging
import os
import signal
import socket
import sys

import uvicorn


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m rwkv_engine.serve",
                                description="Serve an RWKV-4 model over the OpenAI HTTP API.")
    p.add_argument("--model", required=True, help="registered name (e.g. rwkv-4-pile-169m) or checkpoint path; "
                                                   "also the model id clients ask for")
    p.add_argument("--checkpoint", help="checkpoint for a registered name (default: synthetic weights)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="float32", help="float32 | float16 | bfloat16 (default float32)")
    p.add_argument("--weights", default=None, help="weight format, as rwkv_engine.load(weights=...) (e.g. int8)")
    p.add_argument("--pipeline", action="store_true",
                   help="run as one rank of a torchrun pipeline (rwkv_engine.pipeline): rank 0 serves HTTP, "
                        "the other ranks hold their layers")
    p.add_argument("--layers-per-rank", default=None, help="with --pipeline: e.g. 6,6 (default: even split)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed when ready)")
    p.add_argument("--max-batch", type=int, default=32, help="streams decoded together (default 32)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 429 (default 64)")
    p.add_argument("--max-prompt-tokens", type=int, default=4096)
    p.add_argument("--max-tokens", type=int, default=1024, help="largest max_tokens a request may ask for")
    p.add_argument("--prefix-cache-mb", type=float, default=256, help="prefix-state cache size (0: off)")
    p.add_argument("--prefill-chunk", type=int, default=32, help="prompt tokens per prefill chunk (default 32)")
    p.add_argument("--prefill-rows", type=int, default=64,
                   help="prompt tokens of several requests' equal-length chunks run in one step (default 64)")
    p.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds in-flight requests get to finish after SIGTERM before they are cancelled")
    p.add_argument("--log-level", default="warning")
    args = p.parse_args(argv)
    for name in ("max_batch", "max_queue", "max_prompt_tokens", "max_tokens", "prefill_chunk",
                 "prefill_rows"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.prefix_cache_mb < 0 or not 0 <= args.port < 65536:
        p.error("--prefix-cache-mb must be >= 0 and --port in [0, 65535]")
    if args.layers_per_rank is not None and not args.pipeline:
        p.error("--layers-per-rank needs --pipeline")
    if args.pipeline and args.weights not in (None, args.dtype):
        p.error(f"--weights {args.weights} is not supported with --pipeline (the stages hold --dtype weights)")
    return args


M_ARENA_MAX = -8                                      # glibc's mallopt parameter


def limit_malloc_arenas(n=1):
    """Let glibc's malloc use at most `n` arenas in this process; call it before threads start.
    By default every thread that allocates gets an arena of its own (up to 8 per core): here the
    scheduler, the event loop, torch's and the kernels' pools and the tokenizer's; memory freed in
    one arena cannot serve another, and the peak RSS under load grew with it (169m, 32 streams:
    ~80 MiB over idle against ~40 with one arena, the same tokens/s). Honours a MALLOC_ARENA_MAX
    the user set; does nothing without glibc. Returns whether the limit was set."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return mallopt(M_ARENA_MAX, n) == 1


def load_model(args):
    """The model the scheduler owns: one process, or (--pipeline) rank 0's handle on a pipeline whose
    other ranks never return from pipeline.load (they serve their layers until rank 0 closes it)."""
    import rwkv_engine
    if args.pipeline:
        from rwkv_engine import pipeline
        split = None if args.layers_per_rank is None else [int(n) for n in args.layers_per_rank.split(",")]
        return pipeline.load(args.model, checkpoint=args.checkpoint, device=args.device, dtype=args.dtype,
                             layers_per_rank=split)
    extra = {"weights": args.weights} if args.weights else {}
    return rwkv_engine.load(args.model, device=args.device, dtype=args.dtype, checkpoint=args.checkpoint, **extra)


def bind(host, port):
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT: uvicorn stops accepting connections; the scheduler stops admitting, lets
    in-flight requests run `grace_s` more seconds, then ends them (a stream gets a last chunk with
    finish_reason "cancelled"), so every connection closes cleanly and the process exits 0."""

    def __init__(self, config, scheduler, grace_s):
        super().__init__(config)
        self.scheduler, self.grace_s = scheduler, grace_s

    def handle_exit(self, sig, frame):
        if not self.should_exit:
            self.scheduler.drain(self.grace_s)
        super().handle_exit(sig, frame)


def main(argv=None):
    args = parse_args(argv)
    limit_malloc_arenas()
    from .api import Limits, create_app
    from .prefix_cache import PrefixCache
    from .scheduler import Scheduler

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        model = load_model(args)
        sock = bind(args.host, args.port)
    except (ValueError, OSError, TypeError, RuntimeError) as e:   # RuntimeError: a PipelineError
        print(f"rwkv_engine.serve: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    cache = PrefixCache(int(args.prefix_cache_mb * 2**20), args.prefill_chunk) if args.prefix_cache_mb else None
    scheduler = Scheduler(model, args.max_batch, args.max_queue, args.prefill_chunk, cache,
                          prefill_rows=args.prefill_rows)
    host, port = sock.getsockname()[:2]
    ready = lambda: print(f"rwkv_engine.serve: {model!r} ready at http://{host}:{port}", flush=True)
    app = create_app(scheduler, args.model, Limits(args.max_prompt_tokens, args.max_tokens), on_ready=ready)
    config = uvicorn.Config(app, log_level=args.log_level, access_log=False,
                            timeout_graceful_shutdown=args.shutdown_timeout + 5)
    server = DrainingServer(config, scheduler, args.shutdown_timeout)
    for sig in (signal.SIGINT, signal.SIGTERM):      # uvicorn re-raises the signal it shut down on
        signal.signal(sig, lambda *_: None)           # after the graceful shutdown: make that a no-op
    try:
        server.run(sockets=[sock])
    finally:
        if hasattr(model, "close"):                   # a pipeline: tell the other ranks to exit
            model.close()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
