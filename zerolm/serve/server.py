"""The text side of serving: requests become token ids, the scheduler's tokens become text.

`Server` holds the model, tokenizer, scheduler and limits and checks a request against them;
`Generation` turns one request's scheduler events into text deltas (whole characters, stop
strings cut, n choices multiplexed), and `Relay` carries events from the scheduler thread to the
event loop. No HTTP here: zerolm/serve/app.py is the HTTP edge.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from zerolm.infer.sampling import SamplingParams
from zerolm.infer.stop import StopStrings
from zerolm.serve import protocol as P
from zerolm.serve.jobs import TTFT_BUCKETS, Job, QueueFull
from zerolm.serve.scheduler import Scheduler
from zerolm.tokenizer import END, EOS, SPECIAL_TOKENS, Tokenizer
from zerolm.tokenizer.chat import prompt_ids, render
from zerolm.tokenizer.stream import StreamDecoder


@dataclass(frozen=True)
class Limits:
    max_tokens: int = (
        512  # per choice; also the default when a request gives none (capped by the window)
    )
    max_n: int = 8
    max_messages: int = 256
    max_stop: int = 4
    max_prompt_tokens: int | None = None  # None: the model window - 1
    max_body_bytes: int = 1 << 20
    retry_after_s: int = 1
    max_inspect: int = 2  # inspector calls at once (503 + Retry-After above)
    # the HTTP edge (zerolm/serve/edge.py): a slow or idle client is closed, never waited for
    header_timeout_s: float = (
        10.0  # a request head must arrive whole within this (else the socket closes)
    )
    body_timeout_s: float = 30.0  # a body must arrive whole within this (else 408)
    keep_alive_s: int = 5  # an idle keep-alive connection closes after this
    shutdown_timeout_s: int = 10  # on SIGTERM, requests still running after this are cancelled
    max_connections: int = (
        512  # open sockets at most (lowered to fit RLIMIT_NOFILE); the oldest idle one goes
    )


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind, self.headers = (
            status,
            message,
            param,
            code,
            kind,
            headers,
        )


class Relay:
    """Scheduler thread -> event loop. Events are queued and the loop is woken at most once per
    burst of them (one self-pipe write per decode step, not one per token)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.items, self.armed, self.lock = (
            loop,
            collections.deque(),
            False,
            threading.Lock(),
        )

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

    def __init__(
        self,
        model,
        tok: Tokenizer,
        name: str,
        *,
        max_batch: int = 16,
        max_queue: int = 64,
        limits: Limits = Limits(),
        compile: bool = False,
    ):
        self.model, self.tok, self.name, self.limits = model, tok, name, limits
        self.window = model.cfg.max_seq_len
        if limits.max_prompt_tokens is not None and not 1 <= limits.max_prompt_tokens < self.window:
            raise ValueError(
                f"--max-prompt-tokens {limits.max_prompt_tokens} must be in 1..{self.window - 1}: the "
                f"model window is {self.window} tokens and a reply needs at least one"
            )
        # a text of more bytes than this cannot fit in max_prompt tokens (each token spells at most
        # `longest` bytes; a normalizer may shrink text, hence the slack): refused before tokenizing
        longest = max(len(b) for b in tok.token_bytes)
        slack = 1 if tok.hf.normalizer is None else 4
        self.max_text_bytes = (limits.max_prompt_tokens or self.window - 1) * longest * slack
        self.scheduler = Scheduler(model, max_batch=max_batch, max_queue=max_queue, compile=compile)
        self.created = int(time.time())
        self.chat_stops = (tok.token_id(END), tok.token_id(EOS))
        self.token_ids = {
            b: i for i, b in enumerate(tok.token_bytes) if b
        }  # bytes -> id (the inspector's input)
        self.http_errors = 0
        self._relay: Relay | None = None

    def relay(self) -> Relay:
        loop = asyncio.get_running_loop()
        if self._relay is None or self._relay.loop is not loop:
            self._relay = Relay(loop)
        return self._relay

    # -- text <-> tokens ---------------------------------------------------------------------
    def token_str(self, i: int) -> str:
        return (
            SPECIAL_TOKENS[i]
            if i < len(SPECIAL_TOKENS)
            else self.tok.token_bytes[i].decode("utf-8", "backslashreplace")
        )

    def prepare(
        self, req: P.SamplingRequest, prompt: list[int], param: str
    ) -> tuple[int, SamplingParams, list[str]]:
        """Check limits; return (max_new_tokens, sampling, stop strings) or raise ApiError."""
        lim = self.limits
        if req.model is not None and req.model != self.name:
            raise ApiError(
                400,
                f"model {req.model!r} is not served here; this server serves {self.name!r} (or omit "
                "model)",
                "model",
                "model_not_found",
            )
        if req.n > lim.max_n:
            raise ApiError(400, f"n={req.n} is over this server's limit of {lim.max_n}", "n")
        stops = req.stops()
        if len(stops) > lim.max_stop or any(not s for s in stops):
            raise ApiError(400, f"stop takes up to {lim.max_stop} non-empty strings", "stop")
        max_prompt = lim.max_prompt_tokens or self.window - 1
        if len(prompt) > max_prompt:
            raise ApiError(
                400,
                f"the prompt is {len(prompt)} tokens; this server takes at most {max_prompt} "
                f"(model window {self.window}): shorten it",
                param,
                "context_length_exceeded",
            )
        asked = getattr(req, "max_completion_tokens", None) or req.max_tokens
        if asked is not None and asked > lim.max_tokens:
            raise ApiError(
                400,
                f"max_tokens={asked} is over this server's limit of {lim.max_tokens}",
                "max_tokens",
            )
        room = self.window - len(prompt)
        if asked is not None and asked > room:
            raise ApiError(
                400,
                f"the prompt ({len(prompt)} tokens) + max_tokens={asked} exceed the model window of "
                f"{self.window} tokens: lower max_tokens to {room} or shorten the prompt",
                "max_tokens",
                "context_length_exceeded",
            )
        max_new = asked or min(room, lim.max_tokens)
        if req.seed is not None and req.seed + req.n > 1 << 64:  # choice i draws with seed + i
            raise ApiError(
                400,
                f"seed + n - 1 must be below 2**64 (choice i uses seed + i); got seed={req.seed}, "
                f"n={req.n}",
                "seed",
                "invalid_value",
            )
        sampling = SamplingParams(
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            min_p=req.min_p,
            repetition_penalty=req.repetition_penalty,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
        )
        return max_new, sampling, stops

    def check_text(self, texts: list[str], param: str) -> None:
        """Refuse text that is not UTF-8 (a lone surrogate) or too long to fit, before tokenizing it."""
        size = 0
        for t in texts:
            try:
                size += len(t.encode("utf-8"))
            except UnicodeEncodeError as e:
                raise ApiError(
                    400,
                    f"{param} is not valid UTF-8 text ({e.reason} at character {e.start}): send "
                    "whole characters, no lone surrogates",
                    param,
                    "invalid_value",
                ) from e
        if size > self.max_text_bytes:
            raise ApiError(
                400,
                f"{param} is {size} bytes, more than the {self.max_text_bytes} that could fit in this "
                f"server's prompt limit: shorten it",
                param,
                "context_length_exceeded",
            )

    def completion_prompt(self, text: str) -> list[int]:
        """Ids of a completion prompt (call it off the event loop: tokenizing takes time)."""
        if not text:
            raise ApiError(400, "prompt must not be empty", "prompt")
        self.check_text([text], "prompt")
        # encode_batch releases the GIL (encode does not), so other streams run meanwhile
        return [
            self.tok.token_id(EOS),
            *self.tok.encode_batch([text])[0],
        ]  # eos first: a new document starts

    def chat_prompt(self, messages: list[dict], generation: bool = True) -> list[int]:
        """Ids of a conversation (+ the assistant turn's start), ApiError for a bad one (off the loop)."""
        if len(messages) > self.limits.max_messages:
            raise ApiError(
                400,
                f"{len(messages)} messages; this server takes at most {self.limits.max_messages}",
                "messages",
            )
        self.check_text([m["content"] for m in messages], "messages")
        try:
            return prompt_ids(self.tok, messages) if generation else render(self.tok, messages)[0]
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
        gen.jobs = jobs
        return gen

    def logprob_entry(self, tok) -> P.TokenLogprob:
        return P.TokenLogprob(
            token=self.token_str(tok.id),
            logprob=tok.logprob,
            bytes=list(self.tok.token_bytes[tok.id]),
            top_logprobs=[
                P.TopLogprob(
                    token=self.token_str(t), logprob=lp, bytes=list(self.tok.token_bytes[t])
                )
                for t, lp in tok.top
            ],
        )


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
                        ev.text += (
                            self.cutters[i].feed(self.decoders[i].flush())[0]
                            + self.cutters[i].flush()
                        )
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


def metrics_text(server: Server) -> str:
    """Prometheus text format (version 0.0.4)."""
    st, load = server.scheduler.stats, server.scheduler.load()
    lines = [
        "# HELP zerolm_requests_total Generation requests accepted.",
        "# TYPE zerolm_requests_total counter",
        f"zerolm_requests_total {st.requests}",
        "# HELP zerolm_request_errors_total Requests answered with an error status.",
        "# TYPE zerolm_request_errors_total counter",
        f"zerolm_request_errors_total {server.http_errors}",
        "# HELP zerolm_generated_tokens_total Tokens generated.",
        "# TYPE zerolm_generated_tokens_total counter",
        f"zerolm_generated_tokens_total {st.tokens}",
        "# HELP zerolm_queue_depth Sequences waiting for a slot.",
        "# TYPE zerolm_queue_depth gauge",
        f"zerolm_queue_depth {load['waiting']}",
        "# HELP zerolm_running_sequences Sequences in the decode batch.",
        "# TYPE zerolm_running_sequences gauge",
        f"zerolm_running_sequences {load['running']}",
        "# HELP zerolm_tokens_per_second Generated tokens per second over the last 10 s.",
        "# TYPE zerolm_tokens_per_second gauge",
        f"zerolm_tokens_per_second {server.scheduler.tokens_per_second():.3f}",
        "# HELP zerolm_time_to_first_token_seconds From submission to the first generated token.",
        "# TYPE zerolm_time_to_first_token_seconds histogram",
    ]
    for b in TTFT_BUCKETS:
        le = "+Inf" if b == float("inf") else f"{b:g}"
        lines.append(f'zerolm_time_to_first_token_seconds_bucket{{le="{le}"}} {st.ttft_buckets[b]}')
    lines += [
        f"zerolm_time_to_first_token_seconds_sum {st.ttft_sum:.6f}",
        f"zerolm_time_to_first_token_seconds_count {st.ttft_count}",
    ]
    return "\n".join(lines) + "\n"


def load_server(
    model_dir: str | Path,
    *,
    max_batch: int = 16,
    max_queue: int = 64,
    limits: Limits = Limits(),
    name: str | None = None,
    compile: bool = False,
) -> Server:
    from zerolm.model import load_model
    from zerolm.transforms.layout import decode_layout

    model = decode_layout(load_model(model_dir))
    path = Path(model_dir).resolve()
    name = name or (
        path.parent.name if path.name == "model" else path.name
    )  # runs/x/sft/model -> "sft"
    return Server(
        model,
        Tokenizer.load(model_dir),
        name,
        max_batch=max_batch,
        max_queue=max_queue,
        limits=limits,
        compile=compile,
    )
