"""Chat on top of the engine: messages in, assistant text out (the text edge of generation).

The prompt is the chat template's generation prompt (zerolm/tokenizer/chat.py): zerolm's own, or
an imported model's Jinja template; a reply ends at the tokenizer's stop ids (the template's end
of turn, every eos), which are not part of the returned text.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

from zerolm.infer.engine import Engine, GenerateRequest
from zerolm.infer.sampling import SamplingParams
from zerolm.model.protocol import LanguageModel
from zerolm.tokenizer import Tokenizer
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
        stop_token_ids=tok.stop_ids,
        seed=seed,
        context=context,
    )


def replies(
    model: LanguageModel,
    tok: Tokenizer,
    conversations: Sequence[Sequence[dict]],
    req: GenerateRequest,
) -> list[str]:
    """One assistant reply per conversation, generated as one batch; max_new_tokens is lowered to
    the room the longest prompt leaves in the window (prompts are not cut to make room, unless
    one leaves none: then req.context decides)."""
    stops = set(req.stop_token_ids)
    prompts = [prompt_ids(tok, c) for c in conversations]
    room = model.cfg.max_seq_len - max(map(len, prompts))
    if 1 <= room < req.max_new_tokens:
        req = dataclasses.replace(req, max_new_tokens=room)
    elif room < 1:  # a prompt fills the window: req.context decides (truncate keeps its end)
        # and a quarter of the window is left to reply
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


CHAT_HELP = (
    "commands: /reset (forget the conversation), /system TEXT (set the system message; /system\n"
    "alone clears it), /temperature X, /top_p X, /top_k N, /max_tokens N, /history, /help, /quit"
)


class ChatSession:
    """One `zerolm chat` conversation: the settings the slash commands change, the system
    message and the history, kept within the model's window."""

    def __init__(
        self,
        engine: Engine,
        tok: Tokenizer,
        sampling: SamplingParams,
        max_new_tokens: int,
        system: str,
        seed: int | None,
        show_prompt: bool = False,
    ):
        self.engine, self.tok, self.sampling, self.seed = engine, tok, sampling, seed
        self.show_prompt = show_prompt
        self.window = engine.model.cfg.max_seq_len
        # at most half the window: room for the conversation
        self.max_new = max(1, min(max_new_tokens, self.window // 2))
        self.sys_msgs = [{"role": "system", "content": system}] if system else []
        self.history: list[dict] = []

    def answer(self, text: str) -> None:
        """Stream the reply to `text` to stdout and keep both turns."""
        self.sampling.validate()
        history = self.history + [{"role": "user", "content": text}]
        kept = fit_history(self.tok, self.sys_msgs + history, self.window - self.max_new)
        self.history = kept[len(self.sys_msgs) :]
        req = chat_request(self.tok, self.max_new, self.sampling, self.seed)
        if self.show_prompt:
            ids = prompt_ids(self.tok, self.sys_msgs + self.history)
            text = json.dumps(self.tok.decode(ids), ensure_ascii=False)
            print(f"prompt ({len(ids)} tokens): {text}", file=sys.stderr)
        reply = ""
        for piece in stream_reply(self.engine, self.tok, self.sys_msgs + self.history, req):
            sys.stdout.write(piece)
            sys.stdout.flush()
            reply += piece
        sys.stdout.write("\n")
        self.history.append({"role": "assistant", "content": reply})

    def command(self, cmd: str, arg: str, say: Callable[..., None]) -> None:
        """Run a slash command other than /quit (CHAT_HELP); a bad value raises ValueError."""
        if cmd == "/reset":
            self.history = []
            say("(conversation cleared)")
        elif cmd == "/system":
            self.sys_msgs = [{"role": "system", "content": arg}] if arg else []
            say(f"(system message {'set' if arg else 'cleared'})")
        elif cmd in ("/temperature", "/top_p", "/top_k"):
            field, value = cmd[1:], (int if cmd == "/top_k" else float)(arg)
            change: dict[str, Any] = {field: value}
            new = dataclasses.replace(self.sampling, **change)
            new.validate()  # a bad value is reported and the old one kept
            self.sampling = new
            say(f"({field} = {value})")
        elif cmd == "/max_tokens":
            self.max_new = max(1, min(int(arg), self.window - 1))
            say(f"(max_tokens = {self.max_new})")
        elif cmd == "/history":
            for m in self.sys_msgs + self.history:
                say(f"[{m['role']}] {m['content']}")
        else:
            say(CHAT_HELP)


def repl(
    model: LanguageModel,
    tok: Tokenizer,
    sampling: SamplingParams,
    *,
    max_new_tokens: int = 96,
    system: str = "",
    seed: int | None = None,
    prompt: str | None = None,
    name: str = "model",
    compile: bool = False,
    show_prompt: bool = False,
) -> None:
    """`zerolm chat`: read messages from stdin, stream replies to stdout, keep the conversation
    within the window; slash commands change the session (CHAT_HELP). prompt: answer once, exit."""
    engine = Engine(model, compile=compile)
    session = ChatSession(engine, tok, sampling, max_new_tokens, system, seed, show_prompt)
    if prompt is not None:
        return session.answer(prompt)
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
                session.answer(line)
            continue
        cmd, _, arg = line.partition(" ")
        if cmd in ("/quit", "/exit"):
            return
        try:
            session.command(cmd, arg, say)
        except ValueError as e:
            say(f"(error: {e})")
