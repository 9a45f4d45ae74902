"""python -m rwkv_engine.serve --model NAME [options]: see `python -m rwkv_engine.serve --help`."""
import ctypes
import logging
import math
import os
import signal
import socket
import sys
import time

import uvicorn

from rwkv_kernels import formats

from ..cli import OneLineParser

MAX_CONNECTIONS = 512
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")      # uvicorn's
MAX_SECONDS = 86400.0          # timeouts above a day are a typo (threading refuses ~1e10 s and more)


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    read_numbers(parser, args)
    check_combinations(parser, args)
    return args


def build_parser():
    p = OneLineParser(prog="python -m rwkv_engine.serve",
                      description="Serve an RWKV-4 model over the OpenAI HTTP API.")
    add_model_options(p)
    add_listening_options(p)
    add_batching_options(p)
    add_connection_options(p)
    p.add_argument("--log-level", default="warning", choices=LOG_LEVELS)
    return p


def add_model_options(p):
    p.add_argument("--model", required=True, help="registered name (e.g. rwkv-4-pile-169m) or checkpoint path; "
                                                   "also the model id clients ask for")
    p.add_argument("--checkpoint", help="checkpoint for a registered name (default: synthetic weights)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="float32", help="float32 | float16 | bfloat16 (default float32)")
    p.add_argument("--weights", default=None, choices=formats.NAMES, metavar="FORMAT",
                   help=f"weight format, as rwkv_engine.load(weights=...): {', '.join(formats.names())}")
    p.add_argument("--pipeline", action="store_true",
                   help="run as one rank of a torchrun pipeline (rwkv_engine.pipeline): rank 0 serves HTTP, "
                        "the other ranks hold their layers")
    p.add_argument("--layers-per-rank", default=None, help="with --pipeline: e.g. 6,6 (default: even split)")


def add_listening_options(p):
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", default="8000", help="0 picks a free port (printed when ready)")


def add_batching_options(p):
    p.add_argument("--max-batch", default="32", help="streams decoded together (default 32)")
    p.add_argument("--max-queue", default="64", help="requests waiting for a slot before 429 (default 64)")
    p.add_argument("--max-prompt-tokens", default="4096", help="longest prompt in tokens (default 4096); "
                   "also bounds the request body (1 MiB + 64 bytes per token)")
    p.add_argument("--max-tokens", default="1024", help="largest max_tokens a request may ask for")
    p.add_argument("--prefix-cache-mb", default="256", help="prefix-state cache size (0: off)")
    p.add_argument("--prefill-chunk", default="32", help="prompt tokens per prefill chunk (default 32)")
    p.add_argument("--prefill-rows", default="64",
                   help="prompt tokens of several requests' equal-length chunks run in one step (default 64)")


def add_connection_options(p):
    p.add_argument("--shutdown-timeout", default="10",
                   help="seconds in-flight requests get to finish after SIGTERM before they are cancelled")
    p.add_argument("--read-timeout", default="30",
                   help="seconds a client has to send a request's headers and body, from when it connects "
                        "or its previous response ended (default 30); then 408 and the connection is closed. "
                        "An idle keep-alive connection is closed silently after it: keep it above your "
                        "clients' keep-alive expiry (5 s for httpx and the OpenAI client)")
    p.add_argument("--max-connections", default=str(MAX_CONNECTIONS),
                   help=f"open client connections; one more is answered 503 and closed (default {MAX_CONNECTIONS})")


COUNT_OPTIONS = ("max_batch", "max_queue", "max_prompt_tokens", "max_tokens", "prefill_chunk", "prefill_rows",
                 "max_connections")                     # integers >= 1


def read_numbers(p, args):
    """The numeric options (strings as parsed) as numbers in their ranges, or a usage error."""
    for name in COUNT_OPTIONS:
        setattr(args, name, number(p, name, args, int, 1))
    args.port = number(p, "port", args, int, 0, 65535)
    args.prefix_cache_mb = number(p, "prefix_cache_mb", args, float, 0, 2.0**40)
    args.shutdown_timeout = number(p, "shutdown_timeout", args, float, 0, MAX_SECONDS)
    args.read_timeout = number(p, "read_timeout", args, float, 0, MAX_SECONDS, low_open=True)


def check_combinations(p, args):
    if args.layers_per_rank is not None and not args.pipeline:
        p.error("--layers-per-rank needs --pipeline")
    if args.pipeline and args.weights not in (None, args.dtype):
        p.error(f"--weights {args.weights} is not supported with --pipeline (the stages hold --dtype weights)")


def number(parser, name, args, kind, low, high=None, low_open=False):
    """args.<name> (a string) as a finite `kind` in [low, high] (low excluded with low_open), or a
    one-line usage error naming the option."""
    text, option = getattr(args, name), "--" + name.replace("_", "-")
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value):
        parser.error(f"{option} must be a finite {'integer' if kind is int else 'number'}, got {text!r}")
    if value < low or (low_open and value == low) or (high is not None and value > high):
        rule = f"> {low:g}" if low_open else f">= {low:g}"
        parser.error(f"{option} must be {rule}" + ("" if high is None else f" and <= {high:g}") + f", got {text}")
    return value


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


FD_RESERVE = 128               # open files besides the connections: checkpoint, tokenizer, libraries, pipes


def fit_open_files(max_connections):
    """Raise the soft limit on open files to fit `max_connections` connections; None when done (or
    not needed), else a one-line reason (the hard limit is lower)."""
    try:
        import resource
    except ImportError:                                # not POSIX: nothing to check
        return None
    need = max_connections + FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return None
    if hard != resource.RLIM_INFINITY and hard < need:
        return (f"--max-connections {max_connections} needs {need} open files, over this process's limit "
                f"of {hard} (ulimit -n): lower --max-connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    return None


def guarded_protocol(read_timeout, max_connections):
    """uvicorn's h11 protocol with two bounds on clients: a request whose headers and body have not
    all arrived `read_timeout` seconds after the connection opened (or after its previous response
    ended) gets 408 and the connection is closed (a client that sends headers and never the body
    would otherwise hold its connection forever; one that sent nothing is closed silently, as an
    idle keep-alive connection is); a connection beyond `max_connections` open ones gets 503 and is
    closed at once, so slow clients cannot take every file descriptor."""
    from uvicorn.protocols.http.h11_impl import H11Protocol
    from .api import raw_error

    timed_out = raw_error(408, f"the request did not arrive within {read_timeout:g} s (--read-timeout)",
                          code="request_timeout")
    too_many = raw_error(503, f"the server has {max_connections} open connections (--max-connections); "
                              "retry later", code="too_many_connections", type_="server_error")
    return type("GuardedH11Protocol", (ConnectionGuard, H11Protocol),
                {"read_timeout": read_timeout, "max_connections": max_connections,
                 "timed_out": timed_out, "too_many": too_many})


class ConnectionGuard:
    """The bounds of `guarded_protocol`, mixed into uvicorn's H11Protocol; the class that mixes it in
    sets read_timeout, max_connections and the two raw responses (timed_out, too_many)."""
    read_timeout = max_connections = timed_out = too_many = None
    _deadline = _waiting_for = None
    _received = False                                  # bytes of the awaited request arrived

    def connection_made(self, transport):
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            transport.write(self.too_many)
            transport.close()
            return
        self._arm()

    def data_received(self, data):
        self._received = True
        super().data_received(data)
        self._disarm_when_read()

    def on_response_complete(self):
        self._arm()                                    # the next request gets read_timeout seconds
        super().on_response_complete()                  # (which may start a pipelined one)
        self._disarm_when_read()

    def connection_lost(self, exc):
        self._disarm()
        super().connection_lost(exc)

    def _arm(self):
        self._disarm()
        self._waiting_for = self.cycle                 # done once a newer cycle has its whole body
        self._received = False
        self._deadline = self.loop.call_later(self.read_timeout, self._read_timed_out)

    def _disarm(self):
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _disarm_when_read(self):
        cycle = self.cycle
        if self._deadline is not None and cycle is not None and cycle is not self._waiting_for \
                and not cycle.more_body:
            self._disarm()

    def _read_timed_out(self):
        self._deadline = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        waiting = cycle is None or cycle is self._waiting_for
        if (waiting and self._received) or not (waiting or cycle.response_started):
            self.transport.write(self.timed_out)
        self.transport.close()                         # the app sees the client disconnect


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT the scheduler stops admitting, lets in-flight requests run `grace_s` more
    seconds, then ends them (a stream gets a last chunk with finish_reason "cancelled"). The server
    keeps answering meanwhile (a new request gets 503); once nothing is in flight uvicorn stops
    accepting connections, every connection closes cleanly and the process exits 0. A second
    signal cancels what is still in flight at once."""

    def __init__(self, config, scheduler, grace_s):
        super().__init__(config)
        self.scheduler, self.grace_s = scheduler, grace_s
        self.draining_since = None

    def handle_exit(self, sig, frame):
        if self.draining_since is None:
            self.draining_since = time.monotonic()
            self.scheduler.drain(self.grace_s)
            return
        self.scheduler.drain(0)                        # a second signal: cancel what is in flight now
        super().handle_exit(sig, frame)

    async def on_tick(self, counter):
        if self.draining_since is not None and not self.should_exit:
            s = self.scheduler
            idle = s.active_streams == 0 and not s.waiting
            self.should_exit = idle or time.monotonic() - self.draining_since > self.grace_s + 1
        return await super().on_tick(counter)


def describe(model):
    """The model as the ready line names it, saying when its weights are synthetic."""
    text = repr(model)
    if getattr(model, "synthetic", False) and "synthetic" not in text:
        text += " on synthetic weights"
    return text


def main(argv=None):
    args = parse_args(argv)
    limit_malloc_arenas()
    from .api import Limits, create_app
    from .prefix_cache import PrefixCache
    from .scheduler import Scheduler

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    problem = fit_open_files(args.max_connections)
    if problem:
        print(f"rwkv_engine.serve: error: {problem}", file=sys.stderr)
        return 2
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
    ready = lambda: print(f"rwkv_engine.serve: {describe(model)} ready at http://{host}:{port}", flush=True)
    app = create_app(scheduler, args.model, Limits(args.max_prompt_tokens, args.max_tokens), on_ready=ready)
    config = uvicorn.Config(app, log_level=args.log_level, access_log=False,
                            http=guarded_protocol(args.read_timeout, args.max_connections),
                            # the guard closes idle connections at read_timeout; uvicorn's own 5 s
                            # would race clients that keep a connection for 5 s (httpx, OpenAI's)
                            timeout_keep_alive=args.read_timeout + 1,
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
