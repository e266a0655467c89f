"""What the alignment stages (reward, dpo, ppo) share: where their pairs and prompts come from,
the base and reference models, and the checks a stage makes before it writes. (Sampled replies
and their KL to a reference are measurements: zerolm/eval/replies.py.)
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from zerolm.data.prefs import (
    BUILTIN_PAIRS,
    Preference,
    keep_distinct,
    read_builtin_pairs,
    read_pairs,
)
from zerolm.data.split import split_by_hash
from zerolm.eval.mode import eval_mode
from zerolm.model import load_model
from zerolm.model.protocol import LanguageModel
from zerolm.tasks import TASKS
from zerolm.tokenizer import Tokenizer, check_tokenizers
from zerolm.train.run import begin
from zerolm.transforms.layout import decode_layout
from zerolm.transforms.lora import adapters_disabled, lora_config_of

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- data
def load_pairs(cfg, model: LanguageModel, tok) -> tuple[list[Preference], list[Preference], dict]:
    """(train, val) pairs from align.data files, align.builtin sets and counts per source.
    Files and hhh are split by a hash of the pair; poem pairs are sampled from `model` on
    requests from the training documents (train) and the held-out ones (val)."""
    a = cfg.align
    for name in a.builtin:
        if name not in (*BUILTIN_PAIRS, *TASKS):
            raise ValueError(
                f"unknown preference set {name!r}; bundled: poems, {', '.join(BUILTIN_PAIRS)}"
            )
    if not a.data and not a.builtin:
        raise ValueError(
            "no preference pairs: give --align.data=FILE.jsonl and/or --align.builtin=poems,hhh"
        )
    train, val, counts = [], [], {}

    def add(name, pairs, skipped):
        t, v = split_by_hash(
            pairs,
            lambda p: json.dumps([p.messages, p.chosen, p.rejected], ensure_ascii=False),
            a.val_fraction,
        )
        train.extend(t)
        val.extend(v)
        counts[name] = len(pairs)
        if skipped:
            counts[f"{name} (identical, skipped)"] = skipped

    for path in a.data:
        add(str(path), *read_pairs(path))
    for name in a.builtin:
        if name in TASKS:
            got = {
                split: TASKS[name].preference_pairs(cfg, model, tok, split)
                for split in ("train", "val")
            }
            train += got["train"][0]
            val += got["val"][0]
            counts[name] = {split: c for split, (_, c) in got.items()}
        else:
            add(name, *keep_distinct(read_builtin_pairs(name), name))
    return train, val, counts


def encoded_pairs(
    cfg, base: Path, tok: Tokenizer, encode: Callable
) -> tuple[dict[str, list], dict]:
    """{"train": [...], "val": [...]} of encode(tok, pair, window) for every pair that fits the
    window (None: it does not), and a summary of where the pairs came from."""
    sampler = decode_layout(
        load_model(base)
    )  # samples the poem answers; the stage trains its own copy
    train_p, val_p, counts = load_pairs(cfg, sampler, tok)
    window = sampler.cfg.max_seq_len
    del sampler

    def located(p: Preference):
        try:
            return encode(tok, p, window)
        except ValueError as e:  # e.g. a role its chat template refuses: name the row
            raise ValueError(f"{p.where or 'a preference pair'}: {e}") from None

    enc = {
        name: [e for p in ps if (e := located(p)) is not None]
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


# ---------------------------------------------------------------- models
def reference_logits(
    policy: nn.Module, ref_model: nn.Module | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """x (B, T) -> the frozen reference's logits, without gradients: from `ref_model`, else from
    the policy itself with its LoRA adapters disabled (or as it is, before any training step)."""
    model = policy if ref_model is None else ref_model
    lora = ref_model is None and lora_config_of(policy) is not None

    @torch.no_grad()
    def ref(x):
        with eval_mode(model), adapters_disabled(model) if lora else contextlib.nullcontext():
            return model(x.to(next(model.parameters()).device))

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
    if not cfg.align.base_model:
        raise ValueError(
            f"no base model: give --align.base_model=DIR ({what}, e.g. runs/speedrun/sft/model)"
        )
    base = Path(cfg.align.base_model)
    if not (base / "config.json").is_file():
        raise ValueError(f"base model {base} not found (a zerolm model directory with config.json)")
    return begin(cfg), base, Tokenizer.load(base)
