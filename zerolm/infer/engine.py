"""Generation engine: token ids in, token ids out (text lives at the edges: CLI, server).

Each prompt gets its own slot of a preallocated KV cache and is prefilled there (prompts of
equal length together); then all rows decode one token per step, each at its own length, so
every row computes what it would alone (infer/kv_cache.py).

Context policy: a prompt that leaves no room for max_new_tokens within max_seq_len is cut from
the left (keeping its end) with a warning, or rejected (`context="error"`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from zerolm.infer.compiled import load_or_compile
from zerolm.infer.decode import Row, advance, seeded_generator
from zerolm.infer.kv_cache import KVCache
from zerolm.infer.sampling import SamplingParams
from zerolm.model.protocol import LanguageModel

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class GenerateRequest:
    max_new_tokens: int = 64
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    context: str = "truncate"  # or "error"


def fit_prompts(
    prompts: Sequence[Sequence[int]], max_seq_len: int, max_new_tokens: int, context: str
) -> list[list[int]]:
    if not prompts:
        raise ValueError("no prompts given")
    if not 1 <= max_new_tokens < max_seq_len:
        raise ValueError(
            f"max_new_tokens must be in [1, {max_seq_len - 1}] for a model with "
            f"max_seq_len={max_seq_len}"
        )
    room = max_seq_len - max_new_tokens
    out = []
    for i, p in enumerate(prompts):
        p = [int(t) for t in p]
        if not p:
            raise ValueError(f"prompt {i} is empty: give at least one token (e.g. the bos token)")
        if len(p) > room:
            if context == "error":
                raise ValueError(
                    f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} only "
                    f"{room} fit in max_seq_len={max_seq_len}: shorten it or lower max_new_tokens"
                )
            log.warning(
                "prompt %d: %d tokens; keeping the last %d to fit max_seq_len=%d with %d new "
                "tokens",
                i,
                len(p),
                room,
                max_seq_len,
                max_new_tokens,
            )
            p = p[-room:]
        out.append(p)
    return out


class Engine:
    """compile=True: decode steps of all of a cache's slots run as one ahead-of-time compiled
    program per batch size (torch.export + AOTInductor, COMPILE_OPTIONS): C++ kernels and a C++
    wrapper, no Python or guard checks per step. Caches span the whole window; positions are
    inputs, so requests of any length reuse it. The first decode of each batch size compiles (tens
    of seconds; a C++ compiler is needed) or loads the program a previous run compiled for the same
    model, weights and settings (infer/compiled.py); the weights must not change afterwards.
    Prefill, and decoding a subset of slots (`rows`), stay eager."""

    def __init__(self, model: LanguageModel, compile: bool = False, program_dir: str | None = None):
        self.model: LanguageModel = model.eval()
        self.device = next(model.parameters()).device
        self.compiled = compile
        self.program_dir = program_dir
        # (batch size, cache shape, dtype) -> compiled step
        self._programs: dict[tuple, Callable[..., torch.Tensor]] = {}
        # compiled: batch size -> a window-long cache kept for the next request (allocating and
        # zeroing one is ~0.4 GB of writes for SmolLM2's 8192 positions, per request and row)
        self._spare: dict[int, KVCache] = {}

    def _last_logits(
        self, ids: torch.Tensor, cache: KVCache, rows: torch.Tensor | slice | None
    ) -> torch.Tensor:
        """Eager: (B, T) tokens into cache slots `rows` -> (B, V) logits of the last position."""
        return self.model.logits(self.model.hidden(ids, cache=cache, rows=rows)[:, -1:])[:, 0]

    def _program(self, ids: torch.Tensor, cache: KVCache) -> Callable[..., torch.Tensor] | None:
        """The compiled step for this batch size and cache: loaded from disk or compiled on first
        use; None (and eager decoding from then on, with a warning naming the cause) if compiling
        fails."""
        key = (ids.shape[0], tuple(cache.k[0].shape), cache.k[0].dtype)
        if key not in self._programs:
            try:
                self._programs[key] = load_or_compile(self.model, ids, cache, self.program_dir)
            except Exception as e:  # any failure leaves eager decoding, which is always right
                log.warning(
                    "compiling the decode step failed, decoding eagerly instead (same tokens, "
                    "about half the speed): %s: %s. Compiling needs a C++ compiler (g++ or "
                    "clang++; CXX=... names one); without --compile this message goes away.",
                    type(e).__name__,
                    str(e).strip().splitlines()[0] if str(e).strip() else "",
                )
                self.compiled = False
                return None
        return self._programs[key]

    def decode(self, ids: torch.Tensor, cache: KVCache, rows: slice | None = None) -> torch.Tensor:
        """One step: (B, 1) next tokens of cache slots `rows` (default all) -> their (B, V)
        logits."""
        lens = cache.lengths
        # eager: without compile, for some of the slots, and for a step that attends to the whole
        # cache (the exported span stops one short of it; `stream` never gets there)
        program = None
        if self.compiled and rows is None and max(lens) + 1 < cache.max_len:
            program = self._program(ids, cache)
        if program is None:
            return self._last_logits(ids, cache, rows)
        pos = torch.tensor(lens, device=self.device)
        out = program(ids, pos, torch.empty(max(lens) + 1), cache.k, cache.v)  # writes k/v in place
        cache.lengths = [n + 1 for n in lens]
        return out

    def decode_first(self, last: Sequence[int], cache: KVCache) -> torch.Tensor:
        """One step for the sequences in slots 0..n-1 of `cache` (n = len(last) >= 1), whose next
        tokens are `last` -> their (n, V) logits. Compiled: the fixed step over all slots, the empty
        ones run as masked rows at position 0 and are dropped (one program for any n); eager: the
        n slots only."""
        n, dev = len(last), self.device
        if not self.compiled:
            return self.decode(torch.tensor(last, device=dev)[:, None], cache, slice(0, n))
        ids = torch.zeros(cache.slots, 1, dtype=torch.long, device=dev)  # (slots, 1)
        ids[:n, 0] = torch.tensor(last, device=dev)
        empty = range(n, cache.slots)
        for s in empty:
            cache.reset(s)  # empty slots attend only to their position 0, which they overwrite
        logits = self.decode(ids, cache)  # (slots, V)
        for s in empty:
            cache.reset(s)
        return logits[:n]

    @torch.inference_mode()
    def stream(
        self, prompts: Sequence[Sequence[int]], req: GenerateRequest = GenerateRequest()
    ) -> Iterator[dict[int, int]]:
        """Yield {row: new token id} each step for the rows still generating."""
        cfg = self.model.cfg
        req.sampling.validate()
        prompts = fit_prompts(prompts, cfg.max_seq_len, req.max_new_tokens, req.context)
        B = len(prompts)
        if self.compiled:  # a spare one, or a new one; a concurrent stream takes its own
            cache = self._spare.pop(B, None) or KVCache.for_model(self.model, B)
            cache.reset()  # stale keys beyond each row's length are masked like empty ones
        else:
            cache = KVCache.for_model(self.model, B, max(map(len, prompts)) + req.max_new_tokens)
        try:
            yield from self._run(prompts, req, cache)
        finally:
            if self.compiled:
                self._spare[B] = cache

    def _run(
        self, prompts: Sequence[Sequence[int]], req: GenerateRequest, cache: KVCache
    ) -> Iterator[dict[int, int]]:
        cfg, B, dev = self.model.cfg, len(prompts), self.device
        logits = self.prefill(prompts, cache)  # (B, V)
        gen = seeded_generator(req.seed, dev)  # one for the request: its rows draw as one batch
        rows = [
            Row.start(
                req.sampling,
                req.max_new_tokens,
                cfg.vocab_size,
                generator=gen,
                prompt=p,
                stop_ids=req.stop_token_ids,
                device=dev,
            )
            for p in prompts
        ]
        while True:
            running = [r.finish is None for r in rows]
            # finished rows are drawn too: the others keep their places in the draw
            ids = advance(rows, logits)
            yield {r: ids[r] for r in range(B) if running[r]}
            if all(r.finish for r in rows):
                return
            logits = self.decode(torch.tensor(ids, device=dev)[:, None], cache)  # (B, V)

    def prefill(
        self, prompts: Sequence[Sequence[int]], cache: KVCache, slots: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Run each prompt into its cache slot (default: slot i for prompt i), prompts of equal
        length in one call; return the (len(prompts), V) logits of their last tokens."""
        slots = list(range(len(prompts))) if slots is None else list(slots)
        by_len: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            by_len.setdefault(len(p), []).append(i)
        out = None
        for group in by_len.values():
            rows = torch.tensor([slots[i] for i in group], device=self.device)
            ids = torch.tensor([list(prompts[i]) for i in group], device=self.device)
            logits = self._last_logits(ids, cache, rows)  # (G, V)
            if out is None:
                out = logits.new_empty(len(prompts), logits.shape[-1])
            out[group] = logits
        assert out is not None  # fit_prompts refuses an empty batch
        return out

    def generate(
        self, prompts: Sequence[Sequence[int]], req: GenerateRequest = GenerateRequest()
    ) -> list[list[int]]:
        """New token ids per prompt (a stop token, if hit, is included as the last id)."""
        out: list[list[int]] = [[] for _ in prompts]
        for step in self.stream(prompts, req):
            for r, tok in step.items():
                out[r].append(tok)
        return out
