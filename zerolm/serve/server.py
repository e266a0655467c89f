"""The text side of serving: requests become token ids, the scheduler's tokens become text.

`Server` holds the model, tokenizer, scheduler and limits, and does the endpoints' work: prompts
to ids (checked against the limits, zerolm/serve/limits.py) and n choices queued as one
Generation (zerolm/serve/generation.py). No HTTP here: zerolm/serve/app.py is the HTTP edge.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from zerolm.infer.sampling import SamplingParams
from zerolm.model import load_model
from zerolm.model.protocol import LanguageModel
from zerolm.serve import protocol as P
from zerolm.serve.errors import ApiError
from zerolm.serve.generation import Generation, Relay
from zerolm.serve.jobs import Job, QueueFull
from zerolm.serve.limits import (
    DEFAULT_LIMITS,
    Limits,
    check_choices,
    check_seed,
    check_text,
    max_new_tokens,
    sampling_params,
)
from zerolm.serve.scheduler import Scheduler
from zerolm.tokenizer import Tokenizer
from zerolm.tokenizer.chat import conversation_ids
from zerolm.transforms.layout import decode_layout


class Server:
    """Holds the model, tokenizer, scheduler and limits; its methods are the endpoints' work."""

    def __init__(
        self,
        model: LanguageModel,
        tok: Tokenizer,
        name: str,
        *,
        max_batch: int = 16,
        max_queue: int = 64,
        limits: Limits = DEFAULT_LIMITS,
        compile: bool = False,
        mirror=None,
    ):
        self.model, self.tok, self.name, self.limits = model, tok, name, limits
        self.window = model.cfg.max_seq_len
        if limits.max_prompt_tokens is not None and not 1 <= limits.max_prompt_tokens < self.window:
            raise ValueError(
                f"--max-prompt-tokens {limits.max_prompt_tokens} must be in "
                f"1..{self.window - 1}: the model window is {self.window} tokens and a reply needs "
                "at least one"
            )
        # a text of more bytes than this cannot fit in max_prompt tokens (each token spells at most
        # `longest` bytes; a normalizer may shrink text, hence the slack): refused before tokenizing
        longest = max(len(b) for b in tok.token_bytes)
        slack = 1 if tok.hf.normalizer is None else 4
        self.max_text_bytes = (limits.max_prompt_tokens or self.window - 1) * longest * slack
        self.scheduler = Scheduler(
            model, max_batch=max_batch, max_queue=max_queue, compile=compile, mirror=mirror
        )
        self.created = int(time.time())
        self.chat_stops = tok.stop_ids
        # bytes -> id (the inspector's input)
        self.token_ids = {b: i for i, b in enumerate(tok.token_bytes) if b}
        self.http_errors = 0
        self.inspecting = 0  # inspector calls running (at most limits.max_inspect)
        self._relay: Relay | None = None

    def relay(self) -> Relay:
        loop = asyncio.get_running_loop()
        if self._relay is None or self._relay.loop is not loop:
            self._relay = Relay(loop)
        return self._relay

    # -- text <-> tokens ---------------------------------------------------------------------
    def token_str(self, i: int) -> str:
        return self.tok.token_str(i)

    def prepare(
        self, req: P.SamplingRequest, prompt: list[int], param: str
    ) -> tuple[int, SamplingParams, list[str]]:
        """Check limits; return (max_new_tokens, sampling, stop strings) or raise ApiError."""
        stops = check_choices(req, self.limits, self.name)
        max_new = max_new_tokens(req, len(prompt), self.limits, self.window, param)
        check_seed(req)
        return max_new, sampling_params(req), stops

    def completion_prompt(self, text: str) -> list[int]:
        """Ids of a completion prompt (call it off the event loop: tokenizing takes time)."""
        if not text:
            raise ApiError(400, "prompt must not be empty", "prompt")
        check_text([text], "prompt", self.max_text_bytes)
        # encode_batch releases the GIL (encode does not), so other streams run meanwhile; the
        # ids a document starts with come first
        return self.tok.completion_ids([text])[0]

    def chat_prompt(self, messages: list[dict], generation: bool = True) -> list[int]:
        """Ids of a conversation (+ the assistant turn's start), ApiError for a bad one (call it
        off the event loop)."""
        if len(messages) > self.limits.max_messages:
            raise ApiError(
                400,
                f"{len(messages)} messages; this server takes at most {self.limits.max_messages}",
                "messages",
            )
        check_text([m["content"] for m in messages], "messages", self.max_text_bytes)
        try:
            return conversation_ids(self.tok, messages, add_generation_prompt=generation)
        except ValueError as e:
            raise ApiError(400, str(e), "messages") from e

    # -- generation ---------------------------------------------------------------------------
    def start(
        self,
        prompt: list[int],
        n: int,
        max_new: int,
        sampling: SamplingParams,
        stops: list[str],
        stop_ids: tuple[int, ...],
        seed: int | None,
        logprobs: int | None,
    ) -> Generation:
        """Queue n choices now (a full queue is a 503 before any response starts)."""
        gen = Generation(self, n, stops, stop_ids)
        jobs = [
            Job(
                prompt=prompt,
                max_new_tokens=max_new,
                sampling=sampling,
                stop_token_ids=stop_ids,
                seed=None if seed is None else seed + i,
                logprobs=logprobs,
                emit=gen.emitter(i),
            )
            for i in range(n)
        ]
        try:
            self.scheduler.submit(jobs)
        except QueueFull as e:
            raise ApiError(
                503,
                f"server busy ({e}); retry shortly",
                None,
                "server_busy",
                "server_error",
                {"Retry-After": str(self.limits.retry_after_s)},
            ) from e
        except ValueError as e:  # parameters the scheduler refuses are the request's fault
            raise ApiError(400, str(e), None, "invalid_value") from e
        gen.jobs = list(jobs)
        return gen


def load_server(
    model_dir: str | Path,
    *,
    max_batch: int = 16,
    max_queue: int = 64,
    limits: Limits = DEFAULT_LIMITS,
    name: str | None = None,
    compile: bool = False,
    model: LanguageModel | None = None,
    mirror=None,
) -> Server:
    """The Server of a model directory (`zerolm serve`), its model in the decode layout; or
    `model`, this rank's shard of a tensor-parallel one, with its `mirror` (serve/tp.py)."""
    model = model or decode_layout(load_model(model_dir))
    path = Path(model_dir).resolve()
    # runs/x/sft/model -> "sft"
    name = name or (path.parent.name if path.name == "model" else path.name)
    return Server(
        model,
        Tokenizer.load(model_dir),
        name,
        max_batch=max_batch,
        max_queue=max_queue,
        limits=limits,
        compile=compile,
        mirror=mirror,
    )
