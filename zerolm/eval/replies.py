"""Sampled replies and their KL to a reference model: the measurement the alignment stages train
against and tasks/poems/instruct.py reports.

Legend: B sequences, T tokens (shifted by one: position t predicts token t + 1), V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from zerolm.data.collate import pad_right
from zerolm.infer.chat import chat_request
from zerolm.infer.engine import Engine
from zerolm.infer.sampling import SamplingParams
from zerolm.model.protocol import LanguageModel
from zerolm.tokenizer import Tokenizer
from zerolm.tokenizer.chat import prompt_ids


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, T) log p(targets[t] | logits[t]) in float32; logits (B, T, V) aligned with
    targets (B, T)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)


def response_batch(
    seqs: Sequence[Sequence[int]], prompt_lens: Sequence[int], pad_id: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Whole conversations (prompt + response) -> (x, y, mask), each (B, T = longest - 1), right
    padded: x[t] predicts y[t] = seq[t + 1], and mask is 1 where y is a response token (the
    tokens from prompt_lens[i] on). Padding holds pad_id (the tokenizer's), else a filler."""
    T = max(map(len, seqs)) - 1
    mask = torch.zeros(len(seqs), T)
    for i, (s, p) in enumerate(zip(seqs, prompt_lens)):
        if not 1 <= p < len(s):
            raise ValueError(
                f"sequence {i}: prompt of {p} tokens leaves no response in {len(s)} tokens"
            )
        mask[i, p - 1 : len(s) - 1] = 1
    # padding is never read: right of every real token (causal) and masked out; the filler 0 is an
    # id of every vocabulary
    fill = 0 if pad_id is None else pad_id
    x = pad_right([s[:-1] for s in seqs], fill, T)
    y = pad_right([s[1:] for s in seqs], fill, T)
    return x, y, mask


def sample_replies(
    model: LanguageModel,
    tok: Tokenizer,
    conversations: Sequence[Sequence[dict]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
) -> tuple[list[list[int]], list[int], list[str]]:
    """One sampled reply per conversation, through the engine (batched, KV-cached, seeded):
    (prompt ids from the model's chat template + reply ids, including the stop token (its end
    of turn) when the model stopped; prompt lengths; reply texts). max_new_tokens is lowered to
    the room the longest prompt of a batch leaves."""
    window, seqs, lens, texts = model.cfg.max_seq_len, [], [], []
    for i in range(0, len(conversations), batch_size):
        prompts = [prompt_ids(tok, c) for c in conversations[i : i + batch_size]]
        room = window - max(map(len, prompts))
        if room < 1:
            raise ValueError(
                f"a prompt of {window - room} tokens leaves no room to reply in the {window}-token "
                "window"
            )
        req = chat_request(
            tok, min(max_new_tokens, room), SamplingParams(temperature=temperature), seed + i
        )
        stops = set(req.stop_token_ids)
        for p, out in zip(prompts, Engine(model).generate(prompts, req)):
            seqs.append(p + out)
            lens.append(len(p))
            texts.append(tok.decode([t for t in out if t not in stops]))
    return seqs, lens, texts


@torch.no_grad()
def reply_kl(
    model: LanguageModel,
    ref: Callable[[torch.Tensor], torch.Tensor],
    seqs: list[list[int]],
    lens: list[int],
    batch_size: int = 32,
) -> dict:
    """KL(model || ref) per reply, in nats, of replies sampled from `model` (sample_replies):
    the sum over their tokens of log p_model - log p_ref, averaged over the replies. `ref` is a
    model or any x -> logits (e.g. zerolm.align.stage.reference_logits)."""
    total, tokens = 0.0, 0
    for i in range(0, len(seqs), batch_size):
        x, y, mask = response_batch(seqs[i : i + batch_size], lens[i : i + batch_size])
        diff = token_logprobs(model(x), y) - token_logprobs(ref(x), y)
        total += float((diff * mask).sum())
        tokens += int(mask.sum())
    return {"kl": total / len(seqs), "reply_tokens": tokens / len(seqs)}


def kl_to_reference(
    model: LanguageModel,
    ref: Callable[[torch.Tensor], torch.Tensor],
    tok: Tokenizer,
    conversations: Sequence[Sequence[dict]],
    *,
    max_new_tokens: int = 96,
    seed: int = 0,
    batch_size: int = 32,
) -> dict:
    """Monte-Carlo KL(model || ref) per reply: replies sampled from `model` at temperature 1, then
    reply_kl."""
    seqs, lens, _ = sample_replies(
        model, tok, conversations, max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size
    )
    return reply_kl(model, ref, seqs, lens, batch_size)
