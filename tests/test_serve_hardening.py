"""The server against slow, greedy and careless clients (issue 19): request bodies bounded in bytes
before they are parsed, tokenizing off the event loop, connections that never send their request
timed out, the number of open connections bounded, and every numeric option checked in one line."""
import json
import select
import socket
import threading
import time
from urllib.parse import urlparse

import httpx
import pytest

from test_serve_http import MODEL, Server, body

READ_TIMEOUT = 2.0
MAX_CONNECTIONS = 24
MAX_PROMPT_TOKENS = 8000           # body limit: 1 MiB + 64 bytes a token = 1.5 MB


@pytest.fixture(scope="module")
def server():
    s = Server("--max-prompt-tokens", str(MAX_PROMPT_TOKENS), "--read-timeout", str(READ_TIMEOUT),
               "--max-connections", str(MAX_CONNECTIONS), "--max-batch", "4")
    # idle connections close at READ_TIMEOUT here: the client's pool must drop them well before, or a
    # request may go out on a connection the server is closing (no response: RemoteProtocolError)
    s.http.close()
    s.http = httpx.Client(base_url=s.url, timeout=30, limits=httpx.Limits(keepalive_expiry=READ_TIMEOUT / 4))
    yield s
    s.http.close()
    assert s.stop() == 0
    assert "Traceback" not in "".join(s.lines), "".join(s.lines)


def address(server):
    url = urlparse(server.url)
    return url.hostname, url.port


def assert_openai_error(r, status):
    assert r.status_code == status, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    return r.json()["error"]


def test_a_body_over_the_size_limit_gets_413_before_it_is_read(server):
    limit = 2**20 + 64 * MAX_PROMPT_TOKENS
    big = json.dumps(body(prompt="x" * (limit + 1))).encode()
    err = assert_openai_error(server.http.post("/v1/completions", content=big), 413)
    assert f"limit of {limit} bytes" in err["message"] and err["code"] == "request_too_large"

    def chunks():                          # no Content-Length: counted as it arrives
        for i in range(0, len(big), 2**16):
            yield big[i:i + 2**16]
    assert_openai_error(server.http.post("/v1/chat/completions", content=chunks()), 413)
    assert server.http.post("/v1/completions", json=body()).status_code == 200


def test_health_answers_while_a_long_prompt_is_tokenized_to_be_refused(server):
    """A 1 MB prompt (under the body limit, far over the token limit) takes seconds to tokenize;
    meanwhile /health answers at once: the tokenizer runs in a worker thread, releasing the GIL."""
    big = json.dumps(body(prompt="The dragons of Tibet sleep. " * 36000)).encode()
    result = {}

    def post():
        start = time.monotonic()
        with httpx.Client(base_url=server.url, timeout=120) as c:
            result["response"] = c.post("/v1/completions", content=big)
        result["seconds"] = time.monotonic() - start

    thread = threading.Thread(target=post)
    thread.start()
    latencies = []
    with httpx.Client(base_url=server.url, timeout=120) as c:
        while thread.is_alive():
            start = time.monotonic()
            assert c.get("/health").status_code == 200
            if thread.is_alive():
                latencies.append(time.monotonic() - start)
            time.sleep(0.05)
    thread.join()
    err = assert_openai_error(result["response"], 400)
    assert f"limit max_prompt_tokens={MAX_PROMPT_TOKENS}" in err["message"]
    assert len(latencies) >= 3, (latencies, result["seconds"])
    # blocked, each /health would wait for the whole tokenization
    assert max(latencies) < result["seconds"] / 3, (max(latencies), result["seconds"])


def read_until_closed(sock, deadline):
    """Everything `sock` receives until the server closes it (None if it is still open at `deadline`)."""
    data = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    return None


def test_clients_that_never_send_their_body_or_headers_are_closed_at_the_read_timeout(server):
    host, port = address(server)
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\ncontent-type: application/json\r\n"
            f"content-length: 1000\r\n\r\n").encode()
    slow = []
    try:
        for i in range(20):
            sock = socket.create_connection((host, port))
            sock.sendall(head if i < 12 else head[:30] if i < 16 else b"")   # no body / half a header / nothing
            slow.append(sock)
        opened = time.monotonic()
        r = server.http.post("/v1/completions", json=body())        # a normal request meanwhile
        assert r.status_code == 200, r.text
        replies = [read_until_closed(sock, opened + READ_TIMEOUT + 10) for sock in slow]
        closed_after = time.monotonic() - opened
    finally:
        for sock in slow:
            sock.close()
    assert all(reply is not None for reply in replies), "a slow connection was never closed"
    assert closed_after > READ_TIMEOUT * 0.5
    for reply in replies[:16]:                 # a request had begun: 408 in OpenAI's body
        status, _, rest = reply.partition(b"\r\n")
        assert status == b"HTTP/1.1 408 Request Timeout", reply
        assert json.loads(rest.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
    assert replies[16:] == [b""] * 4           # nothing sent: closed as an idle keep-alive is
    assert server.http.post("/v1/completions", json=body()).status_code == 200


def test_connections_over_the_limit_get_503_and_are_closed(server):
    host, port = address(server)
    socks = []
    try:
        for _ in range(MAX_CONNECTIONS + 6):
            socks.append(socket.create_connection((host, port)))
        deadline = time.monotonic() + READ_TIMEOUT + 10
        replies = [read_until_closed(sock, deadline) for sock in socks]
    finally:
        for sock in socks:
            sock.close()
    assert all(reply is not None for reply in replies), "a connection was never closed"
    refused = [reply for reply in replies if reply]
    # the others sent nothing and were closed silently at the read timeout; the test's own pooled
    # client may hold one of the MAX_CONNECTIONS
    assert 6 <= len(refused) <= 7, replies
    for reply in refused:
        assert reply.startswith(b"HTTP/1.1 503 Service Unavailable\r\n") and b"retry-after: 1" in reply, reply
        assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "too_many_connections"
    assert server.http.post("/v1/completions", json=body()).status_code == 200


def test_a_stream_longer_than_the_read_timeout_is_not_cut(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=body(max_tokens=1000, stream=True, ignore_eos=True)) as r:
            lines = r.iter_lines()
            assert next(l for l in lines if l.startswith("data:"))
            time.sleep(READ_TIMEOUT + 0.5)
            rest = [l for l in lines if l]
    assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"


# -- the command line -------------------------------------------------------------------------------
@pytest.mark.parametrize("option,value,rule", [
    ("--shutdown-timeout", "-1", ">= 0"), ("--shutdown-timeout", "nan", "finite"),
    ("--shutdown-timeout", "inf", "finite"), ("--shutdown-timeout", "1e12", "<= 86400"),
    ("--prefix-cache-mb", "nan", "finite"), ("--prefix-cache-mb", "-1", ">= 0"),
    ("--prefix-cache-mb", "inf", "finite"), ("--prefix-cache-mb", "lots", "finite"),
    ("--read-timeout", "0", "> 0"), ("--read-timeout", "nan", "finite"), ("--read-timeout", "1e300", "<= 86400"),
    ("--max-connections", "0", ">= 1"), ("--max-connections", "2.5", "integer"),
    ("--port", "65536", "<= 65535"), ("--port", "-1", ">= 0"), ("--port", "http", "integer"),
    ("--max-prompt-tokens", "0", ">= 1"), ("--max-tokens", "nan", "integer"), ("--max-batch", "-3", ">= 1"),
])
def test_every_numeric_option_is_checked_in_one_line(option, value, rule, capsys):
    from rwkv_engine.serve.__main__ import parse_args
    with pytest.raises(SystemExit) as e:
        parse_args(["--model", MODEL, option, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"rwkv_engine.serve: error: {option} must be") and rule in err, err


def test_numeric_options_parse_to_numbers():
    from rwkv_engine.serve.__main__ import MAX_CONNECTIONS as default, parse_args
    args = parse_args(["--model", MODEL, "--prefix-cache-mb", "0.5", "--shutdown-timeout", "0"])
    assert (args.prefix_cache_mb, args.shutdown_timeout, args.port, args.max_connections) == (0.5, 0.0, 8000, default)
    assert isinstance(args.max_batch, int) and isinstance(args.read_timeout, float)


def test_max_connections_over_the_hard_file_limit_is_refused():
    resource = pytest.importorskip("resource")
    from rwkv_engine.serve.__main__ import fit_open_files
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no hard limit on open files")
    assert "lower --max-connections" in fit_open_files(hard + 1)
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (soft, hard)
    assert fit_open_files(1) is None


# -- the ready line ---------------------------------------------------------------------------------
def test_the_ready_line_says_synthetic_weights_for_a_pipeline_too(tiny_cfg):
    """rank 0's PipelinedRWKV repr names no weights; the ready line adds it (once)."""
    import torch
    import rwkv_engine
    from rwkv_engine.pipeline import PipelinedRWKV
    from rwkv_engine.serve.__main__ import describe
    handle = object.__new__(PipelinedRWKV)             # what its repr and the ready line read
    handle.config, handle.split, handle.dtype = tiny_cfg, [range(0, 1), range(1, 2)], torch.float32
    for synthetic in (True, False):
        handle.synthetic = synthetic
        assert ("synthetic weights" in describe(handle)) == synthetic, describe(handle)
    single = rwkv_engine.load(MODEL)
    assert single.synthetic and describe(single).count("synthetic") == 1, describe(single)


def test_an_unknown_log_level_is_refused_in_one_line(capsys):
    from rwkv_engine.serve.__main__ import parse_args
    with pytest.raises(SystemExit) as e:
        parse_args(["--model", MODEL, "--log-level", "loud"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--log-level" in err, err


def test_a_second_sigterm_ends_the_in_flight_requests_at_once():
    import signal
    s = Server("--max-tokens", "100000", "--shutdown-timeout", "600")
    try:
        with httpx.Client(base_url=s.url, timeout=60) as c:
            with c.stream("POST", "/v1/completions", json=body(max_tokens=100000, stream=True)) as r:
                lines = r.iter_lines()
                assert next(l for l in lines if l.startswith("data:"))
                s.proc.send_signal(signal.SIGTERM)
                time.sleep(0.5)
                assert s.proc.poll() is None                 # draining: the stream goes on
                s.proc.send_signal(signal.SIGTERM)
                rest = [l for l in lines if l]
        assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "cancelled"
        assert s.proc.wait(60) == 0                          # not after the 600 s grace period
        assert "Traceback" not in "".join(s.lines)
    finally:
        s.http.close()
        s.stop()


def test_weights_choices_are_the_registered_formats(capsys):
    """--weights takes the names of rwkv_kernels.formats' records (a format registered later too),
    and refuses any other at parse time, in one line naming them."""
    import torch
    from rwkv_kernels import formats
    from rwkv_engine.serve.__main__ import parse_args
    with pytest.raises(SystemExit) as e:
        parse_args(["--model", MODEL, "--weights", "int4"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--weights" in err, err
    assert all(repr(name) in err for name in formats.names()), err

    class Packed:
        pass
    formats.register(formats.WeightFormat("int4", None, 0.5, torch.float16, None, None, None, packed_type=Packed))
    try:
        assert parse_args(["--model", MODEL, "--weights", "int4"]).weights == "int4"
    finally:
        formats.unregister("int4")
