"""The server as a real process on 127.0.0.1 (free port, tiny synthetic model): the official
`openai` client, batch invariance under concurrency, disconnects, the bounded queue, bad requests,
and a graceful SIGTERM."""
import json
import os
import queue
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

MODEL = "rwkv-4-tiny"
REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT = 120


class Server:
    """`python -m rwkv_engine.serve` in a subprocess; its output is drained by a thread."""

    def __init__(self, *args):
        from rwkv_engine.checkpoint import write_synthetic
        write_synthetic(MODEL)                          # once, before any server reads it
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen([sys.executable, "-m", "rwkv_engine.serve", "--model", MODEL, "--port", "0",
                                      *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=env, cwd=REPO)
        self.lines, ready = [], queue.Queue()
        threading.Thread(target=self._drain, args=(ready,), daemon=True).start()
        try:
            self.url = ready.get(timeout=START_TIMEOUT)
        except queue.Empty:
            self.stop()
            raise RuntimeError("server did not start:\n" + "".join(self.lines)) from None
        if self.url is None:
            raise RuntimeError("server exited:\n" + "".join(self.lines))
        self.http = httpx.Client(base_url=self.url, timeout=30)

    def _drain(self, ready):
        for line in self.proc.stdout:
            self.lines.append(line)
            m = re.search(r"ready at (http://\S+)", line)
            if m:
                ready.put(m.group(1))
        ready.put(None)

    def health(self):
        return self.http.get("/health").json()

    def wait_for(self, predicate, timeout=15):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate(self.health()):
                return True
            time.sleep(0.02)
        return False

    def metric(self, name):
        text = self.http.get("/metrics").text
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        return float(m.group(1)) if m else None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def server():
    s = Server("--max-tokens", "100000", "--max-prompt-tokens", "64", "--max-batch", "16", "--prefill-chunk", "8")
    s.idle = keep_alive_connection(s), time.monotonic()    # left idle while the module's tests run
    yield s
    s.idle[0].close()
    s.http.close()
    assert s.stop() == 0


@pytest.fixture(scope="module")
def small_server():
    """One slot, one queue place: the third concurrent request is refused."""
    s = Server("--max-tokens", "100000", "--max-batch", "1", "--max-queue", "1", "--shutdown-timeout", "1")
    yield s
    s.http.close()
    s.stop()


def keep_alive_connection(server):
    """A raw connection to `server` that has been answered one /health request."""
    host, port = re.match(r"http://([^:/]+):(\d+)", server.url).groups()
    sock = socket.create_connection((host, int(port)), timeout=30)
    assert read_response(sock, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 200")
    return sock


def read_response(sock, request):
    """Send `request` on `sock`; the whole response (headers and a Content-Length body), b"" if closed."""
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    length = int(re.search(rb"content-length: *(\d+)", head, re.I).group(1))
    while len(rest) < length:
        rest += sock.recv(65536)
    return head + b"\r\n\r\n" + rest


def body(**kw):
    return {"model": MODEL, "prompt": "The dragons of", "max_tokens": 8, "seed": 1, **kw}


def chat(**kw):
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "seed": 1, **kw}


def raw(**fields):
    """A completion body as bytes, each of `fields` spliced in as raw JSON text (NaN, \\ud800, ...)."""
    text = json.dumps({k: v for k, v in body().items() if k not in fields})[:-1]
    return (text + "".join(f", {json.dumps(k)}: {v}" for k, v in fields.items()) + "}").encode()


def test_openai_client_completions_chat_and_streaming(server):
    from openai import OpenAI
    from rwkv_engine.tokenizer import tokenizer
    client = OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=30)
    assert [m.id for m in client.models.list().data] == [MODEL]

    r = client.completions.create(model=MODEL, prompt="The dragons of", max_tokens=8, seed=1)
    assert r.object == "text_completion" and r.model == MODEL and len(r.choices) == 1
    assert r.choices[0].finish_reason == "length" and r.choices[0].text
    assert r.usage.prompt_tokens == len(tokenizer().encode("The dragons of")) and r.usage.completion_tokens == 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8

    chunks = list(client.completions.create(model=MODEL, prompt="The dragons of", max_tokens=8, seed=1,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert server.metric("rwkv_prefix_cache_hits_total") >= 1          # the same prompt again
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == r.usage.prompt_tokens

    text = r.choices[0].text                                          # a stop string cuts the same text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    cut = client.completions.create(model=MODEL, prompt="The dragons of", max_tokens=8, seed=1, stop=[stop])
    assert cut.choices[0].text == text[:text.find(stop)] and cut.choices[0].finish_reason == "stop"

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    c = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, seed=2, n=2)
    assert c.object == "chat.completion" and [ch.index for ch in c.choices] == [0, 1]
    assert all(ch.message.role == "assistant" and isinstance(ch.message.content, str) for ch in c.choices)
    assert c.usage.completion_tokens <= 12
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, seed=2, stream=True)
    deltas = [ch.choices[0].delta for ch in stream]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == c.choices[0].message.content


def test_same_text_alone_or_among_15_concurrent_requests(server):
    target = body(prompt="Once upon a time", max_tokens=16, seed=7, top_k=40)
    alone = server.http.post("/v1/completions", json=target).json()["choices"][0]["text"]
    others = [body(prompt=f"Request number {k} says", max_tokens=24 + k, seed=k) for k in range(15)]
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(server.http.post, "/v1/completions", json=b) for b in others[:8] + [target] + others[8:]]
        results = [f.result().json() for f in futures]
    assert results[8]["choices"][0]["text"] == alone
    assert all(r["usage"]["completion_tokens"] > 0 for r in results)


def test_client_disconnect_frees_the_slot(server):
    cancelled = server.metric('rwkv_requests_total{outcome="cancelled"}') or 0
    with httpx.Client(base_url=server.url, timeout=30) as c:
        with c.stream("POST", "/v1/completions", json=body(max_tokens=100000, stream=True)) as r:
            lines = r.iter_lines()
            assert next(l for l in lines if l.startswith("data:"))
            assert server.health()["active_streams"] == 1
    assert server.wait_for(lambda h: h["active_streams"] == 0), "the slot was not freed"
    assert server.metric('rwkv_requests_total{outcome="cancelled"}') == cancelled + 1


def test_queue_full_gets_429_with_retry_after(small_server):
    s = small_server
    with httpx.Client(base_url=s.url, timeout=30) as c1, httpx.Client(base_url=s.url, timeout=30) as c2:
        with c1.stream("POST", "/v1/completions", json=body(max_tokens=100000, stream=True)) as running:
            lines = running.iter_lines()              # kept: closing it would disconnect the client
            assert next(l for l in lines if l.startswith("data:"))
            with c2.stream("POST", "/v1/completions", json=body(max_tokens=100000, stream=True)):
                assert s.wait_for(lambda h: h["queue_depth"] == 1)
                r = s.http.post("/v1/completions", json=body())
                assert r.status_code == 429 and r.headers["retry-after"] == "1"
                err = r.json()["error"]
                assert err["type"] == "rate_limit_error" and "queue is full" in err["message"]
    assert s.wait_for(lambda h: h["active_streams"] == 0 and h["queue_depth"] == 0)
    assert s.http.post("/v1/completions", json=body()).status_code == 200


BAD = [
    ("malformed JSON", b'{"model": "rwkv-4-tiny", "prompt": ', 400, None, "not valid JSON"),
    ("not an object", b"[1, 2]", 400, None, "valid dictionary"),
    ("prompt wrong type", body(prompt=5), 400, "prompt", "prompt"),
    ("max_tokens a string", body(max_tokens="8"), 400, "max_tokens", "valid integer"),
    ("temperature a string", body(temperature="hot"), 400, "temperature", "valid number"),
    ("stream not a bool", body(stream="yes"), 400, "stream", "valid boolean"),
    ("unknown model", body(model="gpt-4"), 404, "model", "does not exist"),
    ("max_tokens over limit", body(max_tokens=100001), 400, "max_tokens", "limit max_tokens=100000"),
    ("max_tokens zero", body(max_tokens=0), 400, "max_tokens", "greater than or equal to 1"),
    ("prompt over limit", body(prompt=[1] * 65), 400, "prompt", "limit max_prompt_tokens=64"),
    ("token id out of range", body(prompt=[60000]), 400, "prompt", "out of range"),
    ("empty prompt", body(prompt=""), 400, "prompt", "empty"),
    ("two prompts", body(prompt=["a", "b"]), 400, "prompt", "one per request"),
    ("top_p zero", body(top_p=0), 400, "top_p", "greater than 0"),
    ("n over limit", body(n=100), 400, "n", "n<="),
    ("too many stops", body(stop=["a", "b", "c", "d", "e"]), 400, "stop", "at most 4"),
    ("empty stop", body(stop=[""]), 400, "stop", "non-empty"),
    ("stop too long", body(stop=["a" * 1001]), 400, "stop", "at most 1000 characters"),
    ("temperature too small", body(temperature=1e-9), 400, None, "temperature"),
    ("echo", body(echo=True), 400, "echo", "not supported"),
    # issue 19: every float finite, every number in the range its consumer takes, text valid Unicode,
    # unknown fields refused (OpenAI's answer), unusable JSON a 400 (never a 500)
    *[(f"{field} {value}", raw(**{field: value}), 400, field, "finite number")
      for field in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
      for value in ("NaN", "Infinity", "-Infinity")],
    ("temperature 1e400", raw(temperature="1e400"), 400, "temperature", "finite number"),
    ("seed over int64", body(seed=2**63), 400, "seed", "less than or equal"),
    ("seed 2**64", body(seed=2**64), 400, "seed", "less than or equal"),
    ("seed under int64", body(seed=-2**63 - 1), 400, "seed", "greater than or equal"),
    ("repetition_penalty huge", body(repetition_penalty=1e30), 400, "repetition_penalty", "less than or equal"),
    ("repetition_penalty tiny", body(repetition_penalty=1e-300), 400, "repetition_penalty", "greater than"),
    ("top_k negative", body(top_k=-1), 400, "top_k", "greater than or equal to 0"),
    ("n zero", body(n=0), 400, "n", "greater than or equal to 1"),
    ("max_tokens huge", body(max_tokens=10**30), 400, "max_tokens", "limit max_tokens=100000"),
    ("temperature under the minimum", body(temperature=5e-5), 400, "temperature", "use 0 for greedy"),
    ("prompt lone surrogate", raw(prompt='"dragons \\ud800"'), 400, "prompt", "not valid Unicode"),
    ("prompt list lone surrogate", raw(prompt='["\\udfff x"]'), 400, "prompt.0", "not valid Unicode"),
    ("stop lone surrogate", raw(stop='["\\ud800"]'), 400, "stop.0", "not valid Unicode"),
    ("model lone surrogate", raw(model='"\\ud800"'), 400, "model", "not valid Unicode"),
    ("unknown field", body(foo=1), 400, "foo", "Unrecognized request argument supplied: foo"),
    ("misspelt field", body(max_token=5), 400, "max_token", "Unrecognized request argument"),
    ("chat-only field", body(max_completion_tokens=5), 400, "max_completion_tokens", "Unrecognized"),
    ("logit_bias", body(logit_bias={"50": 10}), 400, "logit_bias", "not supported"),
    ("logprobs", body(logprobs=2), 400, "logprobs", "not supported"),
    ("suffix", body(suffix="x"), 400, "suffix", "not supported"),
    ("best_of over n", body(best_of=2), 400, "best_of", "not supported"),
    ("unknown stream option", body(stream_options={"bogus": True}), 400, "stream_options.bogus", "Extra inputs"),
    ("empty body", b"", 400, None, "empty"),
    ("nested too deeply", b"[" * 100000 + b"]" * 100000, 400, None, "not valid JSON"),
    ("integer of 5000 digits", raw(max_tokens="1" * 5000), 400, None, "not valid JSON"),
    ("not UTF-8", b'{"model": "rwkv-4-tiny", "prompt": "\xff\xfe"}', 400, None, "not valid UTF-8"),
    ("token ids empty", body(prompt=[[]]), 400, "prompt", "empty"),
]
BAD_CHAT = [
    ("no messages", {"model": MODEL, "messages": []}, 400, "messages", "at least 1"),
    ("bad role", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role", "robot"),
    ("content a number", {"model": MODEL, "messages": [{"role": "user", "content": 3}]}, 400, "messages.0.content", ""),
    ("content lone surrogate", b'{"model": "rwkv-4-tiny", "messages": [{"role": "user", "content": "hi \\ud800"}]}',
     400, "messages.0.content", "not valid Unicode"),
    ("part lone surrogate", b'{"model": "rwkv-4-tiny", "messages": [{"role": "user", "content": '
                            b'[{"type": "text", "text": "\\udc00"}]}]}', 400, "messages.0.content.0.text", "Unicode"),
    ("chat temperature NaN", b'{"model": "rwkv-4-tiny", "messages": [{"role": "user", "content": "hi"}], '
                        b'"temperature": NaN}', 400, "temperature", "finite number"),
    ("tools", chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools", "not supported"),
    ("response_format json", chat(response_format={"type": "json_object"}), 400, "response_format", "not supported"),
    ("chat logprobs", chat(logprobs=True), 400, "logprobs", "not supported"),
    ("unknown message field", chat(messages=[{"role": "user", "content": "x", "mood": "happy"}]), 400,
     "messages.0.mood", "Unrecognized request argument supplied: messages.0.mood"),
    ("message tool_calls", chat(messages=[{"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}]),
     400, "messages.0.tool_calls", "not supported"),
    ("image part", chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     400, "messages.0.content", ""),
]


@pytest.mark.parametrize("path,name,payload,status,param,message",
                         [("/v1/completions", *b) for b in BAD] + [("/v1/chat/completions", *b) for b in BAD_CHAT],
                         ids=[b[0] for b in BAD + BAD_CHAT])
def test_bad_request_gets_openai_error(server, path, name, payload, status, param, message):
    if isinstance(payload, bytes):
        r = server.http.post(path, content=payload, headers={"content-type": "application/json"})
    else:
        r = server.http.post(path, json=payload)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert message in err["message"] and (param is None or (err["param"] or "").startswith(param)), err


OK = [
    ("/v1/completions", body(logit_bias={}, user="u1", metadata={"k": "v"}, store=False, echo=False, logprobs=None,
                             suffix=None, best_of=1, stream_options={"include_usage": False}, seed=2**63 - 1)),
    ("/v1/completions", body(seed=-2**63, repetition_penalty=100.0, presence_penalty=-2, frequency_penalty=2,
                             top_k=10**30, temperature=2, top_p=1e-9)),
    ("/v1/chat/completions", chat(tool_choice="none", tools=[], response_format={"type": "text"},
                                  parallel_tool_calls=True, service_tier="auto", logprobs=False, n=8,
                                  messages=[{"role": "user", "content": "Hi", "name": "ann"},
                                            {"role": "assistant", "content": "Hello", "refusal": None,
                                             "tool_calls": None, "annotations": []},
                                            {"role": "user", "content": [{"type": "text", "text": "more"}]}])),
]


@pytest.mark.parametrize("path,payload", OK, ids=["completion no-ops", "extreme values", "chat no-ops"])
def test_no_op_values_of_unsupported_fields_and_extreme_valid_values_are_served(server, path, payload):
    r = server.http.post(path, json=payload)
    assert r.status_code == 200, r.text
    assert all(c["finish_reason"] in ("length", "stop") for c in r.json()["choices"])


@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded", "text/plain",
                                          "application/json; charset=utf-8"])
def test_a_json_body_is_read_whatever_its_content_type(server, content_type):
    """curl -d sends application/x-www-form-urlencoded unless told otherwise."""
    headers = {} if content_type is None else {"content-type": content_type}
    r = server.http.post("/v1/completions", content=json.dumps(body()).encode(), headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 8


def test_a_form_encoded_body_is_refused_naming_its_content_type(server):
    r = server.http.post("/v1/completions", data={"model": MODEL, "prompt": "x"})
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert "not valid JSON" in message and "application/x-www-form-urlencoded" in message, message


def test_unknown_route_and_method_get_error_bodies(server):
    assert server.http.get("/v1/nothing").json()["error"]["message"] == "Not Found"
    r = server.http.get("/v1/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_metrics_are_prometheus_text(server):
    server.http.post("/v1/completions", json=body())
    text = server.http.get("/metrics").text
    for name in ("rwkv_requests_total", "rwkv_generated_tokens_total", "rwkv_batch_size", "rwkv_queue_depth",
                 "rwkv_prefix_cache_hits_total", "rwkv_prefix_cache_misses_total",
                 "rwkv_time_to_first_token_seconds_bucket", "rwkv_time_to_first_token_seconds_count"):
        assert re.search(rf"^{name}(\{{.*\}})? \d", text, re.M), name
    assert server.metric("rwkv_generated_tokens_total") >= 8


def test_an_idle_keep_alive_connection_stays_open_until_the_read_timeout(server):
    """The server closes an idle connection at --read-timeout (30 s), not at uvicorn's 5 s: a client
    pool that keeps connections 5 s (httpx's and the OpenAI client's default) would otherwise send
    on a connection the server is closing at that moment and get no response."""
    sock, since = server.idle
    time.sleep(max(0.0, 6.0 - (time.monotonic() - since)))   # ~0 in a full run of this module
    assert time.monotonic() - since > 6.0
    readable, _, _ = select.select([sock], [], [], 0)
    assert not readable, "the server closed (or wrote to) an idle keep-alive connection"
    assert read_response(sock, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 200")


def test_sigterm_finishes_cleanly_with_exit_0(small_server):
    s = small_server
    import psutil
    assert psutil.Process(s.proc.pid).children(recursive=True) == []
    with httpx.Client(base_url=s.url, timeout=30) as c:
        with c.stream("POST", "/v1/completions", json=body(max_tokens=100000, stream=True)) as r:
            lines = r.iter_lines()
            assert next(l for l in lines if l.startswith("data:"))
            s.proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)                            # the signal is handled
            with httpx.Client(base_url=s.url, timeout=30) as fresh:   # a new connection: answered 503
                r = fresh.post("/v1/completions", json=body())
                assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down", r.text
            rest = [l for l in lines if l]             # cancelled after the 1 s grace period
            assert rest[-1] == "data: [DONE]"
            assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "cancelled"
    assert s.proc.wait(20) == 0
    assert "Traceback" not in "".join(s.lines)


def test_sse_events_are_ascii_so_no_character_splits_a_line():
    from rwkv_engine.serve.api import sse
    event = sse({"text": "a\u2028b\x85c\nd\u00e9"})
    assert event.isascii() and event.count("\n") == 2 and event.endswith("\n\n")
    assert json.loads(event[6:])["text"] == "a\u2028b\x85c\nd\u00e9"


ARENAS = """
import ctypes, sys, threading
from rwkv_engine.serve.__main__ import limit_malloc_arenas
if sys.argv[1] == "limit":
    assert limit_malloc_arenas()
barrier = threading.Barrier(5)
def work():
    blocks = [bytearray(4000) for _ in range(100)]
    barrier.wait()
    barrier.wait()
threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads:
    t.start()
barrier.wait()
ctypes.CDLL(None).malloc_stats()
barrier.wait()
"""


def test_the_server_process_keeps_malloc_to_one_arena():
    """rwkv_engine.serve calls limit_malloc_arenas() first: threads that allocate then share the
    heap instead of each growing an arena of its own (one arena per thread is glibc's default)."""
    if not hasattr(__import__("ctypes").CDLL(None), "malloc_stats"):
        pytest.skip("not glibc")
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    counts = {}
    for mode in ("default", "limit"):
        out = subprocess.run([sys.executable, "-c", ARENAS, mode], capture_output=True, text=True, env=env,
                             timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        counts[mode] = len(re.findall(r"^Arena \d+:", out.stderr, re.M))
    assert counts["default"] > 1 and counts["limit"] == 1, counts
