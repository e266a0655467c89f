"""Chat on top of the engine: messages in, assistant text out (the text edge of generation).

The prompt is the chat template's generation prompt (zerolm/tokenizer/chat.py); a reply ends at
the model's <|end|> (or <|eos|>), which is not part of the returned text.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

from zerolm.infer.engine import Engine, GenerateRequest
from zerolm.infer.sampling import SamplingParams
from zerolm.tokenizer import END, EOS, Tokenizer
from zerolm.tokenizer.chat import prompt_ids
from zerolm.tokenizer.stream import StreamDecoder


def chat_request(tok: Tokenizer, max_new_tokens: int = 128, sampling: SamplingParams | None = None,
                 seed: int | None = None, context: str = "truncate") -> GenerateRequest:
    return GenerateRequest(max_new_tokens=max_new_tokens, sampling=sampling or SamplingParams(),
                           stop_token_ids=(tok.token_id(END), tok.token_id(EOS)), seed=seed, context=context)


def fit_max_new(model, max_new_tokens: int) -> int:
    """max_new_tokens clipped so that a prompt still has room in the model window."""
    return max(1, min(max_new_tokens, model.cfg.max_seq_len // 2))


def replies(model, tok: Tokenizer, conversations: Sequence[Sequence[dict]], req: GenerateRequest) -> list[str]:
    """One assistant reply per conversation, generated as one batch; max_new_tokens is lowered to
    the room the longest prompt leaves in the window (prompts are never cut to make room)."""
    stops = set(req.stop_token_ids)
    prompts = [prompt_ids(tok, c) for c in conversations]
    room = model.cfg.max_seq_len - max(map(len, prompts))
    if 1 <= room < req.max_new_tokens:
        req = dataclasses.replace(req, max_new_tokens=room)
    outs = Engine(model).generate(prompts, req)
    return [tok.decode([t for t in out if t not in stops]) for out in outs]


def stream_reply(engine: Engine, tok: Tokenizer, messages: Sequence[dict], req: GenerateRequest) -> Iterator[str]:
    """Text pieces of one reply as they are generated (whole characters only)."""
    stops = set(req.stop_token_ids)
    dec = StreamDecoder(tok, skip_ids=tuple(stops))
    for step in engine.stream([prompt_ids(tok, messages)], req):
        if step[0] in stops:
            break
        if piece := dec.push(step[0]):
            yield piece
    if tail := dec.flush():
        yield tail


def fit_history(tok: Tokenizer, messages: list[dict], max_prompt_tokens: int) -> list[dict]:
    """Drop the oldest turns (never a leading system message) until the generation prompt fits in
    max_prompt_tokens; the newest user message always stays (the engine cuts it if it alone is
    too long)."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    while len(turns) > 1 and len(prompt_ids(tok, system + turns)) > max_prompt_tokens:
        turns = turns[2:] if len(turns) > 2 and turns[1]["role"] == "assistant" else turns[1:]
    return system + turns
