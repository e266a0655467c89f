"""The API's endpoints: the web UI, /health, /metrics and the OpenAI ones (/v1/models,
/v1/chat/completions, /v1/completions). Each checks and queues its request through the Server
(zerolm/serve/server.py) and answers with zerolm/serve/responses.py."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse

from zerolm.serve import protocol as P
from zerolm.serve.errors import ApiError
from zerolm.serve.metrics import metrics_text
from zerolm.serve.responses import (
    chat_completion,
    chat_stream,
    collect,
    completion,
    completion_stream,
    guarded,
)
from zerolm.serve.server import Server

STATIC = Path(__file__).parent / "static"


def current_server(request: Request) -> Server:
    """The Server the app serves (create_app keeps it in app.state)."""
    return request.app.state.server


ServerDep = Annotated[Server, Depends(current_server)]
router = APIRouter()


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html")


@router.get(
    "/health",
    responses={
        503: {"description": "the model is unhealthy (e.g. non-finite logits); the body says why"}
    },
)
async def health(server: ServerDep) -> JSONResponse:
    state = server.scheduler.health()
    body = {
        "status": "ok" if state["ok"] else "unhealthy",
        "model": server.name,
        "reason": state.get("reason"),
        **server.scheduler.load(),
    }
    return JSONResponse(body, status_code=200 if state["ok"] else 503)


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(server: ServerDep):  # no return annotation: it would become a response model
    return metrics_text(server)


@router.get("/v1/models", response_model=P.ModelList)
async def models(server: ServerDep) -> P.ModelList:
    tok = server.tok
    card = P.ModelCard(
        id=server.name,
        created=server.created,
        max_model_len=server.window,
        special_tokens=tok.special_tokens(),
        stop_tokens=[tok.token_str(i) for i in server.chat_stops],
        chat_template="zerolm" if tok.layout == "zerolm" else "model" if tok.template else None,
    )
    return P.ModelList(data=[card])


def _streamed(description: str) -> dict:
    """The 200 answer of an endpoint that streams with stream=true."""
    return {200: {"content": {"text/event-stream": {}}, "description": description}}


@router.post(
    "/v1/chat/completions",
    response_model=P.ChatCompletion,
    responses=_streamed(
        "a chat.completion, or with stream=true a stream of chat.completion.chunk events ending "
        "with data: [DONE]"
    ),
)
async def chat(req: P.ChatCompletionRequest, request: Request, server: ServerDep):
    prompt = await asyncio.to_thread(server.chat_prompt, [m.model_dump() for m in req.messages])
    max_new, sampling, stops = server.prepare(req, prompt, "messages")
    k = (req.top_logprobs or 0) if req.logprobs else None
    gen = server.start(prompt, req.n, max_new, sampling, stops, server.chat_stops, req.seed, k)
    rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    if req.stream:
        events = chat_stream(server, gen, req, rid, created, len(prompt))
        return StreamingResponse(guarded(server, events), media_type="text/event-stream")
    result = await collect(gen, request)
    return chat_completion(server, req, rid, created, len(prompt), result)


@router.post(
    "/v1/completions",
    response_model=P.Completion,
    responses=_streamed(
        "a text_completion, or with stream=true a stream of them ending with data: [DONE]"
    ),
)
async def completions(req: P.CompletionRequest, request: Request, server: ServerDep):
    if isinstance(req.prompt, list):
        if len(req.prompt) != 1:
            raise ApiError(
                400, "give one prompt per request (a list of one string is accepted)", "prompt"
            )
        req.prompt = req.prompt[0]
    prompt = await asyncio.to_thread(server.completion_prompt, req.prompt)
    max_new, sampling, stops = server.prepare(req, prompt, "prompt")
    eos = server.tok.eos_ids
    gen = server.start(prompt, req.n, max_new, sampling, stops, eos, req.seed, req.logprobs)
    rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    if req.stream:
        events = completion_stream(server, gen, req, rid, created, len(prompt))
        return StreamingResponse(guarded(server, events), media_type="text/event-stream")
    result = await collect(gen, request)
    return completion(server, req, rid, created, len(prompt), result)
