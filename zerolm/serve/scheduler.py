"""Continuous batching: sequences join and leave the running decode batch at every step.

One thread owns the model. Each step it (1) drops cancelled sequences, freeing their KV-cache
slots, (2) admits waiting sequences into free slots and prefills them, up to a prompt-token
budget per step so that long prompts do not stall the streams already running, then (3) runs one
decode step for every running sequence, each at its own length in its own slot
(zerolm/infer/kv_cache.py), and samples each row with that sequence's own parameters, token
counts and random generator, so a seeded request draws the same tokens alone or in a crowd.
Running sequences always hold slots 0..n-1 (a finished one's slot takes the last sequence's
cache), so the decode step reads the cache as views, never gathers it.

The scheduler speaks token ids only; results leave through each sequence's `emit` callback
(called on the scheduler thread): ("token", Token) per new token, then ("done", reason) with
reason "stop" (a stop token), "length" (max_new_tokens) or "cancelled", or ("error", message).
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from zerolm.infer.engine import Engine
from zerolm.infer.kv_cache import KVCache
from zerolm.infer.sampling import SamplingParams, sample

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The waiting queue is at its bound; the caller should retry later (HTTP 503 + Retry-After)."""


@dataclass
class Token:
    id: int
    logprob: float | None = None  # log-probability under the model (before sampling filters)
    top: list[tuple[int, float]] = field(default_factory=list)  # the top_logprobs alternatives


@dataclass(eq=False)
class Job:
    """One generation: a prompt, its limits and sampling, and its state once running."""

    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's and the top k alternatives
    emit: Callable[[str, object], None] = lambda kind, value: None
    # state
    slot: int = -1
    generated: int = 0
    last: int = -1
    cancelled: bool = False
    submitted: float = 0.0
    counts: torch.Tensor | None = None  # (V,) occurrences of each token so far
    gen: torch.Generator | None = None

    def cancel(self) -> None:
        """Ask the scheduler to drop this sequence at its next step (thread-safe: one flag)."""
        self.cancelled = True


@dataclass
class Stats:
    requests: int = 0
    tokens: int = 0
    steps: int = 0
    ttft_sum: float = 0.0
    ttft_count: int = 0
    ttft_buckets: dict[float, int] = field(default_factory=lambda: dict.fromkeys(TTFT_BUCKETS, 0))
    recent: collections.deque = field(default_factory=lambda: collections.deque(maxlen=4096))  # (time, tokens)


TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, float("inf"))


class Scheduler:
    def __init__(self, model, *, max_batch: int = 16, max_queue: int = 64, prefill_budget: int = 512):
        self.model = model.eval()
        self.engine = Engine(model)
        self.max_batch, self.max_queue, self.prefill_budget = max_batch, max_queue, prefill_budget
        self.cache = KVCache.for_model(model, max_batch)
        self.vocab = model.cfg.vocab_size
        self.waiting: collections.deque[Job] = collections.deque()
        self.running: list[Job] = []  # running[i].slot == i
        self.stats = Stats()
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="zerolm-scheduler", daemon=True)
        self._thread.start()

    # -- called from any thread ------------------------------------------------------------
    def submit(self, seqs: Sequence[Job]) -> None:
        """Queue the sequences (all of them or, raising QueueFull, none)."""
        window = self.model.cfg.max_seq_len
        for s in seqs:
            if not s.prompt or len(s.prompt) + s.max_new_tokens > window:
                raise ValueError(f"prompt of {len(s.prompt)} tokens + max_new_tokens={s.max_new_tokens} must fit in "
                                 f"the model's window of {window} tokens")
            s.sampling.validate()
        with self._cv:
            if self._closed:
                raise RuntimeError("the scheduler is shut down")
            if len(self.waiting) + len(seqs) > self.max_queue:
                raise QueueFull(f"{len(self.waiting)} sequences are waiting (limit {self.max_queue})")
            now = time.perf_counter()
            for s in seqs:
                s.submitted = now
                self.waiting.append(s)
            self.stats.requests += 1
            self._cv.notify()

    def load(self) -> dict:
        with self._cv:
            return {"waiting": len(self.waiting), "running": len(self.running), "slots": self.max_batch}

    def tokens_per_second(self, window: float = 10.0) -> float:
        now = time.perf_counter()
        with self._cv:
            n = sum(k for t, k in self.stats.recent if now - t <= window)
        return n / window

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=10)

    def wake(self) -> None:
        """Prompt a step now (e.g. after a cancel, so the slot is freed at once)."""
        with self._cv:
            self._cv.notify()

    # -- the scheduler thread -------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not self.waiting and not self.running:
                    self._cv.wait()
                if self._closed:
                    for s in [*self.waiting, *self.running]:
                        s.emit("error", "server shutting down")
                    return
                admitted = self._admit()
            try:
                with torch.inference_mode():
                    self._step(admitted)
            except Exception as e:  # a failing step fails its sequences, never the server
                log.exception("scheduler step failed")
                with self._cv:
                    for s in self.running:
                        s.emit("error", f"generation failed: {type(e).__name__}: {e}")
                    self.running.clear()

    def _admit(self) -> list[Job]:
        """Move waiting sequences into free slots (under the lock), within the prefill budget."""
        for s in [s for s in self.running if s.cancelled]:
            self._remove(s)
            s.emit("done", "cancelled")
        admitted, budget = [], self.prefill_budget
        while self.waiting and len(self.running) < self.max_batch:
            s = self.waiting[0]
            if s.cancelled:
                self.waiting.popleft()
                s.emit("done", "cancelled")
                continue
            if admitted and len(s.prompt) > budget:
                break
            self.waiting.popleft()
            budget -= len(s.prompt)
            s.slot = len(self.running)
            self.running.append(s)
            admitted.append(s)
        return admitted

    def _remove(self, s: Job) -> None:
        """Free s's slot (under the lock); the last running sequence moves into it."""
        last = self.running.pop()
        if last is not s:
            self.cache.move(last.slot, s.slot)
            last.slot = s.slot
            self.running[s.slot] = last

    def _step(self, admitted: list[Job]) -> None:
        if admitted:
            for s in admitted:
                self.cache.reset(s.slot)
                s.counts = torch.bincount(torch.tensor(s.prompt), minlength=self.vocab)
                s.gen = torch.Generator()
                s.gen.manual_seed(s.seed) if s.seed is not None else s.gen.seed()
            logits = self.engine.prefill([s.prompt for s in admitted], self.cache, [s.slot for s in admitted])
            self._sample_rows(admitted, logits)
        if self.running:  # every running sequence has its last token: one step for all, slots 0..n-1
            seqs = list(self.running)
            last = torch.tensor([[s.last] for s in seqs])
            logits = self.engine.decode(last, self.cache, slice(0, len(seqs)))  # (B, V)
            self._sample_rows(seqs, logits)
        self.stats.steps += 1

    def _sample_rows(self, seqs: list[Job], logits: torch.Tensor) -> None:
        now = time.perf_counter()
        finished = []
        chosen = self._choose(seqs, logits)
        lps = torch.log_softmax(logits.float(), -1) if any(s.logprobs is not None for s in seqs) else None  # (B, V)
        for j, (s, tid) in enumerate(zip(seqs, chosen)):
            tok = Token(tid)
            if s.logprobs is not None:
                tok.logprob = float(lps[j, tid])
                if s.logprobs:
                    vals, ids = lps[j].topk(min(s.logprobs, self.vocab))
                    tok.top = list(zip(ids.tolist(), vals.tolist()))
            s.counts[tid] += 1
            s.generated += 1
            s.last = tid
            if s.generated == 1:
                self._record_ttft(now - s.submitted)
            s.emit("token", tok)
            if tid in s.stop_token_ids:
                finished.append((s, "stop"))
            elif s.generated >= s.max_new_tokens:
                finished.append((s, "length"))
        self.stats.tokens += len(seqs)
        self.stats.recent.append((now, len(seqs)))
        with self._cv:
            for s, reason in finished:
                self._remove(s)
                s.emit("done", reason)

    @staticmethod
    def _choose(seqs: list[Job], logits: torch.Tensor) -> list[int]:
        """Next token of each row: greedy rows with equal parameters in one call (argmax needs no
        generator), sampled rows one by one with their own generator."""
        chosen: list[int] = [0] * len(seqs)
        greedy: dict[SamplingParams, list[int]] = {}
        for j, s in enumerate(seqs):
            if s.sampling.temperature == 0:
                greedy.setdefault(s.sampling, []).append(j)
            else:
                chosen[j] = int(sample(logits[j : j + 1], s.sampling, s.gen, s.counts[None])[0])
        for params, js in greedy.items():
            penalised = (params.repetition_penalty, params.presence_penalty, params.frequency_penalty) != (1.0, 0.0, 0.0)
            counts = torch.stack([seqs[j].counts for j in js]) if penalised else None  # (G, V)
            for j, t in zip(js, sample(logits[js], params, None, counts).tolist()):
                chosen[j] = t
        return chosen

    def _record_ttft(self, dt: float) -> None:
        st = self.stats
        st.ttft_sum += dt
        st.ttft_count += 1
        for b in TTFT_BUCKETS:
            if dt <= b:
                st.ttft_buckets[b] += 1
