"""The HTTP layer: request validation, the OpenAI wire format, server-sent events.

It never touches the model: it reads the body (bounded in bytes), parses it as JSON whatever its
Content-Type, validates every field, tokenizes (off the event loop), checks limits, hands a `Job` to
the scheduler and turns the scheduler's events into responses. Errors use OpenAI's body
`{"error": {"message", "type", "param", "code"}}`; a request field this server does not know gets
400, as OpenAI answers.
"""
import asyncio
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import List, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..sampling import MIN_TEMPERATURE, SamplingParams
from .scheduler import Job, QueueFull, Scheduler, ShuttingDown

log = logging.getLogger("rwkv_engine.serve")

CHAT_STOP = ("\n\nUser:", "\n\nSystem:")
ROLE_NAMES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}


BODY_BASE_BYTES = 2**20         # a request body may hold this much besides its prompt
BODY_BYTES_PER_TOKEN = 64       # prompt bytes per allowed token: text is ~4 bytes a token, JSON-escaped
                                # text at most ~6 a character, token ids at most 7 ("50276, ")
MAX_STOP_CHARS = 1000           # each token's stop check compares every prefix of every stop string
SEED_RANGE = (-2**63, 2**63 - 1)  # int64; choice i of n uses seed + i, which torch's generator takes


@dataclass
class Limits:
    max_prompt_tokens: int = 4096
    max_tokens: int = 1024
    max_n: int = 8

    @property
    def max_body_bytes(self):
        """Longer request bodies are refused (413) before they are parsed or tokenized."""
        return BODY_BASE_BYTES + BODY_BYTES_PER_TOKEN * self.max_prompt_tokens


class ApiError(Exception):
    def __init__(self, status, message, param=None, code=None, type_="invalid_request_error", headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type, self.headers = type_, headers


class AsciiJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: renders any str (a lone surrogate a client sent,
    quoted in an error message, would make UTF-8 encoding fail)."""

    def render(self, content):
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def error_body(message, param=None, code=None, type_="invalid_request_error"):
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status, message, param=None, code=None, type_="invalid_request_error", headers=None):
    return AsciiJSONResponse(error_body(message, param, code, type_), status_code=status, headers=headers)


STATUS_REASONS = {408: "Request Timeout", 503: "Service Unavailable"}


def raw_error(status, message, code=None, type_="invalid_request_error"):
    """A whole HTTP/1.1 response with OpenAI's error body that closes the connection: for the
    connection guard, which answers below the ASGI app."""
    body = json.dumps(error_body(message, None, code, type_)).encode("ascii")
    head = (f"HTTP/1.1 {status} {STATUS_REASONS[status]}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n"
            + ("retry-after: 1\r\n" if status == 503 else "") + "\r\n")
    return head.encode("ascii") + body


# -- request bodies --------------------------------------------------------------------------------
# Every number is checked against what its consumer takes (the sampler, torch's generator, the
# limits), so no value that passes can make generation fail; floats must be finite.
def Real(**bounds):
    return Field(None, allow_inf_nan=False, **bounds)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False
    include_obfuscation: Optional[StrictBool] = None          # accepted, no effect (nothing to obfuscate)


class _Generation(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: StrictStr
    max_tokens: Optional[StrictInt] = Field(None, ge=1)
    temperature: Optional[StrictFloat] = Real(ge=0, le=2)
    top_p: Optional[StrictFloat] = Real(gt=0, le=1)
    top_k: Optional[StrictInt] = Field(None, ge=0)                    # extension
    presence_penalty: Optional[StrictFloat] = Real(ge=-2, le=2)
    frequency_penalty: Optional[StrictFloat] = Real(ge=-2, le=2)
    # extension; bounded so that scaling any finite logit by it cannot overflow float32
    repetition_penalty: Optional[StrictFloat] = Real(ge=0.01, le=100)
    stop: Union[StrictStr, List[StrictStr], None] = None
    seed: Optional[StrictInt] = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    n: Optional[StrictInt] = Field(None, ge=1)
    stream: Optional[StrictBool] = None
    stream_options: Optional[StreamOptions] = None
    ignore_eos: Optional[StrictBool] = None                    # extension (vLLM's)


class CompletionRequest(_Generation):
    prompt: Union[StrictStr, List[StrictStr], List[StrictInt], List[List[StrictInt]]]
    best_of: Optional[StrictInt] = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: StrictStr
    content: Union[StrictStr, List[TextPart], None] = None


class ChatRequest(_Generation):
    messages: List[Message] = Field(..., min_length=1)
    max_completion_tokens: Optional[StrictInt] = Field(None, ge=1)


# Fields OpenAI defines that change nothing here: accepted and ignored.
IGNORED = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key",
                     "safety_identifier"})
# Fields OpenAI defines that this server does not implement: accepted only with a value that asks
# for nothing (null or the one listed), refused with 400 otherwise.
UNSUPPORTED = {"echo": (False,), "suffix": (), "logprobs": (False, 0), "top_logprobs": (0,),
               "logit_bias": ({},), "tools": ([],), "functions": ([],), "tool_choice": ("none",),
               "function_call": ("none",), "response_format": ({"type": "text"},), "modalities": (["text"],),
               "audio": (), "prediction": (), "web_search_options": (), "reasoning_effort": (), "verbosity": ()}
# In a chat message: `name` is ignored; the fields of a reply the client sends back must be empty.
MESSAGE_IGNORED = frozenset({"name"})
MESSAGE_UNSUPPORTED = {"tool_calls": ([],), "function_call": (), "tool_call_id": (), "refusal": (), "audio": (),
                       "annotations": ([],)}


def asks_nothing(value, no_op_values):
    return value is None or any(type(value) is type(v) and value == v for v in no_op_values)


def known_fields(obj, model_cls, ignored, unsupported, where=""):
    """The fields of the JSON object `obj` that `model_cls` reads. Ignored ones are dropped, an
    unsupported one that asks for something and any field OpenAI does not define are refused."""
    out = {}
    for key, value in obj.items():
        param = where + key
        if key in model_cls.model_fields:
            out[key] = value
        elif key in unsupported:
            if not asks_nothing(value, unsupported[key]):
                raise ApiError(400, f"{param} is not supported by this server", param)
        elif key not in ignored:
            raise ApiError(400, f"Unrecognized request argument supplied: {param}", param)
    return out


def request_fields(obj, model_cls):
    out = known_fields(obj, model_cls, IGNORED, UNSUPPORTED)
    if model_cls is ChatRequest and isinstance(out.get("messages"), list):
        out["messages"] = [known_fields(m, Message, MESSAGE_IGNORED, MESSAGE_UNSUPPORTED, f"messages.{i}.")
                           if isinstance(m, dict) else m for i, m in enumerate(out["messages"])]
    return out


def ill_formed_text(obj):
    """(path, str, UnicodeEncodeError) for a string value in the parsed JSON that is not valid
    Unicode (a lone surrogate, which JSON's \\u escapes can spell); None when all are."""
    todo = [("", obj)]                     # iterative: the depth is whatever json.loads accepted
    while todo:
        path, value = todo.pop()
        if isinstance(value, dict):
            todo.extend((f"{path}.{k}" if path else k, v) for k, v in value.items())
        elif isinstance(value, list):
            todo.extend((f"{path}.{i}" if path else str(i), v) for i, v in enumerate(value))
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                return path, value, e
    return None


def parse_body(raw: bytes, content_type, model_cls):
    """The request body -> a validated `model_cls`. The body is read as JSON whatever the
    Content-Type says (curl -d sends application/x-www-form-urlencoded)."""
    if not raw.strip():
        raise ApiError(400, "the request body is empty: send a JSON object")
    try:
        obj = json.loads(raw)
    except RecursionError:
        raise ApiError(400, "the request body is not valid JSON (nested too deeply)") from None
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the request body is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except ValueError as e:                  # JSONDecodeError, or an integer of too many digits
        media_type = (content_type or "application/json").split(";")[0].strip().lower()
        hint = "" if media_type == "application/json" else \
            f"; the body is read as JSON whatever its Content-Type ({content_type})"
        raise ApiError(400, f"the request body is not valid JSON ({e}){hint}") from None
    bad = ill_formed_text(obj)
    if bad is not None:
        path, text, e = bad
        raise ApiError(400, f"{path} is not valid Unicode ({e.reason} at index {e.start}: "
                            f"{text[e.start:e.end]!r}); send well-formed text", path)
    if isinstance(obj, dict):
        obj = request_fields(obj, model_cls)
    try:
        return model_cls.model_validate(obj)
    except ValidationError as e:
        raise validation_error(e.errors()[0]) from None


def validation_error(err):
    if err.get("type") == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON ({err.get('msg')})")
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    return ApiError(400, f"{param or 'body'}: {err.get('msg')}", param)


# -- the chat prompt format ---------------------------------------------------------------------
def chat_prompt(messages):
    """A plain transcript: "System: ...\\n\\nUser: ...\\n\\nAssistant: ...\\n\\nAssistant:".
    Blank lines inside a message are folded to single newlines so they cannot end a turn."""
    turns = []
    for i, m in enumerate(messages):
        if m.role not in ROLE_NAMES:
            raise ApiError(400, f"messages[{i}].role {m.role!r} is not one of {sorted(ROLE_NAMES)}",
                           f"messages.{i}.role")
        text = m.content if isinstance(m.content, str) else "".join(p.text for p in (m.content or []))
        while "\n\n" in text:
            text = text.replace("\n\n", "\n")
        turns.append(f"{ROLE_NAMES[m.role]}: {text.strip()}")
    return "\n\n".join(turns) + "\n\nAssistant:"


# -- turning a request into a Job -----------------------------------------------------------------
class JobBuilder:
    """Request body -> validated Job. Its entry points (`completion`, `chat`) do CPU work (JSON,
    validation, tokenizing up to a megabyte of text): the app runs them in a worker thread."""

    def __init__(self, model_name, tokenizer, vocab_size, limits: Limits, max_batch):
        self.model_name, self.tokenizer, self.vocab_size = model_name, tokenizer, vocab_size
        self.limits, self.max_batch = limits, max_batch
        # tokenizers' encode holds the GIL (the event loop would stop meanwhile); this one does not
        self.encode = None if tokenizer is None else getattr(tokenizer, "encode_releasing_gil", tokenizer.encode)

    def completion(self, raw, content_type):
        """-> (job, stream, include_usage) for POST /v1/completions."""
        body = parse_body(raw, content_type, CompletionRequest)
        self.check_model(body.model)
        if body.best_of not in (None, body.n or 1):
            raise ApiError(400, "best_of is not supported by this server", "best_of")
        ids = self.prompt_ids(body.prompt)
        return self.job(body, ids, 16 if body.max_tokens is None else body.max_tokens), *streaming(body)

    def chat(self, raw, content_type):
        """-> (job, stream, include_usage) for POST /v1/chat/completions."""
        body = parse_body(raw, content_type, ChatRequest)
        self.check_model(body.model)
        ids = self.prompt_ids(chat_prompt(body.messages))
        max_tokens = body.max_completion_tokens or body.max_tokens or min(256, self.limits.max_tokens)
        return self.job(body, ids, max_tokens, extra_stop=CHAT_STOP), *streaming(body)

    def check_model(self, name):
        if name != self.model_name:
            raise ApiError(404, f"The model {name!r} does not exist; this server serves {self.model_name!r}",
                           "model", "model_not_found")

    def prompt_ids(self, prompt):
        """str | [str] | [int] | [[int]] (one prompt) -> validated token ids."""
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ApiError(400, f"prompt holds {len(prompt)} prompts; this server takes one per request",
                               "prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ApiError(400, "this model has no tokenizer: give the prompt as token ids", "prompt")
            ids = self.encode(prompt)
        else:
            ids = list(prompt)
            bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise ApiError(400, f"prompt token id {bad} out of range [0, {self.vocab_size})", "prompt")
        if not ids:
            raise ApiError(400, "prompt is empty: give at least one token", "prompt")
        if len(ids) > self.limits.max_prompt_tokens:
            raise ApiError(400, f"prompt has {len(ids)} tokens, over this server's limit "
                                f"max_prompt_tokens={self.limits.max_prompt_tokens}", "prompt")
        return ids

    def job(self, body: _Generation, ids, max_tokens, extra_stop=()):
        self.check_model(body.model)
        if max_tokens > self.limits.max_tokens:
            raise ApiError(400, f"max_tokens={max_tokens} is over this server's limit "
                                f"max_tokens={self.limits.max_tokens}", "max_tokens")
        n = body.n or 1
        if n > min(self.limits.max_n, self.max_batch):
            raise ApiError(400, f"n={n} is over this server's limit n<={min(self.limits.max_n, self.max_batch)}",
                           "n")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4 or not all(stop):
            raise ApiError(400, f"stop must hold at most 4 non-empty strings, got {stop!r}", "stop")
        if max(map(len, stop), default=0) > MAX_STOP_CHARS:
            raise ApiError(400, f"a stop string may hold at most {MAX_STOP_CHARS} characters, got "
                                f"{max(map(len, stop))}", "stop")
        if stop and self.tokenizer is None:
            raise ApiError(400, "stop strings need a tokenizer; this model has none", "stop")
        if body.temperature is not None and 0 < body.temperature < MIN_TEMPERATURE:
            raise ApiError(400, f"temperature={body.temperature!r} is below {MIN_TEMPERATURE:g} (logits divided "
                                "by it overflow): use 0 for greedy decoding", "temperature")
        try:
            sampling = SamplingParams(
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0,
                presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
                repetition_penalty=body.repetition_penalty or 1.0)
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        return Job(prompt=ids, max_tokens=max_tokens, sampling=sampling, n=n, seed=body.seed,
                   stop=tuple(stop) + tuple(extra_stop), stop_at_eos=not body.ignore_eos)


def streaming(body: _Generation):
    """(stream, include_usage) as the request asks."""
    return bool(body.stream), bool(body.stream_options and body.stream_options.include_usage)


async def read_body(request: Request, max_bytes):
    """The whole request body, refused with 413 as soon as it is known to exceed `max_bytes` (from
    Content-Length, or while it arrives)."""
    too_large = ApiError(413, f"the request body is over this server's limit of {max_bytes} bytes "
                              "(1 MiB + 64 bytes per token of max_prompt_tokens)", code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise too_large
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise too_large
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(400, "the client closed the connection before sending the whole body") from None
    return b"".join(chunks)


# -- the wire format of responses -------------------------------------------------------------------
class WireFormat:
    """Completion responses; `ChatFormat` overrides the few places chat differs."""
    object, chunk_object, id_prefix = "text_completion", "text_completion", "cmpl-"

    def __init__(self, model_name, n):
        self.id = self.id_prefix + uuid.uuid4().hex
        self.created, self.model = int(time.time()), model_name
        self.started = [False] * n

    def envelope(self, obj, choices, usage=None):
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out

    def text(self, index, delta):
        return delta

    def chunk(self, index, delta, finish_reason):
        return {"index": index, "text": delta, "logprobs": None, "finish_reason": finish_reason}

    def choice(self, index, text, finish_reason):
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


class ChatFormat(WireFormat):
    object, chunk_object, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl-"

    def text(self, index, delta):
        """The reply starts after "Assistant:": drop the whitespace before its first word."""
        if not self.started[index]:
            delta = delta.lstrip()
            self.started[index] = bool(delta)
        return delta

    def chunk(self, index, delta, finish_reason):
        return {"index": index, "delta": {"content": delta} if delta else {}, "logprobs": None,
                "finish_reason": finish_reason}

    def choice(self, index, text, finish_reason):
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish_reason}


def usage(job, completion_tokens):
    """OpenAI's usage; cached_tokens: prompt tokens whose state came from the prefix cache."""
    prompt_tokens = len(job.prompt)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": job.cached_tokens}}


def sse(obj):
    """One server-sent event. ASCII-only JSON: no character in it can be taken for a line break
    (U+2028, U+0085, ... would split the event for clients that use str.splitlines)."""
    return f"data: {json.dumps(obj)}\n\n"


# -- running a job ---------------------------------------------------------------------------------
async def watch_disconnect(request: Request, job: Job, scheduler: Scheduler):
    """Cancel the job when the client goes away (the slot is freed at the scheduler's next step)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            scheduler.cancel(job)
            return


def hand_off(batch):
    """The scheduler's hand-off of one step's events [(job, event)]: one call_soon_threadsafe per event
    loop for the whole batch (one wake-up of the loop after the step's sampling, where one per event
    woke it 16 times a step at 16 streams, each time contending with the scheduler thread for the GIL);
    a job from elsewhere (no loop of ours) gets its emit as before."""
    by_loop = {}
    for job, event in batch:
        target = getattr(job, "deliver", None)
        if target is None:
            try:
                job.emit(event)
            except Exception:                             # noqa: BLE001 - as the scheduler's _emit
                log.debug("emit failed", exc_info=True)
        else:
            by_loop.setdefault(target[0], []).append((target[1], event))
    for loop, puts in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, puts)
        except RuntimeError:                              # the loop is closed: its clients are gone
            log.debug("hand-off to a closed loop", exc_info=True)


def _put_all(puts):
    for put, event in puts:
        put(event)


def submit(scheduler, job):
    """Queue `job` and return the asyncio queue its events arrive on."""
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    job.emit = lambda event: loop.call_soon_threadsafe(events.put_nowait, event)
    job.deliver = (loop, events.put_nowait)               # what hand_off uses: the queue, on its loop
    try:
        scheduler.submit(job)
    except QueueFull as e:
        raise ApiError(429, f"{e}; retry later", code="queue_full", type_="rate_limit_error",
                       headers={"Retry-After": "1"}) from None
    except ShuttingDown as e:
        raise ApiError(503, str(e), code="shutting_down", type_="server_error") from None
    return events


async def respond(request, scheduler, job, fmt: WireFormat, stream, include_usage):
    events = submit(scheduler, job)
    watcher = asyncio.create_task(watch_disconnect(request, job, scheduler))
    if stream:
        return StreamingResponse(stream_events(events, job, fmt, include_usage, watcher),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        texts, reasons, tokens = [""] * job.n, [None] * job.n, 0
        while None in reasons:
            event = await events.get()
            texts[event.index] += fmt.text(event.index, event.text)
            tokens += event.token is not None
            if event.finish_reason is not None:
                reasons[event.index] = event.finish_reason
                if event.finish_reason == "error":
                    raise ApiError(500, f"generation failed: {event.error}", type_="server_error")
    finally:
        watcher.cancel()
        scheduler.cancel(job)               # no-op once finished; frees the slot if we were cancelled
    if "cancelled" in reasons:
        raise ApiError(503, "the request was cancelled (server shutting down)", type_="server_error")
    choices = [fmt.choice(i, texts[i], reasons[i]) for i in range(job.n)]
    return fmt.envelope(fmt.object, choices, usage(job, tokens))


async def stream_events(events, job, fmt, include_usage, watcher):
    """Server-sent events: one chunk per text delta, a chunk with each finish_reason, then [DONE]."""
    try:
        open_choices, tokens = job.n, 0
        if isinstance(fmt, ChatFormat):
            for i in range(job.n):
                yield sse(fmt.envelope(fmt.chunk_object, [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                           "logprobs": None, "finish_reason": None}]))
        while open_choices:
            event = await events.get()
            tokens += event.token is not None
            if event.finish_reason == "error":
                yield sse({"error": {"message": f"generation failed: {event.error}", "type": "server_error",
                                     "param": None, "code": None}})
                return
            delta = fmt.text(event.index, event.text)
            if delta or event.finish_reason:
                yield sse(fmt.envelope(fmt.chunk_object, [fmt.chunk(event.index, delta, event.finish_reason)]))
            open_choices -= event.finish_reason is not None
        if include_usage:
            yield sse(fmt.envelope(fmt.chunk_object, [], usage(job, tokens)))
        yield "data: [DONE]\n\n"
    finally:
        watcher.cancel()
        job.cancel()                        # a client that left mid-stream frees its slot


# -- the app ---------------------------------------------------------------------------------------
def create_app(scheduler: Scheduler, model_name, limits: Limits = None, on_ready=None):
    """The FastAPI app serving `scheduler`'s model under `model_name`. The scheduler is started on
    startup and stopped (in-flight requests cancelled, thread joined) on shutdown."""
    limits = limits or Limits()
    scheduler.hand_off = hand_off
    app = FastAPI(title="rwkv_engine", lifespan=lifespan(scheduler, on_ready))
    add_error_handlers(app, scheduler.metrics)
    add_generation_routes(app, scheduler, model_name, limits)
    add_info_routes(app, scheduler, model_name)
    return app


def lifespan(scheduler, on_ready):
    """The app's lifespan: the scheduler runs while the app does; `on_ready()` once it has started."""
    @asynccontextmanager
    async def run_scheduler(app):
        scheduler.start()
        if on_ready is not None:
            on_ready()
        yield
        scheduler.stop()
    return run_scheduler


def add_error_handlers(app, metrics):
    """Every error answers in OpenAI's body; ApiErrors are counted by outcome."""
    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        outcome = {429: "queue_full", 404: "not_found"}.get(e.status, "invalid" if e.status < 500 else "error")
        metrics.requests.labels(outcome=outcome).inc()
        return error_response(e.status, e.message, e.param, e.code, e.type, e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, e: RequestValidationError):
        return await api_error(request, validation_error(e.errors()[0]))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), headers=getattr(e, "headers", None))


def add_generation_routes(app, scheduler, model_name, limits):
    """POST /v1/completions and /v1/chat/completions."""
    builder = JobBuilder(model_name, scheduler.tokenizer, scheduler.model.vocab_size, limits, scheduler.max_batch)

    async def generate(request: Request, prepare, fmt_cls):
        raw = await read_body(request, limits.max_body_bytes)
        job, stream, include_usage = await run_in_threadpool(prepare, raw, request.headers.get("content-type"))
        return await respond(request, scheduler, job, fmt_cls(model_name, job.n), stream, include_usage)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, builder.completion, WireFormat)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, builder.chat, ChatFormat)


def add_info_routes(app, scheduler, model_name):
    """GET /v1/models, /health and /metrics."""
    metrics = scheduler.metrics

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "rwkv_engine"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "active_streams": scheduler.active_streams,
                "queue_depth": len(scheduler.waiting)}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)
