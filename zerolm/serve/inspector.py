"""POST /v1/inspect/attention (a zerolm extension, for the web UI): one layer's and head's
attention weights over a conversation or prompt, optionally followed by generated tokens."""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter
from fastapi.responses import Response

from zerolm.inspect.attention import attention_weights
from zerolm.serve import protocol as P
from zerolm.serve.errors import ApiError
from zerolm.serve.routes import ServerDep
from zerolm.serve.server import Server

router = APIRouter()


@router.post("/v1/inspect/attention", response_model=P.AttentionResponse)
async def inspect_attention(req: P.AttentionRequest, server: ServerDep):
    """Attention weights of one layer and head over a text (zerolm extension, for the web UI)."""
    if (req.messages is None) == (req.prompt is None):
        raise ApiError(400, "give exactly one of 'messages' or 'prompt'", "messages")
    if server.scheduler.mirror is not None:
        raise ApiError(
            400,
            "the attention inspector is not available on a tensor-parallel server (serve --tp): "
            "its heads are split over the ranks; serve the model in one process to inspect it",
            None,
            "tensor_parallel",
        )
    lim = server.limits
    if server.inspecting >= lim.max_inspect:
        raise ApiError(
            503,
            f"{server.inspecting} inspector calls are running (limit {lim.max_inspect}); retry "
            "shortly",
            None,
            "server_busy",
            "server_error",
            {"Retry-After": str(lim.retry_after_s)},
        )
    server.inspecting += 1
    try:  # the whole call in a worker thread: tokenizing, the model pass and ~T*T numbers of JSON
        body = await asyncio.to_thread(attention_json, server, req)
        return Response(body, media_type="application/json")
    finally:
        server.inspecting -= 1


def _context(server: Server, req: P.AttentionRequest) -> tuple[list[int], int]:
    """The token ids the inspector looks at, and the index of the first continuation token."""
    if req.messages:
        messages = [m.model_dump() for m in req.messages]
        ids = server.chat_prompt(messages, generation=req.continuation is not None)
    else:
        ids = server.completion_prompt(req.prompt or "")  # "" (no prompt): refused as empty
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
    return ids, offset


def attention_json(server: Server, req: P.AttentionRequest) -> bytes:
    """The inspector's answer as JSON bytes (run in a worker thread: row by row, so the GIL is
    shared)."""
    cfg = server.model.cfg
    if req.layer >= cfg.n_layers or req.head >= cfg.n_heads:
        raise ApiError(400, f"layer must be < {cfg.n_layers} and head < {cfg.n_heads}", "layer")
    ids, offset = _context(server, req)
    weights = attention_weights(server.model, ids, req.layer)[req.head]  # (T, T)
    w = (weights.double() * 1e5).round() / 1e5  # 5 places
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
