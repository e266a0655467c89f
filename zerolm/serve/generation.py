"""One request's generation, on the event loop's side: `Relay` carries the scheduler thread's
events to the loop, and `Generation` turns a request's events into text deltas (whole characters,
stop strings cut, n choices multiplexed)."""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from zerolm.infer.stop import StopStrings
from zerolm.serve.errors import ApiError
from zerolm.serve.jobs import Job, Token
from zerolm.tokenizer.stream import StreamDecoder

if TYPE_CHECKING:
    from zerolm.serve.server import Server

Finish = Literal["stop", "length"]
# what Generation.collect returns: text, tokens and finish reason per choice, tokens generated
Collected = tuple[list[str], list[list[Token]], list[Finish | None], int]


class Relay:
    """Scheduler thread -> event loop. Events are queued and the loop is woken at most once per
    burst of them (one self-pipe write per decode step, not one per token)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.items: collections.deque[tuple[asyncio.Queue, Any]] = collections.deque()
        self.armed, self.lock = False, threading.Lock()

    def put(self, queue: asyncio.Queue, item: Any) -> None:  # any thread
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


@dataclass
class Event:
    choice: int
    text: str  # new text of this choice (whole characters, stop strings cut)
    tokens: list[Token]  # the scheduler's Tokens consumed (stop tokens excluded)
    finish: Finish | None = None  # on a choice's last event
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

    def emitter(self, i: int) -> Callable[[str, object], None]:
        return lambda kind, value: self.relay.put(self.queue, (i, kind, value))

    def cancel(self) -> None:
        for j in self.jobs:
            if j is not None:
                j.cancel()
        self.server.scheduler.wake()

    async def collect(self) -> Collected:
        """Run to the end: (text, tokens and finish reason per choice, tokens generated in all)."""
        n = len(self.jobs)
        texts, used = [""] * n, 0
        toks: list[list[Token]] = [[] for _ in range(n)]
        reasons: list[Finish | None] = [None] * n
        async for ev in self.events():
            texts[ev.choice] += ev.text
            toks[ev.choice] += ev.tokens
            reasons[ev.choice] = ev.finish or reasons[ev.choice]
            used += ev.generated
        return texts, toks, reasons, used

    async def events(self) -> AsyncIterator[Event]:
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
                    if not self._take(i, job, ev, kind, value):
                        continue
                    ev.generated = job.generated
                    self.jobs[i], open_ = None, open_ - 1
                for ev in out.values():
                    if ev.text or ev.tokens or ev.finish:
                        yield ev
        finally:
            self.cancel()

    def _take(self, i: int, job: Job, ev: Event, kind: str, value: Any) -> bool:
        """Add choice i's scheduler event to its Event; True when the choice has finished."""
        if kind == "token":
            if value.id in self.stop_ids:
                return False
            text, hit = self.cutters[i].feed(self.decoders[i].push(value.id))
            ev.text += text
            ev.tokens.append(value)
            if not hit:
                return False
            job.cancel()
            self.server.scheduler.wake()
            ev.finish = "stop"
        elif kind == "done":
            tail = self.cutters[i].feed(self.decoders[i].flush())[0] + self.cutters[i].flush()
            ev.text += tail
            ev.finish = "length" if value == "length" else "stop"
        else:
            raise ApiError(500, str(value), kind="server_error")
        return True
