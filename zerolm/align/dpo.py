"""DPO (Rafailov et al. 2023): align a chat model on preference pairs directly, without a reward
model or sampling, as a stage on the one Trainer.

The loss (zerolm/align/losses.py dpo_loss) compares the policy's summed log-probabilities of the
chosen and rejected replies (response tokens only, with their end of turn) with a frozen
reference's.
The reference log-probs are either
- `cached` (default): computed once before training, two floats per pair. The reference is the
  base model, which is also where the policy starts, so no second copy of the weights is kept;
- `live`: computed at every step, from the base with LoRA adapters disabled (no second copy),
  or from a frozen copy when all weights train. bench/align.py measures both.
`align.reference` names another reference model; it must share the policy's tokenizer.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from zerolm.align.losses import dpo_loss, sequence_logprobs
from zerolm.align.reward import encode_replies
from zerolm.align.stage import encoded_pairs, reference_dir, reference_logits, start_stage
from zerolm.data.loader import Shuffled
from zerolm.data.prefs import Preference
from zerolm.eval.mode import eval_mode
from zerolm.eval.replies import response_batch
from zerolm.inspect.accounting import account
from zerolm.model import load_model
from zerolm.tokenizer import Tokenizer
from zerolm.train.fingerprint import stage_fingerprint
from zerolm.train.losses import LossResult
from zerolm.train.run import Stage, StageResult, load_trainable, open_out, run, save_trainable

log = logging.getLogger(__name__)


def encode_dpo_pair(
    tok: Tokenizer, pair: Preference, window: int
) -> tuple[list[int], list[int], int] | None:
    """(chosen conversation ids, rejected conversation ids, prompt length: where the replies
    start) or None when either does not fit in the window."""
    enc = encode_replies(tok, pair, window)
    if enc is None:
        return None
    (chosen, start), (rejected, start_r) = enc
    if start != start_r:
        raise ValueError(
            "the chat template renders the prompt differently before the chosen and the rejected "
            "reply: DPO needs one prompt; fix the template"
        )
    return chosen, rejected, start


def dpo_collate(picked: list[tuple]) -> tuple:
    """Items (chosen, rejected, prompt_len[, ref_chosen, ref_rejected]) -> (x, y, mask, ref) with
    the B chosen rows first and the B rejected after; ref (2B,) cached log-probs, or None."""
    seqs = [it[0] for it in picked] + [it[1] for it in picked]
    x, y, mask = response_batch(seqs, [it[2] for it in picked] * 2)
    ref = (
        torch.tensor([it[3] for it in picked] + [it[4] for it in picked])
        if len(picked[0]) > 3
        else None
    )
    return x, y, mask, ref


def response_logprobs(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """(B,) summed log-probs of each row's response tokens."""
    device = next(model.parameters()).device
    return sequence_logprobs(model(x.to(device)), y.to(device), mask.to(device))


def with_reference(
    items: list[tuple], ref: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 32
) -> list[tuple]:
    """Each item + its reference log-probs (chosen, rejected), computed once."""
    out = []
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        x, y, mask, _ = dpo_collate(chunk)
        lp = sequence_logprobs(ref(x), y, mask).tolist()
        out += [(*it, lp[j], lp[len(chunk) + j]) for j, it in enumerate(chunk)]
    return out


class DPOLoss:
    """The Trainer's loss: (model, batch) -> the DPO loss over the reply tokens, with margin,
    accuracy and rewards; the reference log-probs come with the batch (cached) or from the
    `reference` logits (live)."""

    def __init__(self, beta: float, reference=None):
        self.beta, self.reference = beta, reference

    def __call__(self, model: nn.Module, batch):
        x, y, mask, ref = batch
        lp = response_logprobs(model, x, y, mask)  # (2B,)
        if ref is None:
            ref = sequence_logprobs(self.reference(x), y, mask)
        ref = ref.to(lp.device, lp.dtype)
        B = len(lp) // 2
        loss, stats = dpo_loss(lp[:B], lp[B:], ref[:B], ref[B:], self.beta)
        # counted: the reply tokens (tokens/s); the loss is a mean over the B pairs
        return LossResult(loss, mask.sum(), stats, weight=B)


@torch.no_grad()
def dpo_eval(model: nn.Module, items: list[tuple], loss: DPOLoss, batch_size: int = 16) -> dict:
    """Held-out DPO loss, accuracy (chosen's implicit reward above rejected's), margin and
    rewards."""
    sums: defaultdict[str, float] = defaultdict(float)
    with eval_mode(model):
        for i in range(0, len(items), batch_size):
            chunk = items[i : i + batch_size]
            out = loss(model, dpo_collate(chunk))
            sums["loss"] += out.loss.item() * len(chunk)
            for k, v in out.stats.items():
                sums[k] += v.item() * len(chunk)
    return {f"val_{k}": v / len(items) for k, v in sums.items()}


def train_dpo(cfg, progress: bool = True) -> StageResult:
    """`zerolm dpo`: the base (SFT) model aligned on preference pairs; OUT/model (+ adapters)."""
    _, base, tok = start_stage(
        cfg, "the SFT model: the policy's start and, by default, the reference"
    )
    ref_dir = reference_dir(cfg)
    enc, summary = encoded_pairs(cfg, base, tok, encode_dpo_pair)
    policy, lora = load_trainable(cfg, base)
    live = cfg.align.reference_logprobs == "live"
    # a second copy only where the policy cannot stand in: another reference, or live with all
    # weights training
    ref_model = (
        load_model(ref_dir).requires_grad_(False)
        if ref_dir != base or (live and lora is None)
        else None
    )
    ref = reference_logits(policy, ref_model)
    del ref_model  # held by `ref` while it is needed
    if not live:  # before training: the policy is still the base (LoRA: B = 0)
        enc = {
            split: with_reference(items, ref, cfg.train.batch_size) for split, items in enc.items()
        }
    loss = DPOLoss(cfg.align.beta, ref if live else None)
    del ref  # not live: the cached log-probs stand in, so a reference copy is freed here
    open_out(cfg)
    val, bs = enc["val"], cfg.train.batch_size
    stage = Stage(
        policy,
        Shuffled(enc["train"], bs, cfg.seed, collate=dpo_collate),
        loss,
        save=partial(save_trainable, policy, tok=tok),
        evaluate=partial(dpo_eval, items=val, loss=loss, batch_size=bs) if val else None,
        final=partial(dpo_eval, items=val, loss=loss, batch_size=bs) if val else None,
        flops_per_token=account(policy)["train_flops_per_token"],
        fingerprint=stage_fingerprint(cfg, tok, ("align", "lora", "poems")),
        info={"lora": lora, "reference": str(ref_dir), **summary},
        row_groups=2,  # dpo_collate / pair_collate: B chosen rows, then B rejected
    )
    result = run(cfg, stage, progress)
    log.info("held-out pairs: %s", " | ".join(f"{k} {v:.4f}" for k, v in result.final.items()))
    return result
