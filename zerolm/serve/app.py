"""`zerolm serve`: the OpenAI-compatible HTTP API (FastAPI + SSE) and the web UI, over the
continuous-batching scheduler. This is the text edge: requests become token ids here, generated
ids become text here (with stop strings and whole characters); the scheduler sees ids only.

Every error is an OpenAI-style body {"error": {"message", "type", "param", "code"}} with a 4xx
status (5xx only for a server fault); no request can take the server down.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from zerolm.infer.sampling import SamplingParams
from zerolm.infer.stop import StopStrings
from zerolm.inspect.attention import attention_weights
from zerolm.serve import protocol as P
from zerolm.serve.scheduler import TTFT_BUCKETS, Job, QueueFull, Scheduler
from zerolm.tokenizer import END, EOS, SPECIAL_TOKENS, Tokenizer
from zerolm.tokenizer.chat import prompt_ids, render
from zerolm.tokenizer.stream import StreamDecoder

STATIC = Path(__file__).parent / "static"


@dataclass(frozen=True)
class Limits:
    max_tokens: int = 512  # per choice; also the default when a request gives none (capped by the window)
    max_n: int = 8
    max_messages: int = 256
    max_stop: int = 4
    max_prompt_tokens: int | None = None  # None: the model window - 1
    max_body_bytes: int = 1 << 20
    retry_after_s: int = 1


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind, self.headers = status, message, param, code, kind, headers


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = P.ErrorResponse(error=P.ErrorDetail(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is a 413 before anything parses it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        too_big = error_response(413, f"request body over {self.limit} bytes; send less (a shorter prompt or "
                                      "fewer messages)", param=None, code="request_too_large")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await too_big(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return msg

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await too_big(scope, receive, send)


class _TooLarge(Exception):
    pass


class Relay:
    """Scheduler thread -> event loop. Events are queued and the loop is woken at most once per
    burst of them (one self-pipe write per decode step, not one per token)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.items, self.armed, self.lock = loop, collections.deque(), False, threading.Lock()

    def put(self, queue: asyncio.Queue, item) -> None:  # any thread
        self.items.append((queue, item))
        with self.lock:
            if self.armed:
                return
            self.armed = True
        self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:  # the loop's thread
        with self.lock:
            self.armed = False
        while self.items:
            queue, item = self.items.popleft()
            queue.put_nowait(item)


class Server:
    """Holds the model, tokenizer, scheduler and limits; its methods are the endpoints' work."""

    def __init__(self, model, tok: Tokenizer, name: str, *, max_batch: int = 16, max_queue: int = 64,
                 limits: Limits = Limits()):
        self.model, self.tok, self.name, self.limits = model, tok, name, limits
        self.window = model.cfg.max_seq_len
        self.scheduler = Scheduler(model, max_batch=max_batch, max_queue=max_queue)
        self.created = int(time.time())
        self.chat_stops = (tok.token_id(END), tok.token_id(EOS))
        self.token_ids = {b: i for i, b in enumerate(tok.token_bytes) if b}  # bytes -> id (the inspector's input)
        self.http_errors = 0
        self._relay: Relay | None = None

    def relay(self) -> Relay:
        loop = asyncio.get_running_loop()
        if self._relay is None or self._relay.loop is not loop:
            self._relay = Relay(loop)
        return self._relay

    # -- text <-> tokens ---------------------------------------------------------------------
    def token_str(self, i: int) -> str:
        return SPECIAL_TOKENS[i] if i < len(SPECIAL_TOKENS) else self.tok.token_bytes[i].decode("utf-8", "backslashreplace")

    def prepare(self, req: P.SamplingRequest, prompt: list[int], param: str) -> tuple[int, SamplingParams, list[str]]:
        """Check limits; return (max_new_tokens, sampling, stop strings) or raise ApiError."""
        lim = self.limits
        if req.n > lim.max_n:
            raise ApiError(400, f"n={req.n} is over this server's limit of {lim.max_n}", "n")
        stops = req.stops()
        if len(stops) > lim.max_stop or any(not s for s in stops):
            raise ApiError(400, f"stop takes up to {lim.max_stop} non-empty strings", "stop")
        max_prompt = lim.max_prompt_tokens or self.window - 1
        if len(prompt) > max_prompt:
            raise ApiError(400, f"the prompt is {len(prompt)} tokens; this server takes at most {max_prompt} "
                                f"(model window {self.window}): shorten it", param, "context_length_exceeded")
        asked = getattr(req, "max_completion_tokens", None) or req.max_tokens
        if asked is not None and asked > lim.max_tokens:
            raise ApiError(400, f"max_tokens={asked} is over this server's limit of {lim.max_tokens}", "max_tokens")
        room = self.window - len(prompt)
        if asked is not None and asked > room:
            raise ApiError(400, f"the prompt ({len(prompt)} tokens) + max_tokens={asked} exceed the model window of "
                                f"{self.window} tokens: lower max_tokens to {room} or shorten the prompt",
                           "max_tokens", "context_length_exceeded")
        max_new = asked or min(room, lim.max_tokens)
        sampling = SamplingParams(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
                                  repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
                                  frequency_penalty=req.frequency_penalty)
        return max_new, sampling, stops

    def completion_prompt(self, text: str) -> list[int]:
        if not text:
            raise ApiError(400, "prompt must not be empty", "prompt")
        return [self.tok.token_id(EOS), *self.tok.encode(text)]  # eos first: a new document starts

    # -- generation ---------------------------------------------------------------------------
    def start(self, prompt: list[int], n: int, max_new: int, sampling: SamplingParams, stops: list[str],
              stop_ids: tuple[int, ...], seed: int | None, logprobs: int | None) -> Generation:
        """Queue n choices now (a full queue is a 503 before any response starts)."""
        gen = Generation(self, n, stops, stop_ids)
        jobs = [Job(prompt=prompt, max_new_tokens=max_new, sampling=sampling, stop_token_ids=stop_ids,
                    seed=None if seed is None else seed + i, logprobs=logprobs, emit=gen.emitter(i)) for i in range(n)]
        try:
            self.scheduler.submit(jobs)
        except QueueFull as e:
            raise ApiError(503, f"server busy ({e}); retry shortly", None, "server_busy", "server_error",
                           {"Retry-After": str(self.limits.retry_after_s)}) from e
        gen.jobs = jobs
        return gen

    def logprob_entry(self, tok) -> P.TokenLogprob:
        return P.TokenLogprob(token=self.token_str(tok.id), logprob=tok.logprob, bytes=list(self.tok.token_bytes[tok.id]),
                              top_logprobs=[P.TopLogprob(token=self.token_str(t), logprob=lp,
                                                         bytes=list(self.tok.token_bytes[t])) for t, lp in tok.top])


@dataclass
class Event:
    choice: int
    text: str  # new text of this choice (whole characters, stop strings cut)
    tokens: list  # the scheduler's Tokens consumed (stop tokens excluded)
    finish: str | None = None  # "stop" | "length" on a choice's last event
    generated: int = 0  # on the last event: every token sampled for the choice, stop token included


class Generation:
    """The text side of one request's n choices: scheduler events in, Events out."""

    def __init__(self, server: Server, n: int, stops: list[str], stop_ids: tuple[int, ...]):
        self.server, self.stop_ids = server, stop_ids
        self.relay = server.relay()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.decoders = [StreamDecoder(server.tok, stop_ids, skip_special=True) for _ in range(n)]
        self.cutters = [StopStrings(stops) for _ in range(n)]
        self.jobs: list[Job | None] = []

    def emitter(self, i: int):
        return lambda kind, value: self.relay.put(self.queue, (i, kind, value))

    def cancel(self) -> None:
        for j in self.jobs:
            if j is not None:
                j.cancel()
        self.server.scheduler.wake()

    async def collect(self) -> tuple[list[str], list[list], list[str | None], int]:
        """Run to the end: (text, tokens and finish reason per choice, tokens generated in all)."""
        n = len(self.jobs)
        texts, toks, reasons, used = [""] * n, [[] for _ in range(n)], [None] * n, 0
        async for ev in self.events():
            texts[ev.choice] += ev.text
            toks[ev.choice] += ev.tokens
            reasons[ev.choice] = ev.finish or reasons[ev.choice]
            used += ev.generated
        return texts, toks, reasons, used

    async def events(self):
        """Events until every choice has finished; leaving early (a client gone) cancels the rest.
        Tokens that queued up meanwhile (a busy server) go out together: one Event per choice."""
        open_ = len(self.jobs)
        try:
            while open_:
                batch = [await self.queue.get()]
                while not self.queue.empty():
                    batch.append(self.queue.get_nowait())
                out: dict[int, Event] = {}
                for i, kind, value in batch:
                    job = self.jobs[i]
                    if job is None:
                        continue  # a choice already finished by a stop string
                    ev = out.setdefault(i, Event(i, "", []))
                    if kind == "token":
                        if value.id in self.stop_ids:
                            continue
                        text, hit = self.cutters[i].feed(self.decoders[i].push(value.id))
                        ev.text += text
                        ev.tokens.append(value)
                        if not hit:
                            continue
                        job.cancel()
                        self.server.scheduler.wake()
                        ev.finish = "stop"
                    elif kind == "done":
                        ev.text += self.cutters[i].feed(self.decoders[i].flush())[0] + self.cutters[i].flush()
                        ev.finish = "length" if value == "length" else "stop"
                    else:
                        raise ApiError(500, str(value), kind="server_error")
                    ev.generated = job.generated
                    self.jobs[i], open_ = None, open_ - 1
                for ev in out.values():
                    if ev.text or ev.tokens or ev.finish:
                        yield ev
        finally:
            self.cancel()


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(server: Server, api_key: str | None = None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        server.scheduler.close()

    app = FastAPI(title="zerolm", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible API of a zerolm model, with continuous batching.",
                  responses={400: {"model": P.ErrorResponse}, 401: {"model": P.ErrorResponse},
                             413: {"model": P.ErrorResponse}, 503: {"model": P.ErrorResponse}})
    app.state.server = server

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        server.http_errors += 1
        return error_response(e.status, e.message, e.kind, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        server.http_errors += 1
        err = e.errors()[0]
        if err.get("type") == "json_invalid":
            return error_response(400, f"the request body is not valid JSON: {err.get('msg')}", code="invalid_json")
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        return error_response(400, f"{param or 'body'}: {err.get('msg')}", param=param, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        server.http_errors += 1
        return error_response(e.status_code, str(e.detail), "invalid_request_error" if e.status_code < 500 else "server_error")

    @app.exception_handler(Exception)
    async def _crash(request, e: Exception):
        server.http_errors += 1
        return error_response(500, f"internal error: {type(e).__name__}: {e}", "server_error")

    async def auth(request: Request):
        if api_key is None:
            return
        got = request.headers.get("authorization", "")
        if not (got.startswith("Bearer ") and secrets.compare_digest(got[7:].encode(), api_key.encode())):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>' with the "
                                "key given to `zerolm serve --api-key`", code="invalid_api_key")

    v1 = [Depends(auth)]

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": server.name, **server.scheduler.load()}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return metrics_text(server)

    @app.get("/v1/models", dependencies=v1, response_model=P.ModelList)
    async def models():
        return P.ModelList(data=[P.ModelCard(id=server.name, created=server.created, max_model_len=server.window)])

    @app.post("/v1/chat/completions", dependencies=v1, response_model=P.ChatCompletion,
              responses={200: {"content": {"text/event-stream": {}},
                               "description": "a chat.completion, or with stream=true a stream of "
                                              "chat.completion.chunk events ending with data: [DONE]"}})
    async def chat(req: P.ChatCompletionRequest):
        if len(req.messages) > server.limits.max_messages:
            raise ApiError(400, f"{len(req.messages)} messages; this server takes at most "
                                f"{server.limits.max_messages}", "messages")
        messages = [m.model_dump() for m in req.messages]
        try:
            prompt = prompt_ids(server.tok, messages)
        except ValueError as e:
            raise ApiError(400, str(e), "messages") from e
        max_new, sampling, stops = server.prepare(req, prompt, "messages")
        k = (req.top_logprobs or 0) if req.logprobs else None
        gen = server.start(prompt, req.n, max_new, sampling, stops, server.chat_stops, req.seed, k)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            return StreamingResponse(chat_stream(server, gen, req, rid, created, len(prompt)),
                                     media_type="text/event-stream")
        texts, toks, reasons, used = await gen.collect()
        choices = [P.ChatChoice(index=i, message=P.AssistantMessage(content=texts[i]), finish_reason=reasons[i],
                                logprobs=P.ChoiceLogprobs(content=[server.logprob_entry(t) for t in toks[i]])
                                if k is not None else None) for i in range(req.n)]
        return P.ChatCompletion(id=rid, created=created, model=server.name, choices=choices,
                                usage=usage(len(prompt), used))

    @app.post("/v1/completions", dependencies=v1, response_model=P.Completion,
              responses={200: {"content": {"text/event-stream": {}},
                               "description": "a text_completion, or with stream=true a stream of them ending "
                                              "with data: [DONE]"}})
    async def completions(req: P.CompletionRequest):
        if isinstance(req.prompt, list):
            if len(req.prompt) != 1:
                raise ApiError(400, "give one prompt per request (a list of one string is accepted)", "prompt")
            req.prompt = req.prompt[0]
        prompt = server.completion_prompt(req.prompt)
        max_new, sampling, stops = server.prepare(req, prompt, "prompt")
        eos = (server.tok.token_id(EOS),)
        gen = server.start(prompt, req.n, max_new, sampling, stops, eos, req.seed, req.logprobs)
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            return StreamingResponse(completion_stream(server, gen, req, rid, created, len(prompt)),
                                     media_type="text/event-stream")
        texts, toks, reasons, used = await gen.collect()
        choices = [P.CompletionChoice(index=i, text=texts[i], finish_reason=reasons[i],
                                      logprobs=legacy_logprobs(server, toks[i], req.logprobs)
                                      if req.logprobs is not None else None) for i in range(req.n)]
        return P.Completion(id=rid, created=created, model=server.name, choices=choices,
                            usage=usage(len(prompt), used))

    @app.post("/v1/inspect/attention", dependencies=v1, response_model=P.AttentionResponse)
    async def inspect_attention(req: P.AttentionRequest):
        """Attention weights of one layer and head over a text (zerolm extension, for the web UI)."""
        cfg = server.model.cfg
        if (req.messages is None) == (req.prompt is None):
            raise ApiError(400, "give exactly one of 'messages' or 'prompt'", "messages")
        if req.layer >= cfg.n_layers or req.head >= cfg.n_heads:
            raise ApiError(400, f"layer must be < {cfg.n_layers} and head < {cfg.n_heads}", "layer")
        try:
            if req.messages:
                messages = [m.model_dump() for m in req.messages]
                ids = prompt_ids(server.tok, messages) if req.continuation is not None else render(server.tok, messages)[0]
            else:
                ids = server.completion_prompt(req.prompt)
        except ValueError as e:
            raise ApiError(400, str(e), "messages") from e
        offset = len(ids)
        for j, b in enumerate(req.continuation or []):
            if (tid := server.token_ids.get(bytes(b))) is None:
                raise ApiError(400, f"continuation token {j} ({bytes(b)!r}) is no token of this model", "continuation")
            ids.append(tid)
        if len(ids) > server.window:
            raise ApiError(400, f"{len(ids)} tokens are over the model window of {server.window}", "messages",
                           "context_length_exceeded")
        w = await asyncio.to_thread(attention_weights, server.model, ids, req.layer)
        return P.AttentionResponse(tokens=[server.token_str(i) for i in ids],
                                   token_bytes=[list(server.tok.token_bytes[i]) for i in ids], offset=offset, layer=req.layer, head=req.head,
                                   n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                                   weights=[[round(x, 5) for x in row] for row in w[req.head].tolist()])

    return BodyLimit(app, server.limits.max_body_bytes) if server.limits.max_body_bytes else app


def usage(prompt_tokens: int, completion_tokens: int) -> P.Usage:
    return P.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


def legacy_logprobs(server: Server, toks, k: int) -> P.CompletionLogprobs:
    strs = [server.token_str(t.id) for t in toks]
    offsets, at = [], 0
    for s in strs:
        offsets.append(at)
        at += len(s)
    return P.CompletionLogprobs(tokens=strs, token_logprobs=[t.logprob for t in toks],
                                top_logprobs=[{server.token_str(a): lp for a, lp in t.top} for t in toks] if k else None,
                                text_offset=offsets)


async def chat_stream(server: Server, gen: Generation, req, rid: str, created: int, n_prompt: int):
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": server.name}
    k = (req.top_logprobs or 0) if req.logprobs else None
    used = 0
    for i in range(req.n):
        yield sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}]})
    async for ev in gen.events():
        used += ev.generated
        lp = {"content": [server.logprob_entry(t).model_dump() for t in ev.tokens]} if k is not None and ev.tokens else None
        if ev.text or lp or ev.finish:
            yield sse({**base, "choices": [{"index": ev.choice, "delta": {"content": ev.text} if ev.text else {},
                                            "logprobs": lp, "finish_reason": ev.finish}]})
    if req.stream_options and req.stream_options.include_usage:
        yield sse({**base, "choices": [], "usage": usage(n_prompt, used).model_dump()})
    yield "data: [DONE]\n\n"


async def completion_stream(server: Server, gen: Generation, req, rid: str, created: int, n_prompt: int):
    base = {"id": rid, "object": "text_completion", "created": created, "model": server.name}
    used = 0
    async for ev in gen.events():
        used += ev.generated
        lp = legacy_logprobs(server, ev.tokens, req.logprobs).model_dump() if req.logprobs is not None and ev.tokens else None
        if ev.text or lp or ev.finish:
            yield sse({**base, "choices": [{"index": ev.choice, "text": ev.text, "logprobs": lp,
                                            "finish_reason": ev.finish}]})
    if req.stream_options and req.stream_options.include_usage:
        yield sse({**base, "choices": [], "usage": usage(n_prompt, used).model_dump()})
    yield "data: [DONE]\n\n"


def metrics_text(server: Server) -> str:
    """Prometheus text format (version 0.0.4)."""
    st, load = server.scheduler.stats, server.scheduler.load()
    lines = [
        "# HELP zerolm_requests_total Generation requests accepted.", "# TYPE zerolm_requests_total counter",
        f"zerolm_requests_total {st.requests}",
        "# HELP zerolm_request_errors_total Requests answered with an error status.",
        "# TYPE zerolm_request_errors_total counter", f"zerolm_request_errors_total {server.http_errors}",
        "# HELP zerolm_generated_tokens_total Tokens generated.", "# TYPE zerolm_generated_tokens_total counter",
        f"zerolm_generated_tokens_total {st.tokens}",
        "# HELP zerolm_queue_depth Sequences waiting for a slot.", "# TYPE zerolm_queue_depth gauge",
        f"zerolm_queue_depth {load['waiting']}",
        "# HELP zerolm_running_sequences Sequences in the decode batch.", "# TYPE zerolm_running_sequences gauge",
        f"zerolm_running_sequences {load['running']}",
        "# HELP zerolm_tokens_per_second Generated tokens per second over the last 10 s.",
        "# TYPE zerolm_tokens_per_second gauge", f"zerolm_tokens_per_second {server.scheduler.tokens_per_second():.3f}",
        "# HELP zerolm_time_to_first_token_seconds From submission to the first generated token.",
        "# TYPE zerolm_time_to_first_token_seconds histogram",
    ]
    for b in TTFT_BUCKETS:
        le = "+Inf" if b == float("inf") else f"{b:g}"
        lines.append(f'zerolm_time_to_first_token_seconds_bucket{{le="{le}"}} {st.ttft_buckets[b]}')
    lines += [f"zerolm_time_to_first_token_seconds_sum {st.ttft_sum:.6f}",
              f"zerolm_time_to_first_token_seconds_count {st.ttft_count}"]
    return "\n".join(lines) + "\n"


def load_server(model_dir: str | Path, *, max_batch: int = 16, max_queue: int = 64, limits: Limits = Limits(),
                name: str | None = None) -> Server:
    from zerolm.infer.engine import decode_layout
    from zerolm.model import load_model

    model = decode_layout(load_model(model_dir))
    path = Path(model_dir).resolve()
    name = name or (path.parent.name if path.name == "model" else path.name)  # runs/x/sft/model -> "sft"
    return Server(model, Tokenizer.load(model_dir), name,
                  max_batch=max_batch, max_queue=max_queue, limits=limits)


def serve(model_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_batch: int = 16, max_queue: int = 64, limits: Limits = Limits(), log_level: str = "info",
          name: str | None = None) -> None:
    """Load the model and serve it until interrupted (`zerolm serve`)."""
    import uvicorn

    server = load_server(model_dir, max_batch=max_batch, max_queue=max_queue, limits=limits, name=name)
    uvicorn.run(create_app(server, api_key), host=host, port=port, log_level=log_level)
