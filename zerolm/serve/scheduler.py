"""Continuous batching: sequences join and leave the running decode batch at every step.

One thread owns the model. Each step it (1) drops cancelled sequences, freeing their KV-cache
slots, (2) admits waiting sequences into free slots and prefills them, up to a prompt-token
budget per step so that long prompts do not stall the streams already running, then (3) runs one
decode step for every running sequence, each at its own length in its own slot
(zerolm/infer/kv_cache.py), and samples each row with that sequence's own parameters, token
counts and random generator (infer/decode.py, the step Engine.stream and seq2seq take too), so a
seeded request draws the same tokens alone or in a crowd. Running sequences always hold slots
0..n-1 (a finished one's slot takes the last sequence's cache), so the eager decode step reads the
cache as views, never gathers it; the compiled one runs all slots, the empty ones masked.

The scheduler speaks token ids only; results leave through each sequence's `emit` callback
(called on the scheduler thread): ("token", Token) per new token, then ("done", reason) with
reason "stop" (a stop token), "length" (max_new_tokens) or "cancelled", or ("error", message).

Faults stay with their sequence. `submit` refuses (ValueError) every job that could fail later, so
an "error" is always a server-side fault: a row whose sampling or callback raises, or whose logits
are not finite, ends alone while the others run on with the same tokens; a failed model pass ends
the sequences in it and leaves slots and cache consistent. `health()` reports what went wrong.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Sequence

import torch

from zerolm.infer.decode import Row, advance, seeded_generator
from zerolm.infer.engine import Engine
from zerolm.infer.kv_cache import KVCache
from zerolm.model.protocol import LanguageModel
from zerolm.serve.jobs import Job, QueueFull, Stats, Token

log = logging.getLogger(__name__)


NONFINITE = (
    "the model produced non-finite logits (NaN or inf) for this request: its weights are not "
    "finite or this input overflows them"
)


class Scheduler:
    """compile=True: decode steps run the compiled step over all max_batch slots
    (infer/compiled.py), empty slots masked; it is compiled (or loaded) here, before the first
    request. Prefill stays eager; if compiling fails, decoding is eager, with a warning
    (infer/engine.py). `mirror` (a tensor-parallel server's rank 0, serve/tp.py): its engine and
    cache are used, every model pass and cache change goes through its run(op, args), which has
    every rank make it, and close() ends it after the scheduler thread."""

    def __init__(
        self,
        model: LanguageModel,
        *,
        max_batch: int = 16,
        max_queue: int = 64,
        prefill_budget: int = 512,
        compile: bool = False,
        program_dir: str | None = None,
        mirror=None,
    ):
        self.model, self.mirror = model.eval(), mirror
        if mirror is None:
            self.engine = Engine(model, compile=compile, program_dir=program_dir)
            self.cache = KVCache.for_model(model, max_batch)
        else:
            self.engine, self.cache = mirror.engine, mirror.cache
        self.max_batch, self.max_queue, self.prefill_budget = max_batch, max_queue, prefill_budget
        if compile:
            with torch.inference_mode():  # slots at length 1: the exported span starts at 2
                self.cache.lengths = [1] * max_batch
                ids = torch.zeros(max_batch, 1, dtype=torch.long, device=self.engine.device)
                self.engine.decode(ids, self.cache)
            self.cache.reset()
        self.vocab = model.cfg.vocab_size
        self.waiting: collections.deque[Job] = collections.deque()
        self.running: list[Job] = []  # running[i].slot == i
        self.stats = Stats()
        # the weights never change while serving: one look at load tells /health about a NaN
        # checkpoint
        with torch.no_grad():
            self._bad_weights = next(
                (n for n, p in model.named_parameters() if not torch.isfinite(p).all()), None
            )
        self._cv = threading.Condition()  # an RLock inside: submit may be called with it held
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="zerolm-scheduler", daemon=True)
        self._thread.start()

    # -- called from any thread ------------------------------------------------------------
    def submit(self, seqs: Sequence[Job]) -> None:
        """Queue the sequences (all of them or, raising QueueFull, none). A job that could fail
        once running (bad ids, seed, sampling, or no room in the window and cache) is a
        ValueError here."""
        room = min(self.model.cfg.max_seq_len, self.cache.max_len)
        for s in seqs:
            s.check(room, self.vocab)
        with self._cv:
            if self._closed:
                raise RuntimeError("the scheduler is shut down")
            if len(self.waiting) + len(seqs) > self.max_queue:
                raise QueueFull(
                    f"{len(self.waiting)} sequences are waiting (limit {self.max_queue})"
                )
            now = time.perf_counter()
            for s in seqs:
                s.submitted = now
                self.waiting.append(s)
            self.stats.requests += 1
            self._cv.notify()

    def health(self) -> dict:
        """{"ok", "reason" (None when ok), "nonfinite_logits", "failed_rows", "failed_passes",
        "last_error"}. Not ok: the scheduler is not running, the weights are not finite, or the
        model produced non-finite logits (its weights do not change, so that stays). Failed rows and
        passes are counted, and last_error kept, without making the model unhealthy."""
        with self._cv:
            st = self.stats
            if self._closed or not self._thread.is_alive():
                reason = "the scheduler is not running (shut down or crashed): restart the server"
            elif self.mirror is not None and self.mirror.broken:
                reason = f"{self.mirror.broken}: restart the server"
            elif self._bad_weights is not None:
                reason = (
                    f"the model's weights are not finite ({self._bad_weights} has NaN or inf): "
                    "load a good checkpoint"
                )
            elif st.nonfinite_logits:
                reason = (
                    f"the model produced non-finite logits for {st.nonfinite_logits} request(s)"
                )
            else:
                reason = None
            return {
                "ok": reason is None,
                "reason": reason,
                "nonfinite_logits": st.nonfinite_logits,
                "failed_rows": st.failed_rows,
                "failed_passes": st.failed_passes,
                "last_error": st.last_error,
            }

    def load(self) -> dict:
        with self._cv:
            return {
                "waiting": len(self.waiting),
                "running": len(self.running),
                "slots": self.max_batch,
            }

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
        if self.mirror is not None:
            self.mirror.close()

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
                        _emit(s, "error", "server shutting down")
                    return
                admitted = self._admit()
            try:
                with torch.inference_mode():
                    self._step(admitted)
            except Exception as e:  # a bug outside the guarded parts: fail what runs, keep serving
                self._fail(
                    list(self.running),
                    f"generation failed: {type(e).__name__}: {e}",
                    pass_failed=True,
                )

    def _admit(self) -> list[Job]:
        """Move waiting sequences into free slots (under the lock), within the prefill budget."""
        for s in [s for s in self.running if s.cancelled]:
            self._remove(s)
            _emit(s, "done", "cancelled")
        admitted: list[Job] = []
        budget = self.prefill_budget
        while self.waiting and len(self.running) < self.max_batch:
            s = self.waiting[0]
            if s.cancelled:
                self.waiting.popleft()
                _emit(s, "done", "cancelled")
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
            self._op("move", last.slot, s.slot)
            last.slot = s.slot
            self.running[s.slot] = last

    def _fail(self, seqs: list[Job], message: str, *, pass_failed: bool = False) -> None:
        """End seqs with ("error", message), freeing their slots (they may be running or not)."""
        log.error("%d sequence(s) failed: %s", len(seqs), message, exc_info=pass_failed)
        with self._cv:
            self.stats.last_error = message
            self.stats.failed_passes += pass_failed
            for s in seqs:
                if 0 <= s.slot < len(self.running) and self.running[s.slot] is s:
                    self._remove(s)
                _emit(s, "error", message)

    def _step(self, admitted: list[Job]) -> None:
        if admitted:
            for s in admitted:
                self._op("reset", s.slot)
                s.row = Row.start(
                    s.sampling,
                    s.max_new_tokens,
                    self.vocab,
                    generator=seeded_generator(s.seed),  # its own: the same draws in any crowd
                    prompt=s.prompt,
                    stop_ids=s.stop_token_ids,
                )
            try:  # writes only the admitted sequences' slots: the running ones are not involved
                logits = self._op(
                    "prefill", [s.prompt for s in admitted], [s.slot for s in admitted]
                )
            except Exception as e:
                self._fail(
                    admitted,
                    f"generation failed in the model's prefill pass: {type(e).__name__}: {e}",
                    pass_failed=True,
                )
            else:
                self._sample_rows(admitted, logits)
        if self.running:  # every running sequence has its last token: one step for all
            seqs = list(self.running)
            try:  # a failed step leaves the cache lengths as they were (they advance at its end)
                last = [s.running_row.last for s in seqs]
                logits = self._op("decode", last)  # (B, V)
            except Exception as e:
                self._fail(
                    seqs,
                    f"generation failed in the model's decode pass: {type(e).__name__}: {e}",
                    pass_failed=True,
                )
            else:
                self._sample_rows(seqs, logits)
        self.stats.steps += 1

    def _sample_rows(self, seqs: list[Job], logits: torch.Tensor) -> None:
        now = time.perf_counter()
        finished, failed, nonfinite = [], [], []
        if not torch.isfinite(logits).all():  # one check per step; per row only when it fails
            ok = torch.isfinite(logits).all(-1).tolist()
            nonfinite = [s for s, good in zip(seqs, ok) if not good]
            seqs, logits = [s for s, good in zip(seqs, ok) if good], logits[torch.tensor(ok)]
        chosen = advance([s.running_row for s in seqs], logits, errors="return")
        want_lps = any(s.logprobs is not None for s in seqs)
        lps = torch.log_softmax(logits.float(), -1) if want_lps else None  # (B, V)
        for j, (s, tid) in enumerate(zip(seqs, chosen)):
            try:
                if isinstance(tid, Exception):
                    raise tid
                s.emit("token", self._token(s, tid, lps, j, now))
            except Exception as e:  # this row's own fault (its sampling, or its caller's callback)
                log.exception("a sequence failed while sampling")
                failed.append((s, f"generation failed: {type(e).__name__}: {e}"))
                continue
            if finish := s.running_row.finish:
                finished.append((s, finish))
        self.stats.tokens += len(seqs) - len(failed)
        self.stats.recent.append((now, len(seqs) - len(failed)))
        with self._cv:
            for s in nonfinite:  # before any removal moves a sequence (and its cache) elsewhere
                self._op("scrub", s.slot)
            for s, reason in finished:
                self._remove(s)
                _emit(s, "done", reason)
            self.stats.nonfinite_logits += len(nonfinite)
            self.stats.failed_rows += len(failed)
        for s, message in failed:
            self._fail([s], message)
        if nonfinite:
            self._fail(nonfinite, NONFINITE)

    def _token(self, s: Job, tid: int, lps: torch.Tensor | None, j: int, now: float) -> Token:
        """The Token event of s's new token `tid` (row j of the step's log-probabilities)."""
        tok = Token(tid)
        if s.logprobs is not None:
            assert lps is not None  # computed when any row wants logprobs
            tok.logprob = float(lps[j, tid])
            if s.logprobs:
                vals, ids = lps[j].topk(min(s.logprobs, self.vocab))
                tok.top = list(zip(ids.tolist(), vals.tolist()))
        if s.running_row.generated == 1:
            self.stats.record_ttft(now - s.submitted)
        return tok

    def _op(self, op: str, *args):
        """A model pass or KV-cache change: here, or on every rank of a tensor-parallel server."""
        if self.mirror is not None:
            return self.mirror.run(op, args)
        return run_op(self.engine, self.cache, op, args)


def run_op(engine: Engine, cache: KVCache, op: str, args: tuple):
    """One of the scheduler's model passes or KV-cache changes, by name: everything it does to the
    model and cache (the list a tensor-parallel follower replays, serve/tp.py)."""
    if op == "prefill":  # (prompts, slots) -> their last tokens' logits
        return engine.prefill(args[0], cache, args[1])
    if op == "decode":  # (next token of slots 0..n-1,) -> (n, V) logits
        return engine.decode_first(args[0], cache)
    if op in ("reset", "move", "scrub"):
        return getattr(cache, op)(*args)
    raise ValueError(f"unknown scheduler operation {op!r}")


def _emit(s: Job, kind: str, value) -> None:
    """Send an event whose failure cannot make things worse (an end event): log it and go on."""
    try:
        s.emit(kind, value)
    except Exception:
        log.exception("a sequence's %s callback failed", kind)
