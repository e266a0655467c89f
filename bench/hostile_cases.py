"""bench/hostile.py's parts: a raw asyncio HTTP/1.1 client (it must send bytes no library would:
invalid UTF-8, lying lengths, NaN literals), the verdicts on its replies, and the tables of poison
and fuzz requests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field

KEY = "sk-hostile"  # the API key the script starts its server with


@dataclass
class Reply:
    status: int | None  # None: no HTTP answer (timeout, reset, closed)
    headers: dict = field(default_factory=dict)  # lower-case names
    body: bytes = b""
    error: str | None = None
    chunks: list = field(
        default_factory=list
    )  # (perf_counter time, bytes) per chunk of a chunked body

    def json(self):
        """The body as strict JSON (a bare NaN/Infinity is no JSON), or None."""
        try:
            return json.loads(self.body, parse_constant=_no_constant)
        except ValueError:
            return None

    def events(self) -> list[tuple[float, object]]:
        """SSE `data:` events as (arrival time, parsed JSON or "[DONE]"; None where it is no
        JSON)."""
        out, buf = [], b""
        for t, c in self.chunks:
            buf += c
            while b"\n\n" in buf:
                ev, buf = buf.split(b"\n\n", 1)
                for line in ev.split(b"\n"):
                    if line.startswith(b"data: "):
                        data = line[6:]
                        out.append((t, "[DONE]" if data == b"[DONE]" else _loads(data)))
        return out


def _no_constant(c):
    raise ValueError(f"bare {c} in JSON")


def _loads(b: bytes):
    try:
        return json.loads(b, parse_constant=_no_constant)
    except ValueError:
        return None


def request(
    method: str,
    path: str,
    body=b"",
    *,
    ctype: str | None = "application/json",
    key: str | None = KEY,
    headers: tuple = (),
    chunked: bool = False,
    length: str | None = None,
) -> bytes:
    """Raw request bytes; a dict body is JSON, `length` overrides Content-Length (a lie, or
    junk)."""
    if isinstance(body, dict | list):
        body = json.dumps(body, ensure_ascii=False).encode()
    elif isinstance(body, str):
        body = body.encode()
    head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    if ctype:
        head.append(f"Content-Type: {ctype}")
    if key:
        head.append(f"Authorization: Bearer {key}")
    head += list(headers)
    if chunked:
        head.append("Transfer-Encoding: chunked")
        step = 1 << 16
        body = (
            b"".join(
                b"%x\r\n%s\r\n" % (len(body[i : i + step]), body[i : i + step])
                for i in range(0, len(body), step)
            )
            + b"0\r\n\r\n"
        )
    elif length is not None or body or method in ("POST", "PUT", "PATCH"):
        head.append(f"Content-Length: {length if length is not None else len(body)}")
    return "\r\n".join(head).encode() + b"\r\n\r\n" + body


def post(path: str, payload, **kw) -> bytes:
    return request("POST", path, payload, **kw)


async def send(
    port: int, raw: bytes, timeout: float = 20.0, started: asyncio.Event | None = None
) -> Reply:
    """Send `raw` and read one response (the body is written while the answer is read, so an early
    413 is seen even though the rest of the body then meets a closed socket); `started` is set at
    the first body chunk."""
    try:
        return await asyncio.wait_for(_exchange(port, raw, started), timeout)
    except TimeoutError:
        return Reply(None, error="timeout")
    except (OSError, asyncio.IncompleteReadError, ValueError) as e:
        return Reply(None, error=f"{type(e).__name__}: {e}")


async def _exchange(port: int, raw: bytes, started: asyncio.Event | None) -> Reply:  # noqa: C901 (one raw HTTP exchange with its error cases)
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)

    async def pump():
        for i in range(0, len(raw), 1 << 16):
            writer.write(raw[i : i + (1 << 16)])
            await writer.drain()

    wtask = asyncio.create_task(pump())
    try:
        status_line = await reader.readline()
        if not status_line:
            return Reply(None, error="closed without an answer")
        status = int(status_line.split()[1])
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            k, _, v = line.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        rep = Reply(status, headers)
        if headers.get("transfer-encoding", "").lower() == "chunked":
            try:
                while size := int((await reader.readline()).split(b";")[0], 16):
                    rep.chunks.append((time.perf_counter(), await reader.readexactly(size)))
                    if started is not None:
                        started.set()
                    await reader.readexactly(2)
            except (
                OSError,
                asyncio.IncompleteReadError,
                ValueError,
            ) as e:  # a stream cut: keep what came
                rep.error = f"body cut after {len(rep.chunks)} chunks ({type(e).__name__})"
            rep.body = b"".join(c for _, c in rep.chunks)
        elif raw.startswith(b"HEAD ") or status in (204, 304):
            pass
        elif "content-length" in headers:
            rep.body = await reader.readexactly(int(headers["content-length"]))
        else:
            rep.body = await reader.read()
        return rep
    finally:
        wtask.cancel()
        with contextlib.suppress(BaseException):
            await wtask
        writer.close()


# -- reading replies -------------------------------------------------------------------------------
def outcome(rep, stream: bool) -> dict:
    """A completion reply (choice 0) as status, tokens, text, finish_reason, [DONE] seen, error
    events."""
    out = {"status": rep.status}
    if rep.status != 200:
        out["error"] = rep.error or rep.body[:200].decode("utf-8", "replace")
        return out
    if stream:
        evs = [e for _, e in rep.events()]
        chunks = [e for e in evs if isinstance(e, dict) and e.get("choices")]
        choices = [c for e in chunks for c in e["choices"] if c.get("index", 0) == 0]
        out.update(
            done="[DONE]" in evs,
            error_events=sum(isinstance(e, dict) and "error" in e for e in evs),
            bad_json=sum(e is None for e in evs),
            chunks=len(rep.chunks),
            cut=rep.error,
        )
    else:
        body = rep.json()
        choices = body["choices"][:1] if body else []
        out.update(done=body is not None, error_events=0, bad_json=int(body is None))
    out["tokens"] = [t for c in choices for t in ((c.get("logprobs") or {}).get("tokens") or [])]
    out["text"] = "".join(c.get("text", "") for c in choices)
    out["finish"] = next(
        (c["finish_reason"] for c in reversed(choices) if c.get("finish_reason")), None
    )
    return out


def verdict(o: dict, ref: dict) -> str:
    """How a live generation ended against its solo run: "intact" or what broke."""
    if o["status"] != 200:
        return f"status {o['status']}"
    if o.get("cut") or not o.get("done"):
        return "cut (no [DONE])"
    if o.get("error_events"):
        return "error event"
    if o.get("finish") not in ("stop", "length"):
        return "no finish_reason"
    return (
        "intact"
        if (o.get("tokens"), o.get("text")) == (ref.get("tokens"), ref.get("text"))
        else "tokens differ"
    )


def intact(o: dict, ref: dict) -> bool:
    return verdict(o, ref) == "intact"


def well_defined(rep, stream: bool) -> bool:
    """A poison's own answer: a 4xx error body, or a 200 whose JSON is strict and every choice
    finished."""
    if rep.status is not None and 400 <= rep.status < 500:
        return isinstance(rep.json(), dict) and "error" in rep.json()
    if rep.status != 200:
        return False
    if stream:
        evs = [e for _, e in rep.events()]
        return (
            "[DONE]" in evs
            and None not in evs
            and not any(isinstance(e, dict) and "error" in e for e in evs)
        )
    body = rep.json()
    return bool(body) and all(
        c.get("finish_reason") in ("stop", "length") for c in body.get("choices") or [None]
    )


# -- poison: sent while 8 seeded generations run; each must get a 4xx or a well-defined 200
def poison_variants(quick: bool) -> list[tuple[str, str, dict]]:
    """(name, path, body)."""
    C, H = "/v1/completions", "/v1/chat/completions"
    base = {"prompt": "Hi", "max_tokens": 8}
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
    v = [
        ("seed 2**64", C, {**base, "seed": 2**64}),
        ("seed -2**63-1", C, {**base, "seed": -(2**63) - 1}),
        ("temperature 1e-40", C, {**base, "temperature": 1e-40}),
        ("temperature 1e-300", C, {**base, "temperature": 1e-300}),
        ("repetition_penalty 1e-300", C, {**base, "repetition_penalty": 1e-300}),
        ("repetition_penalty 5e-324", C, {**base, "repetition_penalty": 5e-324}),
        ("top_p 1e-30", C, {**base, "top_p": 1e-30}),
        ("seed 2**64-1, n=2 (choice 1 gets seed+1)", C, {**base, "seed": 2**64 - 1, "n": 2}),
        ("seed 2**64 streamed", C, {**base, "seed": 2**64, "stream": True}),
        ("chat repetition_penalty 5e-324", H, {**chat, "repetition_penalty": 5e-324}),
        ("temperature 5e-324", C, {**base, "temperature": 5e-324}),
        ("top_p 5e-324", C, {**base, "top_p": 5e-324}),
        ("repetition_penalty 1e308", C, {**base, "repetition_penalty": 1e308}),
        ("top_k 2**63", C, {**base, "top_k": 2**63}),
        (
            "min_p 1-1e-16, temperature 2",
            C,
            {**base, "min_p": 0.9999999999999999, "temperature": 2},
        ),
        (
            "penalties -2, temperature 1e-30",
            C,
            {**base, "presence_penalty": -2, "frequency_penalty": -2, "temperature": 1e-30},
        ),
        ("logprobs 20, temperature 1e-300", C, {**base, "logprobs": 20, "temperature": 1e-300}),
        ("seed 2**63 (valid)", C, {**base, "seed": 2**63}),
    ]
    keep = {
        "seed 2**64",
        "temperature 1e-300",
        "repetition_penalty 5e-324",
        "seed 2**64-1, n=2 (choice 1 gets seed+1)",
    }
    return [x for x in v if x[0] in keep] if quick else v


# -- fuzz: malformed or extreme requests, each followed by a canary --------------------------------
def fuzz_cases(max_body: int) -> list[tuple[str, bytes, str]]:
    """(name, raw request, expectation): "400", "401", "405" (with Allow), "413", "4xx", or "ok"
    (any non-5xx answer). The expectations beyond "no 5xx" are the ones issue 18 states."""
    C, H, INS = "/v1/completions", "/v1/chat/completions", "/v1/inspect/attention"
    msg = [{"role": "user", "content": "Hi"}]

    def comp(**kw):
        return post(C, {"prompt": "Hi", "max_tokens": 4, **kw})

    def chat(**kw):
        return post(H, {"messages": msg, "max_tokens": 4, **kw})

    def insp(**kw):
        return post(INS, {"prompt": "Hi", **kw})

    def raw(body: bytes, path=C, **kw):
        return request("POST", path, body, **kw)

    big = b'{"prompt": "' + b"a" * (max_body + 4096) + b'", "max_tokens": 4}'
    deep = b"[" * 100_000 + b"]" * 100_000
    return [
        ("empty body", raw(b""), "400"),
        ("truncated JSON", raw(b'{"prompt": "Hi"'), "400"),
        ("JSON null", raw(b"null"), "400"),
        ("JSON array", raw(b"[]"), "400"),
        ("JSON number", raw(b"123"), "400"),
        ("JSON string", raw(b'"Hi"'), "400"),
        ("trailing garbage", raw(b'{"prompt":"Hi","max_tokens":4} xyz'), "400"),
        ("duplicate keys", raw(b'{"prompt":"Hi","prompt":"Ho","max_tokens":4}'), "ok"),
        ("BOM before JSON", raw(b'\xef\xbb\xbf{"prompt":"Hi","max_tokens":4}'), "ok"),
        ("UTF-16 body", raw('{"prompt":"Hi","max_tokens":4}'.encode("utf-16")), "ok"),
        ("prompt int", comp(prompt=5), "400"),
        ("prompt null", comp(prompt=None), "400"),
        ("prompt []", comp(prompt=[]), "400"),
        ("prompt two strings", comp(prompt=["a", "b"]), "400"),
        ("prompt token ids", comp(prompt=[1, 2, 3]), "ok"),
        ("prompt empty", comp(prompt=""), "400"),
        ("prompt NUL char", comp(prompt="a\x00b"), "ok"),
        ("prompt lone surrogate", raw(b'{"prompt":"\\ud800","max_tokens":4}'), "400"),
        ("prompt reversed surrogates", raw(b'{"prompt":"\\udfff\\ud800","max_tokens":4}'), "400"),
        (
            "chat lone surrogate",
            raw(b'{"messages":[{"role":"user","content":"\\udc00"}],"max_tokens":4}', H),
            "400",
        ),
        ("invalid UTF-8", raw(b'{"prompt":"\xff\xfe","max_tokens":4}'), "400"),
        ("overlong UTF-8", raw(b'{"prompt":"\xc0\xaf","max_tokens":4}'), "400"),
        ("max_tokens -1", comp(max_tokens=-1), "400"),
        ("max_tokens 0", comp(max_tokens=0), "400"),
        ("max_tokens 2**64", comp(max_tokens=2**64), "400"),
        ("max_tokens 1e308", comp(max_tokens=1e308), "400"),
        ("max_tokens '4'", comp(max_tokens="4"), "ok"),
        ("max_tokens true", comp(max_tokens=True), "ok"),
        (
            "max_tokens 5000 digits",
            raw(b'{"prompt":"Hi","max_tokens":1' + b"0" * 5000 + b"}"),
            "400",
        ),
        ("max_tokens NaN", raw(b'{"prompt":"Hi","max_tokens":NaN}'), "400"),
        ("temperature NaN", raw(b'{"prompt":"Hi","max_tokens":4,"temperature":NaN}'), "400"),
        (
            "temperature Infinity",
            raw(b'{"prompt":"Hi","max_tokens":4,"temperature":Infinity}'),
            "400",
        ),
        (
            "temperature -Infinity",
            raw(b'{"prompt":"Hi","max_tokens":4,"temperature":-Infinity}'),
            "400",
        ),
        ("temperature 1e999", raw(b'{"prompt":"Hi","max_tokens":4,"temperature":1e999}'), "400"),
        ("top_p NaN", raw(b'{"prompt":"Hi","max_tokens":4,"top_p":NaN}'), "400"),
        (
            "presence_penalty NaN",
            raw(b'{"prompt":"Hi","max_tokens":4,"presence_penalty":NaN}'),
            "400",
        ),
        (
            "repetition_penalty Infinity",
            raw(b'{"prompt":"Hi","max_tokens":4,"repetition_penalty":Infinity}'),
            "400",
        ),
        ("repetition_penalty 1e308", comp(repetition_penalty=1e308), "ok"),
        ("top_k 10**30", comp(top_k=10**30), "ok"),
        ("min_p 1-1e-16", comp(min_p=0.9999999999999999), "ok"),
        ("temperature -1", comp(temperature=-1), "400"),
        ("seed 1e30 (float)", comp(seed=1e30), "ok"),  # 400, or reduced deterministically
        ("seed 'abc'", comp(seed="abc"), "400"),
        ("seed -1", comp(seed=-1), "ok"),
        ("seed 10**30", comp(seed=10**30), "ok"),
        ("n 10**6", comp(n=10**6), "400"),
        ("n 0", comp(n=0), "400"),
        ("n -1", comp(n=-1), "400"),
        ("n 2**64", comp(n=2**64), "400"),
        ("stop ['']", comp(stop=[""]), "400"),
        ("stop 1000 strings", comp(stop=["x"] * 1000), "400"),
        ("stop 100k chars", comp(stop="x" * 100_000), "ok"),
        ("stop int", comp(stop=5), "400"),
        ("stream 'yes'", comp(stream="yes"), "ok"),  # pydantic's lax bool
        ("stream_options bad", comp(stream=True, stream_options={"include_usage": "maybe"}), "400"),
        ("logprobs 2**40", comp(logprobs=2**40), "400"),
        ("echo true", comp(echo=True), "400"),
        (
            "tools",
            chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]),
            "400",
        ),
        ("response_format", chat(response_format={"type": "json_object"}), "400"),
        ("logit_bias", comp(logit_bias={"5": 100}), "400"),
        ("unknown model", comp(model="gpt-4"), "400"),
        ("functions", chat(functions=[{"name": "f", "parameters": {}}]), "400"),
        (
            "deep nesting in an unknown field",
            raw(b'{"prompt":"Hi","max_tokens":4,"x":' + deep + b"}"),
            "ok",
        ),
        ("deep nesting as prompt", raw(b'{"max_tokens":4,"prompt":' + deep + b"}"), "400"),
        ("chat messages []", chat(messages=[]), "400"),
        ("chat role tool", chat(messages=[{"role": "tool", "content": "x"}]), "400"),
        ("chat content null", chat(messages=[{"role": "user", "content": None}]), "400"),
        (
            "chat content parts",
            chat(messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]),
            "ok",
        ),
        ("chat 5000 messages", chat(messages=msg * 5000), "400"),
        ("chat top_logprobs 21", chat(logprobs=True, top_logprobs=21), "400"),
        ("chat top_logprobs -1", chat(logprobs=True, top_logprobs=-1), "400"),
        (
            "chat prompt + max_tokens over window",
            chat(messages=[{"role": "user", "content": "月光 " * 3000}]),
            "400",
        ),
        (
            "content-type text/plain",
            request("POST", C, {"prompt": "Hi", "max_tokens": 4}, ctype="text/plain"),
            "ok",
        ),
        (
            "no content-type",
            request("POST", C, {"prompt": "Hi", "max_tokens": 4}, ctype=None),
            "ok",
        ),
        (
            "form body",
            request("POST", C, "prompt=Hi", ctype="application/x-www-form-urlencoded"),
            "400",
        ),
        (
            "multipart body",
            request(
                "POST", C, b"--b\r\n\r\nHi\r\n--b--\r\n", ctype="multipart/form-data; boundary=b"
            ),
            "400",
        ),
        ("GET /v1/completions", request("GET", C), "405"),
        ("PUT /v1/chat/completions", request("PUT", H, {"messages": msg}), "405"),
        ("DELETE /v1/models", request("DELETE", "/v1/models"), "405"),
        ("POST /health", request("POST", "/health", {}), "405"),
        ("PATCH /v1/inspect/attention", request("PATCH", INS, {}), "405"),
        ("OPTIONS /v1/completions", request("OPTIONS", C), "4xx"),
        ("HEAD /health", request("HEAD", "/health"), "ok"),
        # declared: only 4 KB follow the headers, so the 413 must come from the declared length,
        # not a read
        (
            "body over the limit, declared",
            raw(big, length=str(len(big)))[: -(len(big) - 4096)],
            "413",
        ),
        ("body over the limit, chunked", raw(big, chunked=True), "413"),
        (
            "Content-Length short of the body",
            raw(b'{"prompt":"Hi","max_tokens":4}', length="5"),
            "4xx",
        ),
        ("Content-Length junk", raw(b'{"prompt":"Hi"}', length="abc"), "4xx"),
        ("Content-Length negative", raw(b'{"prompt":"Hi"}', length="-1"), "4xx"),
        (
            "Content-Length and chunked",
            raw(b'{"prompt":"Hi","max_tokens":4}', chunked=True, headers=("Content-Length: 10",)),
            "ok",
        ),  # chunked wins (RFC 9112)
        (
            "bad chunk size",
            request("POST", C, b"zz\r\nabc\r\n0\r\n\r\n", headers=("Transfer-Encoding: chunked",)),
            "4xx",
        ),
        ("garbage request line", b"HELLO\r\n\r\n", "4xx"),
        (
            "header of 100 KB",
            request("GET", "/v1/models", headers=("X-Big: " + "a" * 100_000,)),
            "ok",
        ),
        (
            "1000 headers",
            request("GET", "/v1/models", headers=tuple(f"X-H{i}: v" for i in range(1000))),
            "ok",
        ),
        ("bad percent-encoding", request("GET", "/v1/%zz"), "4xx"),
        ("path traversal", request("GET", "/../../../etc/passwd"), "4xx"),
        ("NUL in path", request("GET", "/v1/models%00"), "4xx"),
        ("junk query", raw(b'{"prompt":"Hi","max_tokens":4}', C + "?stream=true&%ff=1"), "ok"),
        ("no API key", request("POST", C, {"prompt": "Hi"}, key=None), "401"),
        ("wrong API key", request("POST", C, {"prompt": "Hi"}, key="sk-wrong"), "401"),
        ("bad JSON without a key", request("POST", C, b"{", key=None), "401"),
        ("inspect continuation [[256]]", insp(continuation=[[256]]), "400"),
        ("inspect continuation [[-1]]", insp(continuation=[[-1]]), "400"),
        ("inspect continuation [[1e10]]", insp(continuation=[[1e10]]), "400"),
        ("inspect continuation [['a']]", insp(continuation=[["a"]]), "400"),
        ("inspect continuation [[]]", insp(continuation=[[]]), "400"),
        ("inspect continuation 2000 tokens", insp(continuation=[[97]] * 2000), "400"),
        ("inspect layer 2**63", insp(layer=2**63), "400"),
        ("inspect head -1", insp(head=-1), "400"),
        ("inspect prompt and messages", insp(messages=msg), "400"),
        ("inspect lone surrogate", raw(b'{"prompt":"\\ud800"}', INS), "400"),
    ]


def expectation_met(expect: str, rep: Reply) -> bool:
    s = rep.status
    if s is None:
        return expect in ("4xx", "ok")  # a connection dropped on garbage is no server fault
    if expect == "ok":
        return s < 500
    if expect == "4xx":
        return 400 <= s < 500
    if expect == "405":
        return s == 405 and "allow" in rep.headers
    return s == int(expect)
