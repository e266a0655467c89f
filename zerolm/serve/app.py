"""`zerolm serve`: the OpenAI-compatible HTTP API (FastAPI + SSE) and the web UI, over the
continuous-batching scheduler. This is the HTTP edge; the text work behind the endpoints
(limits, ids <-> text, stop strings) is zerolm/serve/server.py, and the scheduler sees ids only.

Every error is an OpenAI-style body {"error": {"message", "type", "param", "code"}} with a 4xx
status (5xx only for a server fault); no request can take the server down.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
import uuid
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from zerolm.inspect.attention import attention_weights
from zerolm.serve import protocol as P
from zerolm.serve.server import ApiError, Generation, Limits, Server, load_server, metrics_text
from zerolm.tokenizer import EOS
from zerolm.tokenizer.chat import prompt_ids, render

STATIC = Path(__file__).parent / "static"


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


def serve(model_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_batch: int = 16, max_queue: int = 64, limits: Limits | None = None, log_level: str = "info",
          name: str | None = None) -> None:
    """Load the model and serve it until interrupted (`zerolm serve`)."""
    import uvicorn

    server = load_server(model_dir, max_batch=max_batch, max_queue=max_queue, limits=limits or Limits(), name=name)
    uvicorn.run(create_app(server, api_key), host=host, port=port, log_level=log_level)
