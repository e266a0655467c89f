"""`zerolm serve`: the OpenAI-compatible HTTP API (FastAPI + SSE) and the web UI, over the
continuous-batching scheduler. This is the HTTP edge; the text work behind the endpoints
(limits, ids <-> text, stop strings) is zerolm/serve/server.py, and the scheduler sees ids only.

Every error is an OpenAI-style body {"error": {"message", "type", "param", "code"}} with a 4xx
status (5xx only for a server fault); no request can take the server down. A choice that fails
mid-generation is a 500 for its own request, or in a stream an error event and then [DONE].
The CPU work of a request (tokenizing, the inspector's pass and its JSON) runs in worker threads,
so the event loop keeps every other stream flowing; a non-streaming request whose client leaves is
cancelled, as a stream is. Key, body size and time, header timeouts and the connection cap are in
zerolm/serve/edge.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    FileResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from zerolm.inspect.attention import attention_weights
from zerolm.serve import protocol as P
from zerolm.serve.edge import Edge, error_response, rate_limit_logs, uvicorn_config
from zerolm.serve.server import ApiError, Generation, Limits, Server, load_server, metrics_text
from zerolm.tokenizer import EOS

STATIC = Path(__file__).parent / "static"


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(server: Server, api_key: str | None = None):
    """The ASGI app: the FastAPI endpoints behind the Edge guards (key, body size and time)."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        server.scheduler.close()

    app = FastAPI(
        title="zerolm",
        version="0.1.0",
        lifespan=lifespan,
        description="OpenAI-compatible API of a zerolm model, with continuous batching.",
        responses={
            400: {"model": P.ErrorResponse},
            401: {"model": P.ErrorResponse},
            413: {"model": P.ErrorResponse},
            503: {"model": P.ErrorResponse},
        },
    )
    app.state.server = server
    inspecting = 0  # inspector calls running (bounded by limits.max_inspect)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        server.http_errors += 1
        return error_response(e.status, e.message, e.kind, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        server.http_errors += 1
        err = e.errors()[0]
        if err.get("type") == "json_invalid":
            return error_response(
                400, f"the request body is not valid JSON: {err.get('msg')}", code="invalid_json"
            )
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        return error_response(
            400, f"{param or 'body'}: {err.get('msg')}", param=param, code="invalid_value"
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        server.http_errors += 1
        return error_response(
            e.status_code,
            str(e.detail),
            "invalid_request_error" if e.status_code < 500 else "server_error",
            headers=e.headers,
        )  # 405 keeps its Allow header

    @app.exception_handler(_ClientGone)
    async def _gone(request, e):
        return Response(status_code=499)  # nobody reads it: the client has left

    @app.exception_handler(Exception)
    async def _crash(request, e: Exception):
        server.http_errors += 1
        return error_response(500, f"internal error: {type(e).__name__}: {e}", "server_error")

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get(
        "/health",
        responses={
            503: {
                "description": "the model is unhealthy (e.g. non-finite logits); the body says why"
            }
        },
    )
    async def health():
        state = server.scheduler.health()
        body = {
            "status": "ok" if state["ok"] else "unhealthy",
            "model": server.name,
            "reason": state.get("reason"),
            **server.scheduler.load(),
        }
        return JSONResponse(body, status_code=200 if state["ok"] else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return metrics_text(server)

    @app.get("/v1/models", response_model=P.ModelList)
    async def models():
        return P.ModelList(
            data=[P.ModelCard(id=server.name, created=server.created, max_model_len=server.window)]
        )

    @app.post(
        "/v1/chat/completions",
        response_model=P.ChatCompletion,
        responses={
            200: {
                "content": {"text/event-stream": {}},
                "description": "a chat.completion, or with stream=true a stream of "
                "chat.completion.chunk events ending with data: [DONE]",
            }
        },
    )
    async def chat(req: P.ChatCompletionRequest, request: Request):
        prompt = await asyncio.to_thread(server.chat_prompt, [m.model_dump() for m in req.messages])
        max_new, sampling, stops = server.prepare(req, prompt, "messages")
        k = (req.top_logprobs or 0) if req.logprobs else None
        gen = server.start(prompt, req.n, max_new, sampling, stops, server.chat_stops, req.seed, k)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            return StreamingResponse(
                guarded(server, chat_stream(server, gen, req, rid, created, len(prompt))),
                media_type="text/event-stream",
            )
        texts, toks, reasons, used = await collect(gen, request)
        choices = [
            P.ChatChoice(
                index=i,
                message=P.AssistantMessage(content=texts[i]),
                finish_reason=reasons[i],
                logprobs=P.ChoiceLogprobs(content=[server.logprob_entry(t) for t in toks[i]])
                if k is not None
                else None,
            )
            for i in range(req.n)
        ]
        return P.ChatCompletion(
            id=rid,
            created=created,
            model=server.name,
            choices=choices,
            usage=usage(len(prompt), used),
        )

    @app.post(
        "/v1/completions",
        response_model=P.Completion,
        responses={
            200: {
                "content": {"text/event-stream": {}},
                "description": "a text_completion, or with stream=true a stream of them ending "
                "with data: [DONE]",
            }
        },
    )
    async def completions(req: P.CompletionRequest, request: Request):
        if isinstance(req.prompt, list):
            if len(req.prompt) != 1:
                raise ApiError(
                    400, "give one prompt per request (a list of one string is accepted)", "prompt"
                )
            req.prompt = req.prompt[0]
        prompt = await asyncio.to_thread(server.completion_prompt, req.prompt)
        max_new, sampling, stops = server.prepare(req, prompt, "prompt")
        eos = (server.tok.token_id(EOS),)
        gen = server.start(prompt, req.n, max_new, sampling, stops, eos, req.seed, req.logprobs)
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            return StreamingResponse(
                guarded(server, completion_stream(server, gen, req, rid, created, len(prompt))),
                media_type="text/event-stream",
            )
        texts, toks, reasons, used = await collect(gen, request)
        choices = [
            P.CompletionChoice(
                index=i,
                text=texts[i],
                finish_reason=reasons[i],
                logprobs=legacy_logprobs(server, toks[i], req.logprobs)
                if req.logprobs is not None
                else None,
            )
            for i in range(req.n)
        ]
        return P.Completion(
            id=rid,
            created=created,
            model=server.name,
            choices=choices,
            usage=usage(len(prompt), used),
        )

    @app.post("/v1/inspect/attention", response_model=P.AttentionResponse)
    async def inspect_attention(req: P.AttentionRequest):
        """Attention weights of one layer and head over a text (zerolm extension, for the web UI)."""
        nonlocal inspecting
        if (req.messages is None) == (req.prompt is None):
            raise ApiError(400, "give exactly one of 'messages' or 'prompt'", "messages")
        if inspecting >= server.limits.max_inspect:
            raise ApiError(
                503,
                f"{inspecting} inspector calls are running (limit {server.limits.max_inspect}); retry "
                "shortly",
                None,
                "server_busy",
                "server_error",
                {"Retry-After": str(server.limits.retry_after_s)},
            )
        inspecting += 1
        try:  # the whole call in a worker thread: tokenizing, the model pass and ~T*T numbers of JSON
            return Response(
                await asyncio.to_thread(attention_json, server, req), media_type="application/json"
            )
        finally:
            inspecting -= 1

    return Edge(app, server, api_key)


class _ClientGone(Exception):
    """A non-streaming request's client disconnected; its generation has been cancelled."""


async def collect(gen: Generation, request: Request):
    """gen.collect(), unless the client disconnects first: then its jobs are cancelled (slots freed)."""

    async def gone():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, watch = asyncio.ensure_future(gen.collect()), asyncio.ensure_future(gone())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (work, watch):
            t.cancel()  # cancelling collect() runs Generation.events()'s cleanup: the jobs are cancelled
        await asyncio.gather(work, watch, return_exceptions=True)
    if work.cancelled():
        raise _ClientGone
    return work.result()


async def guarded(server: Server, stream):
    """An SSE stream that ends with an OpenAI-style error event and [DONE] if generation fails."""
    try:
        async for chunk in stream:
            yield chunk
    except ApiError as e:
        server.http_errors += 1
        yield sse(
            P.ErrorResponse(
                error=P.ErrorDetail(message=e.message, type=e.kind, param=e.param, code=e.code)
            ).model_dump()
        )
        yield "data: [DONE]\n\n"


def attention_json(server: Server, req: P.AttentionRequest) -> bytes:
    """The inspector's answer as JSON bytes (run in a worker thread: row by row, so the GIL is shared)."""
    cfg = server.model.cfg
    if req.layer >= cfg.n_layers or req.head >= cfg.n_heads:
        raise ApiError(400, f"layer must be < {cfg.n_layers} and head < {cfg.n_heads}", "layer")
    if req.messages:
        ids = server.chat_prompt(
            [m.model_dump() for m in req.messages], generation=req.continuation is not None
        )
    else:
        ids = server.completion_prompt(req.prompt)
    offset, continuation = len(ids), req.continuation or []
    if offset + len(continuation) > server.window:
        raise ApiError(
            400,
            f"{offset + len(continuation)} tokens are over the model window of {server.window}",
            "messages" if req.messages else "prompt",
            "context_length_exceeded",
        )
    for j, b in enumerate(continuation):
        if (tid := server.token_ids.get(bytes(b))) is None:
            raise ApiError(
                400,
                f"continuation token {j} ({bytes(b)!r}) is no token of this model",
                "continuation",
            )
        ids.append(tid)
    w = (
        attention_weights(server.model, ids, req.layer)[req.head].double() * 1e5
    ).round() / 1e5  # (T, T), 5 places
    head = json.dumps(
        {
            "tokens": [server.token_str(i) for i in ids],
            "token_bytes": [list(server.tok.token_bytes[i]) for i in ids],
            "offset": offset,
            "layer": req.layer,
            "head": req.head,
            "n_layers": cfg.n_layers,
            "n_heads": cfg.n_heads,
        },
        ensure_ascii=False,
    )
    rows = ",".join(json.dumps(w[t].tolist()) for t in range(len(ids)))
    return f'{head[:-1]}, "weights": [{rows}]}}'.encode()


def usage(prompt_tokens: int, completion_tokens: int) -> P.Usage:
    return P.Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def legacy_logprobs(server: Server, toks, k: int) -> P.CompletionLogprobs:
    strs = [server.token_str(t.id) for t in toks]
    offsets, at = [], 0
    for s in strs:
        offsets.append(at)
        at += len(s)
    return P.CompletionLogprobs(
        tokens=strs,
        token_logprobs=[t.logprob for t in toks],
        top_logprobs=[{server.token_str(a): lp for a, lp in t.top} for t in toks] if k else None,
        text_offset=offsets,
    )


async def chat_stream(server: Server, gen: Generation, req, rid: str, created: int, n_prompt: int):
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": server.name}
    k = (req.top_logprobs or 0) if req.logprobs else None
    used = 0
    for i in range(req.n):
        yield sse(
            {
                **base,
                "choices": [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ],
            }
        )
    async for ev in gen.events():
        used += ev.generated
        lp = (
            {"content": [server.logprob_entry(t).model_dump() for t in ev.tokens]}
            if k is not None and ev.tokens
            else None
        )
        if ev.text or lp or ev.finish:
            yield sse(
                {
                    **base,
                    "choices": [
                        {
                            "index": ev.choice,
                            "delta": {"content": ev.text} if ev.text else {},
                            "logprobs": lp,
                            "finish_reason": ev.finish,
                        }
                    ],
                }
            )
    if req.stream_options and req.stream_options.include_usage:
        yield sse({**base, "choices": [], "usage": usage(n_prompt, used).model_dump()})
    yield "data: [DONE]\n\n"


async def completion_stream(
    server: Server, gen: Generation, req, rid: str, created: int, n_prompt: int
):
    base = {"id": rid, "object": "text_completion", "created": created, "model": server.name}
    used = 0
    async for ev in gen.events():
        used += ev.generated
        lp = (
            legacy_logprobs(server, ev.tokens, req.logprobs).model_dump()
            if req.logprobs is not None and ev.tokens
            else None
        )
        if ev.text or lp or ev.finish:
            yield sse(
                {
                    **base,
                    "choices": [
                        {
                            "index": ev.choice,
                            "text": ev.text,
                            "logprobs": lp,
                            "finish_reason": ev.finish,
                        }
                    ],
                }
            )
    if req.stream_options and req.stream_options.include_usage:
        yield sse({**base, "choices": [], "usage": usage(n_prompt, used).model_dump()})
    yield "data: [DONE]\n\n"


def serve(
    model_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch: int = 16,
    max_queue: int = 64,
    limits: Limits | None = None,
    log_level: str = "info",
    name: str | None = None,
    compile: bool = False,
) -> None:
    """Load the model and serve it until interrupted (`zerolm serve`); SIGTERM stops it within
    limits.shutdown_timeout_s, cancelling what still runs."""
    import uvicorn

    server = load_server(
        model_dir,
        max_batch=max_batch,
        max_queue=max_queue,
        limits=limits or Limits(),
        name=name,
        compile=compile,
    )
    config = uvicorn_config(
        create_app(server, api_key), server.limits, host=host, port=port, log_level=log_level
    )
    rate_limit_logs()  # after uvicorn's logging setup
    uvicorn.Server(config).run()
