"""The server under careless and hostile clients (issue 18): bad values are 4xx and hurt no other
request, a failing row ends its own request with an error, a client that leaves frees its slots,
big inputs are refused before any work and never stall the other streams, slow and idle sockets
are closed, and SIGTERM ends the process within its deadline."""

import asyncio
import http.client
import json
import logging
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from zerolm.serve.edge import RateLimit
from zerolm.serve.limits import Limits
from zerolm.serve.server import load_server

API_KEY = "sk-test-123"  # as in conftest.py
LONG = Limits(
    max_tokens=400, max_n=4, max_messages=8, max_body_bytes=20_000
)  # streams that last seconds


def post(port, path, body, key=None, timeout=60):
    """(status, headers, JSON or text) of one request; body is a dict or raw bytes."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request(
        "POST",
        path,
        body=data,
        headers={
            "Content-Type": "application/json",
            **({"Authorization": f"Bearer {key}"} if key else {}),
        },
    )
    r = conn.getresponse()
    text = r.read().decode()
    conn.close()
    try:
        return r.status, dict(r.getheaders()), json.loads(text)
    except json.JSONDecodeError:
        return r.status, dict(r.getheaders()), text


def stream(port, body, path="/v1/completions", key=None, times=None):
    """(status, SSE events: parsed JSON or "[DONE]") of one streamed request; times gets each
    event's time."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request(
        "POST",
        path,
        body=json.dumps({**body, "stream": True}).encode(),
        headers={
            "Content-Type": "application/json",
            **({"Authorization": f"Bearer {key}"} if key else {}),
        },
    )
    r = conn.getresponse()
    events = []
    for line in r:
        if line.startswith(b"data: "):
            if times is not None:
                times.append(time.perf_counter())
            data = line[6:].strip()
            events.append("[DONE]" if data == b"[DONE]" else json.loads(data))
    conn.close()
    return r.status, events


def text_of(events):
    return "".join(c["text"] for e in events if isinstance(e, dict) for c in e.get("choices", []))


def in_thread(fn, *args, **kw):
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", fn(*args, **kw)), daemon=True)
    t.start()
    return t, out


def first_event(times, timeout=30):
    t0 = time.time()
    while not times:
        assert time.time() - t0 < timeout, "the stream never started"
        time.sleep(0.01)


HEALTHY = [
    {"prompt": p, "max_tokens": 300, "temperature": 0}
    for p in ("Hello there", "白日依山尽", "The quick", "床前")
]


@pytest.mark.parametrize("mode", ["eager", pytest.param("compiled", marks=pytest.mark.slow)])
def test_poison_values_get_4xx_and_every_other_generation_finishes(launch, mode, request):
    if mode == "compiled":  # `zerolm serve --compile`: the 8-slot step, compiled once per session
        request.getfixturevalue("program_cache")
    srv = launch(limits=LONG, max_batch=8, compile=mode == "compiled")
    alone = [text_of(stream(srv.port, kw)[1]) for kw in HEALTHY]
    times = []
    runs = [in_thread(stream, srv.port, kw, times=times) for kw in HEALTHY]
    plain = in_thread(post, srv.port, "/v1/completions", HEALTHY[0])
    first_event(times)
    base = {"prompt": "Hi", "max_tokens": 8}
    must_400 = [
        {"seed": 1 << 64},
        {"seed": -(1 << 63) - 1},
        {"seed": (1 << 64) - 1, "n": 2},
        b'{"prompt": "Hi", "temperature": NaN}',
        b'{"prompt": "Hi", "repetition_penalty": Infinity}',
    ]
    for poison in must_400:
        status, _, err = post(
            srv.port, "/v1/completions", poison if isinstance(poison, bytes) else {**base, **poison}
        )
        assert status == 400 and err["error"]["param"] in (
            "seed",
            "temperature",
            "repetition_penalty",
        ), (poison, err)
    for poison in [
        {"temperature": 1e-300},
        {"temperature": 1e-40},
        {"repetition_penalty": 5e-324},
        {"repetition_penalty": 1e-300},
        {"top_p": 1e-30},
    ]:  # well-defined or 400, never 5xx
        status, _, body = post(srv.port, "/v1/completions", {**base, **poison, "seed": 3})
        assert status in (200, 400), (poison, body)
    for (t, out), want in zip(runs, alone):
        t.join(60)
        status, events = out["r"]
        assert status == 200 and events[-1] == "[DONE]" and text_of(events) == want
    plain[0].join(60)
    status, _, body = plain[1]["r"]
    assert status == 200 and body["choices"][0]["text"] == alone[0]


def poison_token(srv, text=b"Z"):
    """Make one token's embedding NaN: any sequence that contains it has non-finite logits."""
    with torch.no_grad():
        srv.server.model.tok_emb.weight[srv.server.token_ids[text]] = float("nan")


def test_a_failing_row_ends_its_request_with_an_error_and_no_other(launch):
    srv = launch(limits=LONG, max_batch=8)
    poison_token(srv)
    healthy = HEALTHY[:2]
    alone = [stream(srv.port, kw)[1] for kw in healthy]
    assert all(
        e[-1] == "[DONE]" for e in alone
    )  # the healthy prompts never meet the poisoned token
    times = []
    runs = [in_thread(stream, srv.port, kw, times=times) for kw in healthy]
    first_event(times)
    bad = {"prompt": "Z", "max_tokens": 20, "temperature": 1.0, "seed": 1}
    status, events = stream(srv.port, bad)
    assert status == 200 and events[-1] == "[DONE]", events  # not a cut stream
    err = events[-2]["error"]
    assert err["type"] == "server_error" and err["message"]
    status, _, body = post(srv.port, "/v1/completions", bad)
    assert status == 500 and body["error"]["type"] == "server_error"
    for (t, out), want in zip(runs, alone):
        t.join(60)
        assert out["r"][1] == want or text_of(out["r"][1]) == text_of(want)


def test_health_is_503_with_the_reason_when_logits_are_not_finite(launch):
    srv = launch()
    status, _, body = post(srv.port, "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
    assert status == 200
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200
    poison_token(srv)
    post(srv.port, "/v1/completions", {"prompt": "Z", "max_tokens": 4, "temperature": 1.0})
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    conn.request("GET", "/health")
    r = conn.getresponse()
    body = json.loads(r.read())
    assert r.status == 503 and body["status"] == "unhealthy" and body["reason"], body


@pytest.mark.parametrize("continuation", [[[256]], [[-1]], [[72], [1 << 40]]])
def test_inspector_refuses_bytes_outside_0_255(live, continuation):
    chat = [{"role": "user", "content": "Hello"}]
    status, _, err = post(
        live.port,
        "/v1/inspect/attention",
        {"messages": chat, "continuation": continuation},
        key=API_KEY,
    )
    assert status == 400 and err["error"]["param"].startswith("continuation"), err


def test_inspector_refuses_a_text_over_the_window(live):
    status, _, err = post(
        live.port, "/v1/inspect/attention", {"prompt": "Hello there! " * 250}, key=API_KEY
    )
    assert status == 400 and err["error"]["code"] == "context_length_exceeded", err


def test_inspector_is_bounded_and_leaves_the_loop_free(launch):
    srv = launch(limits=Limits(max_tokens=400, max_inspect=1))
    long_prompt = "Hello there! " * (
        1000 // len(srv.server.tok.encode("Hello there! "))
    )  # ~1000 of 1024 tokens
    body = json.dumps({"prompt": long_prompt, "layer": 1}).encode()

    # the ~7 MB answer is parsed later: json.loads here would hold this process's GIL (and loop)
    def call():
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
        conn.request(
            "POST", "/v1/inspect/attention", body=body, headers={"Content-Type": "application/json"}
        )
        r = conn.getresponse()
        return r.status, r.getheader("retry-after"), r.read()

    times = []
    run = in_thread(stream, srv.port, HEALTHY[0], times=times)
    first_event(times)
    calls = [in_thread(call) for _ in range(4)]
    t0 = time.perf_counter()
    for t, _ in calls:
        t.join(60)
    t1 = time.perf_counter()
    run[0].join(60)
    results = [out["r"] for _, out in calls]
    assert sorted({s for s, _, _ in results}) == [200, 503], [(s, b[:200]) for s, _, b in results]
    assert all(retry for s, retry, _ in results if s == 503)
    ok = json.loads(next(b for s, _, b in results if s == 200))
    assert len(ok["weights"]) == len(ok["tokens"]) > 900 and sum(
        ok["weights"][-1]
    ) == pytest.approx(1, abs=1e-3)
    during = [b - a for a, b in zip(times, times[1:]) if a >= t0 - 0.05 and b <= t1 + 0.05]
    # the stream flowed while the inspector worked (~1 s of CPU; on the event loop it was one
    # ~1 s gap); generous for a loaded 2-core machine, where the scheduler thread itself waits
    # for a core
    assert during and max(during) < 0.5, max(during)


def test_a_non_streaming_request_stops_when_its_client_leaves(launch):
    srv = launch(limits=Limits(max_tokens=1000, max_n=4))
    body = json.dumps({"prompt": "Hello", "max_tokens": 1000, "n": 4, "temperature": 0}).encode()
    s = socket.create_connection(("127.0.0.1", srv.port))
    s.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    sched = srv.server.scheduler
    t0 = time.time()
    while sched.stats.tokens == 0:
        assert time.time() - t0 < 30
        time.sleep(0.01)
    time.sleep(0.5)
    s.close()
    time.sleep(0.5)  # the disconnect is seen and the jobs are dropped at the next step
    after = sched.stats.tokens
    time.sleep(0.5)
    assert sched.stats.tokens == after and after < 2000, after  # of 4 x 1000
    assert sched.load()["running"] == 0


def test_a_huge_prompt_is_refused_before_tokenizing_and_streams_keep_flowing(launch):
    srv = launch(limits=Limits(max_tokens=400, max_body_bytes=4 << 20))
    times = []
    run = in_thread(stream, srv.port, HEALTHY[0], times=times)
    first_event(times)
    t0 = time.perf_counter()
    huge = "Hello there! 床前明月光 " * 40000  # 1.1 MB
    status, _, err = post(srv.port, "/v1/completions", {"prompt": huge, "max_tokens": 4})
    t1 = time.perf_counter()
    assert status == 400 and (err["error"]["code"], err["error"]["param"]) == (
        "context_length_exceeded",
        "prompt",
    )
    chat = {"messages": [{"role": "user", "content": "月" * 400_000}]}
    status, _, err = post(srv.port, "/v1/chat/completions", chat)
    assert status == 400 and err["error"]["code"] == "context_length_exceeded"
    run[0].join(60)
    assert run[1]["r"][1][-1] == "[DONE]"
    during = [b - a for a, b in zip(times, times[1:]) if b >= t0 and a <= t1]
    assert t1 - t0 < 1.0 and max(during, default=0) < 0.2, (t1 - t0, max(during, default=0))


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/completions", b'{"prompt": "a\\ud800b"}'),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}'),
        ("/v1/inspect/attention", b'{"prompt": "x\\udfff"}'),
    ],
)
def test_a_lone_surrogate_is_400(live, path, body):
    status, _, err = post(live.port, path, body, key=API_KEY)
    assert status == 400 and err["error"]["param"] in ("prompt", "messages"), err


CHAT = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize(
    "path, extra, param",
    [
        (
            "/v1/chat/completions",
            {"tools": [{"type": "function", "function": {"name": "f"}}]},
            "tools",
        ),
        ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice"),
        ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions"),
        ("/v1/chat/completions", {"function_call": "auto"}, "function_call"),
        ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
        ("/v1/chat/completions", {"logit_bias": {"50": 100}}, "logit_bias"),
        ("/v1/chat/completions", {"model": "gpt-4o"}, "model"),
        ("/v1/completions", {"suffix": "end"}, "suffix"),
        ("/v1/completions", {"best_of": 3}, "best_of"),
        ("/v1/completions", {"logit_bias": {"50": -100}}, "logit_bias"),
    ],
)
def test_fields_that_would_be_ignored_are_400_naming_them(live, path, extra, param):
    body = {"messages": CHAT} if "chat" in path else {"prompt": "Hi"}
    status, _, err = post(live.port, path, {**body, "max_tokens": 2, **extra}, key=API_KEY)
    assert status == 400 and err["error"]["param"] == param, err


def test_harmless_fields_are_accepted(live):
    body = {
        "messages": CHAT,
        "max_tokens": 2,
        "model": "tiny",
        "user": "u1",
        "metadata": {"a": "b"},
        "tools": [],
        "tool_choice": "none",
        "response_format": {"type": "text"},
        "logit_bias": {},
        "store": False,
    }
    assert post(live.port, "/v1/chat/completions", body, key=API_KEY)[0] == 200
    assert (
        post(
            live.port,
            "/v1/completions",
            {"prompt": "Hi", "max_tokens": 2, "best_of": 1},
            key=API_KEY,
        )[0]
        == 200
    )


def test_parameters_the_scheduler_refuses_are_a_400_not_a_500(live):
    """The scheduler's own check (SamplingParams.validate) backs the schema's: its ValueError is the
    request's 400."""
    from zerolm.infer.sampling import SamplingParams
    from zerolm.serve.errors import ApiError

    async def submit():
        live.server.start([2, 50, 60], 1, 4, SamplingParams(top_p=0.0), [], (2,), None, None)

    with pytest.raises(ApiError) as e:
        asyncio.run(submit())
    assert e.value.status == 400 and "top_p" in e.value.message


def test_max_prompt_tokens_over_the_window_is_refused_at_start(model_dir):
    with pytest.raises(ValueError, match="--max-prompt-tokens 5000 must be in 1..1023"):
        load_server(model_dir, limits=Limits(max_prompt_tokens=5000))


def raw_exchange(port, data: bytes, pause=None) -> bytes:
    """Send raw bytes (a list: chunks with `pause` s between them); return all the server sends
    back."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        for part in data if isinstance(data, list) else [data]:
            s.sendall(part)
            if pause:
                time.sleep(pause)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server closed first
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    s.close()
    return out


def test_a_chunked_body_over_the_limit_is_413(live):
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer "
        + API_KEY.encode()
        + b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
        + b"Connection: close\r\n\r\n"
    )
    part = b'{"prompt": "' + b"x" * 8000
    chunks = (
        [head] + [b"%x\r\n%s\r\n" % (len(part), part) for _ in range(4)] + [b'2\r\n"}\r\n0\r\n\r\n']
    )
    out = raw_exchange(live.port, chunks)
    assert out.startswith(b"HTTP/1.1 413") and b'"request_too_large"' in out, out[:300]


def test_auth_comes_before_the_body_and_405_says_allow(live):
    status, _, err = post(live.port, "/v1/chat/completions", b"{not json")
    assert status == 401 and err["error"]["code"] == "invalid_api_key"
    assert post(live.port, "/v1/chat/completions", b"{not json", key=API_KEY)[0] == 400
    conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=30)
    conn.request("GET", "/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"})
    r = conn.getresponse()
    assert r.status == 405 and r.getheader("allow") == "POST" and json.loads(r.read())["error"]


def test_slow_and_idle_sockets_are_closed(launch):
    srv = launch(limits=Limits(header_timeout_s=0.5, body_timeout_s=0.5))
    t0 = time.time()
    assert raw_exchange(srv.port, b"") == b""  # connects, sends nothing: closed
    head = b"GET /health HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"a" * 20
    assert (
        raw_exchange(srv.port, [head[i : i + 1] for i in range(len(head))], pause=0.05) == b""
    )  # slow head
    assert time.time() - t0 < 6
    t0 = time.time()
    out = raw_exchange(
        srv.port, [b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{"]
    )
    assert out.startswith(b"HTTP/1.1 408") and time.time() - t0 < 3, out[:200]
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200  # a normal client is served


def test_idle_sockets_over_the_cap_make_room_for_new_ones(launch):
    srv = launch(limits=Limits(max_connections=8))
    idle = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(30)]
    time.sleep(0.2)
    assert len(srv.uv.server_state.connections) <= 8  # the oldest idle ones were closed
    for _ in range(3):
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
    for s in idle:
        s.close()


def test_a_flood_of_identical_errors_logs_one_line_per_interval():
    records = []
    logger = logging.getLogger("zerolm.test.flood")
    logger.propagate = False
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    logger.addFilter(RateLimit(interval=0.3))
    for _ in range(1000):
        logger.error("socket.accept() out of system resource")
    logger.error("another message")
    assert [r.getMessage() for r in records] == [
        "socket.accept() out of system resource",
        "another message",
    ]
    time.sleep(0.35)
    logger.error("socket.accept() out of system resource")
    assert "999 more like this" in records[-1].getMessage()


@pytest.mark.slow
def test_serve_process_at_its_fd_limit_answers_and_sigterm_ends_it_in_time(model_dir):
    """`zerolm serve` with 256 file descriptors: 300 idle sockets leave it answering, with a short
    log; a client that never reads its stream does not keep it alive past --shutdown-timeout."""
    import resource
    import signal

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "zerolm.cli",
            "serve",
            str(model_dir),
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--max-tokens",
            "1000",
            "--shutdown-timeout",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256)),
    )
    try:
        t0 = time.time()
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.time() - t0 < 90, proc.stdout.read()
                time.sleep(0.2)
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(300)]
        for _ in range(3):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/health")
            assert conn.getresponse().status == 200
        for s in idle:
            s.close()
        deaf = socket.socket()
        deaf.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        deaf.connect(("127.0.0.1", port))
        body = json.dumps(
            {
                "prompt": "Hello",
                "max_tokens": 1000,
                "n": 4,
                "temperature": 0,
                "stream": True,
                "logprobs": 5,
            }
        ).encode()
        deaf.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        time.sleep(1)  # the stream runs; its socket buffers fill
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/health")
        assert (
            json.loads(conn.getresponse().read())["running"] == 4
        )  # seconds of generation still to go
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        assert time.time() - t0 < 3, (
            time.time() - t0
        )  # --shutdown-timeout 1, then the stream is cancelled
        deaf.close()
    finally:
        if proc.poll() is None:
            proc.kill()
    log = proc.stdout.read()
    assert len(log) < 20_000 and b"Too many open files" not in log, log[-2000:]
