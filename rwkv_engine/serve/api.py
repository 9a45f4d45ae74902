"""The HTTP layer: request validation, the OpenAI wire format, server-sent events.

It never touches the model: it tokenizes, checks limits, hands a `Job` to the scheduler and turns
the scheduler's events into responses. Errors use OpenAI's body
`{"error": {"message", "type", "param", "code"}}`.
"""
import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import List, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..sampling import SamplingParams
from .scheduler import Job, QueueFull, Scheduler, ShuttingDown

CHAT_STOP = ("\n\nUser:", "\n\nSystem:")
ROLE_NAMES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}


@dataclass
class Limits:
    max_prompt_tokens: int = 4096
    max_tokens: int = 1024
    max_n: int = 8


class ApiError(Exception):
    def __init__(self, status, message, param=None, code=None, type_="invalid_request_error", headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type, self.headers = type_, headers


def error_response(status, message, param=None, code=None, type_="invalid_request_error", headers=None):
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


# -- request bodies (fields of the wrong type fail validation; unknown fields are ignored) ---------


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class _Generation(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: StrictStr
    max_tokens: Optional[StrictInt] = Field(None, ge=1)
    temperature: Optional[StrictFloat] = Field(None, ge=0, le=2)
    top_p: Optional[StrictFloat] = Field(None, gt=0, le=1)
    top_k: Optional[StrictInt] = Field(None, ge=0)                    # extension
    presence_penalty: Optional[StrictFloat] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[StrictFloat] = Field(None, ge=-2, le=2)
    repetition_penalty: Optional[StrictFloat] = Field(None, gt=0)     # extension
    stop: Union[StrictStr, List[StrictStr], None] = None
    seed: Optional[StrictInt] = None
    n: Optional[StrictInt] = Field(None, ge=1)
    stream: Optional[StrictBool] = None
    stream_options: Optional[StreamOptions] = None
    ignore_eos: Optional[StrictBool] = None                    # extension (vLLM's)


class CompletionRequest(_Generation):
    prompt: Union[StrictStr, List[StrictStr], List[StrictInt], List[List[StrictInt]]]
    echo: Optional[StrictBool] = None
    logprobs: Optional[StrictInt] = None
    best_of: Optional[StrictInt] = None
    suffix: Optional[StrictStr] = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    role: StrictStr
    content: Union[str, List[TextPart], None] = None


class ChatRequest(_Generation):
    messages: List[Message] = Field(..., min_length=1)
    max_completion_tokens: Optional[StrictInt] = Field(None, ge=1)
    logprobs: Optional[StrictBool] = None


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
    def __init__(self, model_name, tokenizer, vocab_size, limits: Limits, max_batch):
        self.model_name, self.tokenizer, self.vocab_size = model_name, tokenizer, vocab_size
        self.limits, self.max_batch = limits, max_batch

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
            ids = self.tokenizer.encode(prompt)
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
        if stop and self.tokenizer is None:
            raise ApiError(400, "stop strings need a tokenizer; this model has none", "stop")
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


def submit(scheduler, job):
    """Queue `job` and return the asyncio queue its events arrive on."""
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    job.emit = lambda event: loop.call_soon_threadsafe(events.put_nowait, event)
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
    model = scheduler.model
    builder = JobBuilder(model_name, scheduler.tokenizer, model.vocab_size, limits, scheduler.max_batch)
    metrics = scheduler.metrics

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        if on_ready is not None:
            on_ready()
        yield
        scheduler.stop()

    app = FastAPI(title="rwkv_engine", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        outcome = {429: "queue_full", 404: "not_found"}.get(e.status, "invalid" if e.status < 500 else "error")
        metrics.requests.labels(outcome=outcome).inc()
        return error_response(e.status, e.message, e.param, e.code, e.type, e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, e: RequestValidationError):
        metrics.requests.labels(outcome="invalid").inc()
        err = e.errors()[0]
        if err.get("type") == "json_invalid":
            return error_response(400, f"the request body is not valid JSON ({err.get('msg')})")
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        return error_response(400, f"{param or 'body'}: {err.get('msg')}", param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), headers=getattr(e, "headers", None))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        builder.check_model(body.model)
        for name, ok in (("echo", not body.echo), ("logprobs", not body.logprobs), ("suffix", body.suffix is None),
                         ("best_of", body.best_of in (None, body.n or 1))):
            if not ok:
                raise ApiError(400, f"{name} is not supported by this server", name)
        ids = builder.prompt_ids(body.prompt)
        job = builder.job(body, ids, 16 if body.max_tokens is None else body.max_tokens)
        return await respond(request, scheduler, job, WireFormat(model_name, job.n), bool(body.stream),
                             bool(body.stream_options and body.stream_options.include_usage))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        builder.check_model(body.model)
        if body.logprobs:
            raise ApiError(400, "logprobs is not supported by this server", "logprobs")
        ids = builder.prompt_ids(chat_prompt(body.messages))
        max_tokens = body.max_completion_tokens or body.max_tokens or min(256, limits.max_tokens)
        job = builder.job(body, ids, max_tokens, extra_stop=CHAT_STOP)
        return await respond(request, scheduler, job, ChatFormat(model_name, job.n), bool(body.stream),
                             bool(body.stream_options and body.stream_options.include_usage))

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

    return app
