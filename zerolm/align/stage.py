"""What the alignment stages (reward, dpo, ppo) share: where their pairs and prompts come from,
a resumable shuffled batch iterator, response-token batches, sampled replies and the KL to a
reference, the base / reference models and their tokenizer check, and the start and end of a
stage's output directory.

Legend: B sequences, T tokens (shifted by one: position t predicts token t + 1).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from zerolm.align.data import Pair
from zerolm.data.loader import Shuffled  # noqa: F401  (re-exported: the stages' batch iterator)
from zerolm.model import load_model, save_model
from zerolm.tokenizer import Tokenizer

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- data
def poem_docs_dir(cfg) -> Path:
    """Prepared docs/ for the poem pairs and prompts: align.poem_docs, else next to the base model's run."""
    base = Path(cfg.align.base_model)
    candidates = (
        [Path(cfg.align.poem_docs)]
        if cfg.align.poem_docs
        else [base.parent / "docs", base.parent.parent / "docs"]
    )
    for d in candidates:
        if (d / "train.jsonl").is_file() and (d / "val.jsonl").is_file():
            return d
    raise ValueError(
        f"the 'poems' pairs need prepared documents with title/author metadata; none at "
        f"{', '.join(str(c) for c in candidates)}: set --align.poem_docs=RUN/docs"
    )


def poem_requests(cfg, split: str) -> list[dict]:
    """Poem requests (zerolm.data.poems) from the run's training or held-out documents."""
    from zerolm.data.poems import eval_requests
    from zerolm.data.prepare import read_docs

    limit = cfg.align.poem_requests if split == "train" else cfg.align.poem_val_requests
    return eval_requests(read_docs(poem_docs_dir(cfg) / f"{split}.jsonl"), cfg.seed, limit)


def load_pairs(cfg, model, tok) -> tuple[list[Pair], list[Pair], dict]:
    """(train, val) pairs from align.data files, align.builtin sets and counts per source.
    Files and hhh are split by a hash of the pair; poem pairs are sampled from `model` on
    requests from the training documents (train) and the held-out ones (val)."""
    from zerolm.align.data import BUILTIN_PAIRS, keep_distinct, read_builtin_pairs, read_pairs
    from zerolm.align.poems import poem_pairs
    from zerolm.data.prepare import split_key

    a = cfg.align
    for name in a.builtin:
        if name not in (*BUILTIN_PAIRS, "poems"):
            raise ValueError(
                f"unknown preference set {name!r}; bundled: poems, {', '.join(BUILTIN_PAIRS)}"
            )
    if not a.data and not a.builtin:
        raise ValueError(
            "no preference pairs: give --align.data=FILE.jsonl and/or --align.builtin=poems,hhh"
        )
    train, val, counts = [], [], {}

    def add(name, pairs, skipped):
        for p in pairs:
            key = json.dumps([p.messages, p.chosen, p.rejected], ensure_ascii=False)
            (val if split_key(key) < a.val_fraction else train).append(p)
        counts[name] = len(pairs)
        if skipped:
            counts[f"{name} (identical, skipped)"] = skipped

    for path in a.data:
        add(str(path), *read_pairs(path))
    for name in a.builtin:
        if name == "poems":
            got = {
                split: poem_pairs(
                    model, tok, poem_requests(cfg, split), samples=a.samples, seed=cfg.seed
                )
                for split in ("train", "val")
            }
            train += got["train"][0]
            val += got["val"][0]
            counts["poems"] = {split: c for split, (_, c) in got.items()}
        else:
            add(name, *keep_distinct(read_builtin_pairs(name), name))
    return train, val, counts


def encoded_pairs(
    cfg, base: Path, tok: Tokenizer, encode: Callable
) -> tuple[dict[str, list], dict]:
    """{"train": [...], "val": [...]} of encode(tok, pair, window) for every pair that fits the
    window (None: it does not), and a summary of where the pairs came from."""
    from zerolm.transforms.layout import decode_layout

    sampler = decode_layout(
        load_model(base)
    )  # samples the poem answers; the stage trains its own copy
    train_p, val_p, counts = load_pairs(cfg, sampler, tok)
    window = sampler.cfg.max_seq_len
    del sampler
    enc = {
        name: [e for p in ps if (e := encode(tok, p, window)) is not None]
        for name, ps in (("train", train_p), ("val", val_p))
    }
    too_long = len(train_p) + len(val_p) - len(enc["train"]) - len(enc["val"])
    log.info(
        "preference pairs: %s; train %d, val %d (%d skipped: longer than the %d-token window)",
        counts,
        len(enc["train"]),
        len(enc["val"]),
        too_long,
        window,
    )
    return enc, {
        "pairs": counts,
        "train_pairs": len(enc["train"]),
        "val_pairs": len(enc["val"]),
        "too_long": too_long,
    }


# ---------------------------------------------------------------- response tokens
def response_batch(
    seqs: Sequence[Sequence[int]], prompt_lens: Sequence[int], pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Whole conversations (prompt + response) -> (x, y, mask), each (B, T = longest - 1), right
    padded: x[t] predicts y[t] = seq[t + 1], and mask is 1 where y is a response token (the
    tokens from prompt_lens[i] on)."""
    T = max(map(len, seqs)) - 1
    x = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    y = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T)
    for i, (s, p) in enumerate(zip(seqs, prompt_lens)):
        if not 1 <= p < len(s):
            raise ValueError(
                f"sequence {i}: prompt of {p} tokens leaves no response in {len(s)} tokens"
            )
        s = torch.as_tensor(s)
        x[i, : len(s) - 1], y[i, : len(s) - 1] = s[:-1], s[1:]
        mask[i, p - 1 : len(s) - 1] = 1
    return x, y, mask


def sample_replies(
    model,
    tok: Tokenizer,
    conversations: Sequence[Sequence[dict]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
) -> tuple[list[list[int]], list[int], list[str]]:
    """One sampled reply per conversation, through the engine (batched, KV-cached, seeded):
    (prompt + reply ids, including the <|end|> when the model stopped; prompt lengths; reply
    texts). max_new_tokens is lowered to the room the longest prompt of a batch leaves."""
    from zerolm.infer.chat import chat_request
    from zerolm.infer.engine import Engine
    from zerolm.infer.sampling import SamplingParams
    from zerolm.tokenizer.chat import prompt_ids

    window, seqs, lens, texts = model.cfg.max_seq_len, [], [], []
    for i in range(0, len(conversations), batch_size):
        prompts = [prompt_ids(tok, c) for c in conversations[i : i + batch_size]]
        room = window - max(map(len, prompts))
        if room < 1:
            raise ValueError(
                f"a prompt of {window - room} tokens leaves no room to reply in the {window}-token window"
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
def reply_kl(model, ref, seqs: list[list[int]], lens: list[int], batch_size: int = 32) -> dict:
    """KL(model || ref) per reply, in nats, of replies sampled from `model` (sample_replies):
    the sum over their tokens of log p_model - log p_ref, averaged over the replies."""
    from zerolm.align.losses import token_logprobs

    total, tokens = 0.0, 0
    for i in range(0, len(seqs), batch_size):
        x, y, mask = response_batch(seqs[i : i + batch_size], lens[i : i + batch_size])
        diff = token_logprobs(model(x), y) - token_logprobs(
            ref(x), y
        )  # ref: a model or reference_logits
        total += float((diff * mask).sum())
        tokens += int(mask.sum())
    return {"kl": total / len(seqs), "reply_tokens": tokens / len(seqs)}


def kl_to_reference(
    model,
    ref,
    tok: Tokenizer,
    conversations: Sequence[Sequence[dict]],
    *,
    max_new_tokens: int = 96,
    seed: int = 0,
    batch_size: int = 32,
) -> dict:
    """Monte-Carlo KL(model || ref) per reply: replies sampled from `model` at temperature 1, then reply_kl."""
    seqs, lens, _ = sample_replies(
        model, tok, conversations, max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size
    )
    return reply_kl(model, ref, seqs, lens, batch_size)


# ---------------------------------------------------------------- models
def check_tokenizers(policy_dir: str | Path, other_dir: str | Path, role: str) -> None:
    """A reference or reward model must read the same token ids as the policy."""
    a, b = Tokenizer.load(policy_dir), Tokenizer.load(other_dir)
    if a.sha256 != b.sha256:
        raise ValueError(
            f"the {role} {other_dir} has a different tokenizer than the policy {policy_dir} "
            f"(vocab {b.vocab_size} vs {a.vocab_size}; sha256 {b.sha256[:12]} vs {a.sha256[:12]}): "
            f"use a {role} fine-tuned from the same base model"
        )


def reference_logits(policy, ref_model=None):
    """x (B, T) -> the frozen reference's logits, without gradients: from `ref_model`, else from
    the policy itself with its LoRA adapters disabled (or as it is, before any training step)."""
    from zerolm.transforms.lora import adapters_disabled, lora_config_of

    model = policy if ref_model is None else ref_model
    lora = ref_model is None and lora_config_of(policy) is not None

    @torch.no_grad()
    def ref(x):
        was = model.training
        model.eval()
        with adapters_disabled(model) if lora else contextlib.nullcontext():
            out = model(x.to(next(model.parameters()).device))
        model.train(was)
        return out

    return ref


def reference_dir(cfg) -> Path:
    """align.reference, else the base model; checked to share the base model's tokenizer."""
    ref = Path(cfg.align.reference or cfg.align.base_model)
    if ref != Path(cfg.align.base_model):
        if not (ref / "config.json").is_file():
            raise ValueError(
                f"reference model {ref} not found (a zerolm model directory with config.json)"
            )
        check_tokenizers(cfg.align.base_model, ref, "reference model")
    return ref


def start_stage(cfg, what: str) -> tuple[Path, Path, Tokenizer]:
    """(out dir, base model dir, tokenizer) after the checks every stage makes before writing."""
    from zerolm.train.checkpoint import list_checkpoints

    if not cfg.align.base_model:
        raise ValueError(
            f"no base model: give --align.base_model=DIR ({what}, e.g. runs/speedrun/sft/model)"
        )
    out, base = Path(cfg.out_dir), Path(cfg.align.base_model)
    if not (base / "config.json").is_file():
        raise ValueError(f"base model {base} not found (a zerolm model directory with config.json)")
    if list_checkpoints(out) and not cfg.train.resume:
        raise ValueError(
            f"{out} already holds checkpoints: continue with --train.resume=true, or use a new --out"
        )
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    return out, base, Tokenizer.load(base)


def load_policy(cfg, base: Path):
    """The base model to train: all of it, or LoRA adapters on it (lora.rank > 0); (model, report)."""
    model = load_model(base)
    if not cfg.lora.rank:
        return model, None
    from zerolm.transforms.lora import apply_lora, trainable_report

    apply_lora(model, cfg.lora, seed=cfg.seed)
    report = trainable_report(model)
    log.info("LoRA: %s", json.dumps(report))
    return model, report


def save_policy(model, out: Path, tok: Tokenizer) -> Path:
    """OUT/model as a plain model (LoRA adapters saved to OUT/adapters.safetensors, then merged)."""
    from zerolm.transforms.lora import lora_config_of, merge_lora, save_adapters

    if lora_config_of(model) is not None:
        save_adapters(model, out / "adapters.safetensors")
        merge_lora(model)
    return save_model(model, out / "model", tok)
