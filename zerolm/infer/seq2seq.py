"""Generation for encoder-decoder models: token ids in, token ids out.

Legend: B sources, k beams per source, N = B*k decoder rows, S source positions, V vocabulary.

Sources of different lengths are padded on the right and encoded once; each decoder layer's
cross-attention keys/values are projected once and kept in a Seq2SeqCache next to the decoder's
self-attention KVCache, so a step costs one token per row. Rows (greedy / sampling) or sources
(beam search) that finish are dropped from the batch. Greedy and sampling pick with
infer/sampling.py; beam search follows HF transformers' rules exactly (early_stopping=False): the
2k best continuations by summed log-probability, of which those among the first k that end in eos
become finished hypotheses scored sum logprob / len**length_penalty (len counts the generated
tokens, eos included), the best k that do not end in eos run on; a source stops when no running
beam can beat its worst finished hypothesis at the current length; at max_new_tokens the running
beams are finished as they are. Outputs are new token ids, with eos last when it was produced.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from zerolm.infer.decode import Row, advance, seeded_generator
from zerolm.infer.kv_cache import KVCache
from zerolm.infer.sampling import SamplingParams
from zerolm.model.encdec import EncoderDecoder
from zerolm.model.presets import head_size


class Seq2SeqCache:
    """The decoder's self-attention KVCache (one slot per row) plus the cross-attention keys/values
    of the encoder memory, filled by the model's first `decode` call."""

    def __init__(self, self_attn: KVCache):
        self.self_attn = self_attn
        self.cross: list[tuple[torch.Tensor, torch.Tensor]] | None = (
            None  # per layer (N, H, S, Dh) x 2
        )
        self.cross_mask: torch.Tensor | None = (
            None  # (N, 1, 1, S) allowed source positions; None: all
        )

    @classmethod
    def for_model(
        cls, model: EncoderDecoder, rows: int, max_len: int, dtype: torch.dtype | None = None
    ) -> Seq2SeqCache:
        cfg = model.cfg
        if max_len > cfg.max_seq_len:
            raise ValueError(
                f"a target of {max_len} positions exceeds the model's "
                f"max_seq_len={cfg.max_seq_len}: lower max_new_tokens"
            )
        param = next(model.parameters())
        return cls(
            KVCache(
                len(model.decoder.blocks),
                rows,
                cfg.n_kv_heads,
                max_len,
                head_size(cfg),
                dtype or param.dtype,
                param.device,
            )
        )

    def select(self, idx: torch.Tensor) -> None:
        """Keep rows idx (N',) in that order (dropping finished rows)."""
        self.self_attn.select(idx)
        if self.cross is not None:
            self.cross = [(k[idx], v[idx]) for k, v in self.cross]
        if self.cross_mask is not None:
            self.cross_mask = self.cross_mask[idx]

    def reorder(self, idx: torch.Tensor, n: int) -> None:
        """Row r continues row idx[r] (beam search; beams of one source share its cross
        keys/values): the n filled positions of the self-attention cache are gathered, in place."""
        self.self_attn.reorder(idx, n)


def _check(
    model: EncoderDecoder,
    sources: Sequence[Sequence[int]],
    max_new_tokens: int,
    bos: int,
    eos: int,
    sampling: SamplingParams | None,
) -> None:
    cfg = model.cfg
    if sampling is not None:
        sampling.validate()
    if cfg.arch != "encdec":
        raise ValueError(
            f"seq2seq generation needs an encoder-decoder model (arch encdec), not {cfg.arch!r}; "
            "use infer.engine.Engine for decoders"
        )
    if not sources:
        raise ValueError("no sources given")
    for i, s in enumerate(sources):
        if not s:
            raise ValueError(f"source {i} is empty: give at least one token (e.g. eos)")
        if len(s) > cfg.max_seq_len:
            raise ValueError(
                f"source {i} has {len(s)} tokens; the model reads at most "
                f"max_seq_len={cfg.max_seq_len}"
            )
    for name, tok in (("bos", bos), ("eos", eos)):
        if not 0 <= tok < cfg.vocab_size:
            raise ValueError(
                f"{name}={tok} is not a token id of this model (vocabulary of {cfg.vocab_size})"
            )
    if not 1 <= max_new_tokens <= cfg.max_seq_len:
        raise ValueError(
            f"max_new_tokens must be in [1, {cfg.max_seq_len}] (the model's max_seq_len)"
        )


def pad_sources(sources: Sequence[Sequence[int]], device=None):
    """Right-padded (B, S) ids and the (B, S) real-token mask."""
    lengths = torch.tensor([len(s) for s in sources])
    # padding is a filler the mask hides from the encoder (id 0 is in every vocabulary)
    ids = torch.zeros((len(sources), int(lengths.max())), dtype=torch.long)
    for i, s in enumerate(sources):  # once per call, not per step
        ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    mask = torch.arange(ids.shape[1])[None] < lengths[:, None]
    return ids.to(device), mask.to(device)


def _encode(
    model: EncoderDecoder, sources: Sequence[Sequence[int]], k: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    dev = next(model.parameters()).device
    src, mask = pad_sources(sources, dev)
    if int(src.max()) >= model.cfg.vocab_size or int(src.min()) < 0:
        raise ValueError(f"source token ids must be in [0, {model.cfg.vocab_size})")
    memory = model.encode(src, mask)  # (B, S, D)
    if k > 1:
        memory, mask = memory.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)  # (N, S, D)
    return memory, mask


def _steps(
    model: EncoderDecoder,
    sources: Sequence[Sequence[int]],
    bos: int,
    eos: int,
    max_new_tokens: int,
    sampling: SamplingParams | None,
    seed: int | None,
) -> Iterator[tuple[list[int], list[int]]]:
    """Greedy / sampled decoding: yield (source index, token) lists per step for the rows still
    generating; a row that ends (eos, or its max_new_tokens-th token) leaves the batch."""
    memory: torch.Tensor | None  # None once the cache holds the cross-attention keys/values
    memory, mask = _encode(model, sources)
    dev = memory.device
    cache = Seq2SeqCache.for_model(model, len(sources), max_new_tokens)
    gen = seeded_generator(seed, dev)  # one for the call: its rows draw as one batch
    params = sampling or SamplingParams(temperature=0.0)  # None: greedy
    V = model.cfg.vocab_size
    rows = [
        Row.start(params, max_new_tokens, V, generator=gen, stop_ids=(eos,), device=dev)
        for _ in sources
    ]  # the penalties count generated tokens only: the source is not the decoder's text
    src = list(range(len(sources)))
    tok = torch.full((len(sources), 1), bos, dtype=torch.long, device=dev)
    while True:
        logits = model.logits(model.decode(tok, memory, mask, cache=cache)[:, -1])  # (N, V)
        memory = None  # the cache holds its cross-attention keys/values now
        ids = advance(rows, logits)
        yield src, ids
        keep = [j for j, r in enumerate(rows) if r.finish is None]
        if not keep:
            return
        if len(keep) < len(rows):
            cache.select(torch.tensor(keep, device=dev))
            rows, src, ids = [rows[j] for j in keep], [src[j] for j in keep], [ids[j] for j in keep]
        tok = torch.tensor(ids, device=dev)[:, None]  # (N', 1)


def stream(
    model: EncoderDecoder,
    sources: Sequence[Sequence[int]],
    *,
    bos: int,
    eos: int,
    max_new_tokens: int,
    sampling: SamplingParams | None = None,
    seed: int | None = None,
) -> Iterator[dict[int, int]]:
    """Greedy or sampled decoding, yielding {source index: new token id} each step for the sources
    still generating (a source's last token is eos, or its max_new_tokens-th)."""
    _check(model, sources, max_new_tokens, bos, eos, sampling)

    def steps():
        was_training = model.training
        try:
            with torch.inference_mode():
                for src, ids in _steps(
                    model.eval(), sources, bos, eos, max_new_tokens, sampling, seed
                ):
                    yield dict(zip(src, ids))
        finally:
            model.train(was_training)

    return steps()


@torch.inference_mode()
def generate(
    model: EncoderDecoder,
    sources: Sequence[Sequence[int]],
    *,
    bos: int,
    eos: int,
    max_new_tokens: int,
    beam: int = 1,
    length_penalty: float = 1.0,
    sampling: SamplingParams | None = None,
    seed: int | None = None,
) -> list[list[int]]:
    """New token ids for each source (eos included as the last id when produced).

    bos: the decoder start token; beam >= 2: beam search (deterministic: sampling must be None or
    temperature 0), scored sum logprob / len**length_penalty; sampling None or temperature 0:
    greedy."""
    _check(model, sources, max_new_tokens, bos, eos, sampling)
    if beam < 1:
        raise ValueError(f"beam must be >= 1 (1: no beam search), got {beam}")
    if beam > 1 and sampling is not None and sampling.temperature != 0:
        raise ValueError(
            "beam search is deterministic: use sampling=None (or temperature 0) with beam >= 2"
        )
    was_training = model.training
    model.eval()
    try:
        if beam > 1:
            return _beam_search(model, sources, bos, eos, max_new_tokens, beam, length_penalty)
        out: list[list[int]] = [[] for _ in sources]
        for src, ids in _steps(model, sources, bos, eos, max_new_tokens, sampling, seed):
            for i, t in zip(src, ids):
                out[i].append(t)
        return out
    finally:
        model.train(was_training)


@dataclass
class _Beams:
    """The searches of the B sources still open: k running beams and k finished hypotheses each."""

    run_seq: torch.Tensor  # (B, k, max_new) running beams' tokens
    run_score: torch.Tensor  # (B, k) their summed log-probabilities
    fin_seq: torch.Tensor  # (B, k, max_new) finished hypotheses
    fin_score: torch.Tensor  # (B, k) their normalised scores; -1e9: an empty slot
    fin_len: torch.Tensor  # (B, k) their lengths
    fin_done: torch.Tensor  # (B, k) the slot holds a finished hypothesis

    @classmethod
    def start(cls, B: int, k: int, max_new: int, dev: torch.device) -> _Beams:
        run_score = torch.zeros(B, k, device=dev)
        run_score[:, 1:] = -1e9  # all beams start identical: expand only the first
        return cls(
            run_seq=torch.zeros(B, k, max_new, dtype=torch.long, device=dev),
            run_score=run_score,
            fin_seq=torch.zeros(B, k, max_new, dtype=torch.long, device=dev),
            fin_score=torch.full((B, k), -1e9, device=dev),
            fin_len=torch.zeros(B, k, dtype=torch.long, device=dev),
            fin_done=torch.zeros(B, k, dtype=torch.bool, device=dev),
        )

    def finish(
        self, seq: torch.Tensor, top: torch.Tensor, ends: torch.Tensor, t: int, lp: float
    ) -> None:
        """Merge the candidates that end at step t (`ends` (B, 2k) of seq (B, 2k, max_new), summed
        log-probabilities `top`), length-normalised, with the best finished so far."""
        k, max_new = self.fin_score.shape[1], seq.shape[2]
        score = torch.cat([self.fin_score, top / (t + 1) ** lp - 1e9 * (~ends).float()], 1)
        best = score.topk(k, dim=1).indices  # (B, k) of the 3k
        self.fin_score = score.gather(1, best)
        self.fin_seq = torch.cat([self.fin_seq, seq], 1).gather(
            1, best[:, :, None].expand(-1, -1, max_new)
        )
        lengths = torch.full_like(ends, t + 1, dtype=torch.long)
        self.fin_len = torch.cat([self.fin_len, lengths], 1).gather(1, best)
        self.fin_done = torch.cat([self.fin_done, ends], 1).gather(1, best)

    def open(self, t: int, lp: float) -> torch.Tensor:
        """(B,) whether a source's best running beam, at its current length, beats its worst
        finished hypothesis."""
        empty = torch.full_like(self.fin_score, -1e9)
        worst = torch.where(self.fin_done, self.fin_score, empty).min(1).values  # (B,)
        return self.run_score[:, 0] / (t + 1) ** lp > worst

    def keep(self, idx: torch.Tensor) -> None:
        """Keep the searches of sources idx (the others are closed)."""
        self.run_seq, self.run_score = self.run_seq[idx], self.run_score[idx]
        self.fin_seq, self.fin_score = self.fin_seq[idx], self.fin_score[idx]
        self.fin_len, self.fin_done = self.fin_len[idx], self.fin_done[idx]


def _beam_search(
    model: EncoderDecoder,
    sources: Sequence[Sequence[int]],
    bos: int,
    eos: int,
    max_new: int,
    k: int,
    lp: float,
) -> list[list[int]]:
    memory: torch.Tensor | None  # None once the cache holds the cross-attention keys/values
    memory, mask = _encode(model, sources, k)
    B, dev, V = len(sources), memory.device, model.cfg.vocab_size
    cache = Seq2SeqCache.for_model(model, B * k, max_new)
    ids = torch.arange(B, device=dev)  # (B,) source of each open search
    beams = _Beams.start(B, k, max_new, dev)
    out_seq = torch.zeros(B, max_new, dtype=torch.long, device=dev)
    out_len = torch.zeros(B, dtype=torch.long, device=dev)
    first_k = torch.arange(2 * k, device=dev) < k  # (2k,) only these candidates may finish
    tok = torch.full((B * k, 1), bos, dtype=torch.long, device=dev)
    for t in range(max_new):
        logits = model.logits(model.decode(tok, memory, mask, cache=cache)[:, -1])  # (N, V)
        memory = None
        logp = torch.log_softmax(logits.float(), dim=-1).view(-1, k, V)
        logp = logp + beams.run_score[:, :, None]  # (B, k, V)
        top, index = logp.view(-1, k * V).topk(2 * k, dim=1)  # (B, 2k)
        origin, token = index // V, index % V  # (B, 2k) beam continued, token appended
        seq = beams.run_seq.gather(1, origin[:, :, None].expand(-1, -1, max_new))  # (B, 2k, .)
        seq[:, :, t] = token
        hits = (token == eos) | (t == max_new - 1)  # (B, 2k) candidates that end here
        ends = hits & first_k  # (B, 2k) the first k candidates that end are finished
        if bool(ends.any()):  # most steps finish nothing
            beams.finish(seq, top, ends, t, lp)
        if t == max_new - 1:
            break
        # running: the best k candidates that do not end
        live = (top - 1e9 * hits.float()).topk(k, dim=1)  # (B, k)
        beams.run_score, pick = live.values, live.indices
        beams.run_seq = seq.gather(1, pick[:, :, None].expand(-1, -1, max_new))
        parent = origin.gather(1, pick) + torch.arange(ids.shape[0], device=dev)[:, None] * k
        cache.reorder(parent.view(-1), t + 1)  # (B * k,) rows continued
        tok = token.gather(1, pick).view(-1, 1)
        open_ = beams.open(t, lp)
        if not bool(open_.all()):  # drop closed sources: their best hypotheses are final
            done = (~open_).nonzero().squeeze(1)
            out_seq[ids[done]], out_len[ids[done]] = beams.fin_seq[done, 0], beams.fin_len[done, 0]
            keep = open_.nonzero().squeeze(1)
            if keep.numel() == 0:
                return _rows(out_seq, out_len)
            rows = (keep[:, None] * k + torch.arange(k, device=dev)).view(-1)  # (N',)
            cache.select(rows)
            mask, tok, ids = mask[rows], tok[rows], ids[keep]
            beams.keep(keep)
    out_seq[ids], out_len[ids] = beams.fin_seq[:, 0], beams.fin_len[:, 0]
    return _rows(out_seq, out_len)


def _rows(seq: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    return [row[:n] for row, n in zip(seq.tolist(), lengths.tolist())]
