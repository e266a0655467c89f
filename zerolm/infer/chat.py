"""Chat on top of the engine: messages in, assistant text out (the text edge of generation).

The prompt is the chat template's generation prompt (zerolm/tokenizer/chat.py); a reply ends at
the model's <|end|> (or <|eos|>), which is not part of the returned text.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator, Sequence
from functools import partial

from zerolm.infer.engine import Engine, GenerateRequest
from zerolm.infer.sampling import SamplingParams
from zerolm.tokenizer import END, EOS, Tokenizer
from zerolm.tokenizer.chat import prompt_ids
from zerolm.tokenizer.stream import StreamDecoder


def chat_request(
    tok: Tokenizer,
    max_new_tokens: int = 128,
    sampling: SamplingParams | None = None,
    seed: int | None = None,
    context: str = "truncate",
) -> GenerateRequest:
    return GenerateRequest(
        max_new_tokens=max_new_tokens,
        sampling=sampling or SamplingParams(),
        stop_token_ids=(tok.token_id(END), tok.token_id(EOS)),
        seed=seed,
        context=context,
    )


def replies(
    model, tok: Tokenizer, conversations: Sequence[Sequence[dict]], req: GenerateRequest
) -> list[str]:
    """One assistant reply per conversation, generated as one batch; max_new_tokens is lowered to
    the room the longest prompt leaves in the window (prompts are not cut to make room, unless
    one leaves none: then req.context decides)."""
    stops = set(req.stop_token_ids)
    prompts = [prompt_ids(tok, c) for c in conversations]
    room = model.cfg.max_seq_len - max(map(len, prompts))
    if 1 <= room < req.max_new_tokens:
        req = dataclasses.replace(req, max_new_tokens=room)
    elif (
        room < 1
    ):  # a prompt fills the window: req.context decides (truncate keeps its end), a quarter left to reply
        req = dataclasses.replace(
            req, max_new_tokens=max(1, min(req.max_new_tokens, model.cfg.max_seq_len // 4))
        )
    outs = Engine(model).generate(prompts, req)
    return [tok.decode([t for t in out if t not in stops]) for out in outs]


def stream_reply(
    engine: Engine, tok: Tokenizer, messages: Sequence[dict], req: GenerateRequest
) -> Iterator[str]:
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
    turns = messages[len(system) :]
    while len(turns) > 1 and len(prompt_ids(tok, system + turns)) > max_prompt_tokens:
        turns = turns[2:] if len(turns) > 2 and turns[1]["role"] == "assistant" else turns[1:]
    return system + turns


CHAT_HELP = """commands: /reset (forget the conversation), /system TEXT (set the system message; /system
alone clears it), /temperature X, /top_p X, /top_k N, /max_tokens N, /history, /help, /quit"""


def repl(
    model,
    tok: Tokenizer,
    sampling: SamplingParams,
    *,
    max_new_tokens: int = 96,
    system: str = "",
    seed: int | None = None,
    prompt: str | None = None,
    name: str = "model",
    compile: bool = False,
) -> None:
    """`zerolm chat`: read messages from stdin, stream replies to stdout, keep the conversation
    within the window; slash commands change the session (CHAT_HELP). prompt: answer once, exit."""
    engine = Engine(model, compile=compile)
    max_new = max(
        1, min(max_new_tokens, model.cfg.max_seq_len // 2)
    )  # at most half the window: room for the conversation
    sys_msgs = [{"role": "system", "content": system}] if system else []
    history: list[dict] = []

    def answer(text: str) -> None:
        nonlocal history
        sampling.validate()
        history = fit_history(
            tok,
            sys_msgs + history + [{"role": "user", "content": text}],
            model.cfg.max_seq_len - max_new,
        )[len(sys_msgs) :]
        reply = ""
        for piece in stream_reply(
            engine, tok, sys_msgs + history, chat_request(tok, max_new, sampling, seed)
        ):
            sys.stdout.write(piece)
            sys.stdout.flush()
            reply += piece
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": reply})

    if prompt is not None:
        return answer(prompt)
    say = partial(print, file=sys.stderr)
    say(
        f"zerolm chat: {name} ({model.cfg.preset}, window {model.cfg.max_seq_len} tokens). "
        "Type /help for commands, Ctrl-D to leave."
    )
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            return say()
        if not line.startswith("/"):
            if line:
                answer(line)
            continue
        cmd, _, arg = line.partition(" ")
        try:
            if cmd in ("/quit", "/exit"):
                return
            if cmd == "/reset":
                history = []
                say("(conversation cleared)")
            elif cmd == "/system":
                sys_msgs = [{"role": "system", "content": arg}] if arg else []
                say(f"(system message {'set' if arg else 'cleared'})")
            elif cmd in ("/temperature", "/top_p", "/top_k"):
                field, value = cmd[1:], (int if cmd == "/top_k" else float)(arg)
                new = dataclasses.replace(sampling, **{field: value})
                new.validate()  # a bad value is reported and the old one kept
                sampling = new
                say(f"({field} = {value})")
            elif cmd == "/max_tokens":
                max_new = max(1, min(int(arg), model.cfg.max_seq_len - 1))
                say(f"(max_tokens = {max_new})")
            elif cmd == "/history":
                for m in sys_msgs + history:
                    say(f"[{m['role']}] {m['content']}")
            else:
                say(CHAT_HELP)
        except ValueError as e:
            say(f"(error: {e})")
