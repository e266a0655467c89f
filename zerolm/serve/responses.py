"""The API's answers: OpenAI chat.completion and text_completion bodies, their SSE streams, and
logprobs entries, built from a request's Generation (zerolm/serve/generation.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from zerolm.serve import protocol as P
from zerolm.serve.errors import ApiError, ClientGone
from zerolm.serve.generation import Collected, Generation
from zerolm.serve.jobs import Token
from zerolm.serve.server import Server

DONE = "data: [DONE]\n\n"


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> P.Usage:
    return P.Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def _logprob(tok: Token) -> float:
    assert tok.logprob is not None, "a token of a job that asked for no logprobs"
    return tok.logprob


def logprob_entry(server: Server, tok: Token) -> P.TokenLogprob:
    """A chat logprobs entry: the token, its log-probability and bytes, and its alternatives."""
    token_bytes = server.tok.token_bytes
    return P.TokenLogprob(
        token=server.token_str(tok.id),
        logprob=_logprob(tok),
        bytes=list(token_bytes[tok.id]),
        top_logprobs=[
            P.TopLogprob(token=server.token_str(t), logprob=lp, bytes=list(token_bytes[t]))
            for t, lp in tok.top
        ],
    )


def legacy_logprobs(server: Server, toks: list[Token], k: int) -> P.CompletionLogprobs:
    """The completions API's logprobs: tokens, their log-probabilities, top k, text offsets."""
    strs = [server.token_str(t.id) for t in toks]
    offsets, at = [], 0
    for s in strs:
        offsets.append(at)
        at += len(s)
    return P.CompletionLogprobs(
        tokens=strs,
        token_logprobs=[_logprob(t) for t in toks],
        top_logprobs=[{server.token_str(a): lp for a, lp in t.top} for t in toks] if k else None,
        text_offset=offsets,
    )


async def collect(gen: Generation, request: Request) -> Collected:
    """gen.collect(), unless the client disconnects first: then its jobs are cancelled (slots
    freed) and ClientGone is raised."""

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, watch = asyncio.ensure_future(gen.collect()), asyncio.ensure_future(gone())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (work, watch):
            t.cancel()  # cancelling collect() runs Generation.events()'s cleanup: jobs cancelled
        await asyncio.gather(work, watch, return_exceptions=True)
    if work.cancelled():
        raise ClientGone
    return work.result()


async def guarded(server: Server, stream: AsyncIterator[str]) -> AsyncIterator[str]:
    """An SSE stream that ends with an OpenAI-style error event and [DONE] if generation fails."""
    try:
        async for chunk in stream:
            yield chunk
    except ApiError as e:
        server.http_errors += 1
        detail = P.ErrorDetail(message=e.message, type=e.kind, param=e.param, code=e.code)
        yield sse(P.ErrorResponse(error=detail).model_dump())
        yield DONE


def chat_completion(
    server: Server,
    req: P.ChatCompletionRequest,
    rid: str,
    created: int,
    n_prompt: int,
    result: Collected,
) -> P.ChatCompletion:
    texts, toks, reasons, used = result
    choices = [
        P.ChatChoice(
            index=i,
            message=P.AssistantMessage(content=texts[i]),
            finish_reason=reasons[i],
            logprobs=P.ChoiceLogprobs(content=[logprob_entry(server, t) for t in toks[i]])
            if req.logprobs
            else None,
        )
        for i in range(req.n)
    ]
    return P.ChatCompletion(
        id=rid, created=created, model=server.name, choices=choices, usage=usage(n_prompt, used)
    )


def completion(
    server: Server,
    req: P.CompletionRequest,
    rid: str,
    created: int,
    n_prompt: int,
    result: Collected,
) -> P.Completion:
    texts, toks, reasons, used = result
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
        id=rid, created=created, model=server.name, choices=choices, usage=usage(n_prompt, used)
    )


def _chunk(base: dict, choice: dict) -> str:
    return sse({**base, "choices": [choice]})


async def chat_stream(
    server: Server,
    gen: Generation,
    req: P.ChatCompletionRequest,
    rid: str,
    created: int,
    n_prompt: int,
) -> AsyncIterator[str]:
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": server.name}
    used = 0
    for i in range(req.n):
        role = {"role": "assistant", "content": ""}
        yield _chunk(base, {"index": i, "delta": role, "logprobs": None, "finish_reason": None})
    async for ev in gen.events():
        used += ev.generated
        lp = (
            {"content": [logprob_entry(server, t).model_dump() for t in ev.tokens]}
            if req.logprobs and ev.tokens
            else None
        )
        if ev.text or lp or ev.finish:
            delta = {"content": ev.text} if ev.text else {}
            choice = {"index": ev.choice, "delta": delta, "logprobs": lp}
            yield _chunk(base, {**choice, "finish_reason": ev.finish})
    if req.stream_options and req.stream_options.include_usage:
        yield sse({**base, "choices": [], "usage": usage(n_prompt, used).model_dump()})
    yield DONE


async def completion_stream(
    server: Server, gen: Generation, req: P.CompletionRequest, rid: str, created: int, n_prompt: int
) -> AsyncIterator[str]:
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
            choice = {"index": ev.choice, "text": ev.text, "logprobs": lp}
            yield _chunk(base, {**choice, "finish_reason": ev.finish})
    if req.stream_options and req.stream_options.include_usage:
        yield sse({**base, "choices": [], "usage": usage(n_prompt, used).model_dump()})
    yield DONE
