"""`zerolm prune`: a model directory becomes a pruned one ([prune] and [calib] sections).

magnitude / wanda zero weights (unstructured, or 2:4) and save an ordinary float model of the same
bytes and speed; structured removes FFN channels and kv groups (a smaller, faster dense model),
then optionally fine-tunes it for --recover-steps steps on the one Trainer ([train] section) on
windows of the calibration text.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from zerolm.commands.common import add_recipe_args, alias, model_arg, model_dir, resolve_config
from zerolm.config import CalibConfig, DataConfig, TrainConfig

log = logging.getLogger(__name__)

DENSE_NOTE = (
    "note: the zeros are stored and multiplied like any other weight: a dense CPU kernel gains "
    "nothing from unstructured sparsity (same bytes, same speed); this is a quality measurement. "
    "For a smaller, faster model use --method structured."
)
# the prune command's own defaults below the TOML: recovery is a short, gentle fine-tune
RECOVER_DEFAULTS = {
    "train": {"lr": 1e-4, "warmup_steps": 10, "batch_size": 8, "eval_every": 0, "log_every": 10}
}


def calibration_ids(cfg: CalibConfig, tok, seq_len: int, seqs: int, seed: int) -> torch.Tensor:
    """(seqs, seq_len) token ids: windows at seeded random offsets of the calibration text (the
    files of cfg.data, else the held-out split of the bundled cfg.corpus), documents joined by
    eos. ValueError when the text holds fewer than seq_len tokens."""
    from zerolm.data.sources import iter_docs
    from zerolm.transforms.resize import split_corpus

    if cfg.data:
        texts = [d.text for d in iter_docs(DataConfig(inputs=cfg.data))]
    else:
        texts = [t for name in cfg.corpus for t in split_corpus(name)[1]]
    ids = [i for row in tok.encode_batch(texts) for i in [*row, tok.eos_id]]
    if len(ids) < seq_len:
        where = ", ".join(cfg.data or cfg.corpus)
        raise ValueError(
            f"calibration text too short: {where} gives {len(ids)} tokens, fewer than one "
            f"{seq_len}-token window; add text with --calib.data or lower --calib.seq_len"
        )
    stream = torch.tensor(ids)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len + 1, (seqs,), generator=gen)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


def windows(ids: torch.Tensor, batch_size: int, seed: int) -> Iterator[tuple]:
    """Endless (x, y) next-token micro-batches of `batch_size` rows of ids (N, T), reshuffled each
    pass with `seed`."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(ids), generator=gen)
        for s in range(0, len(order) - batch_size + 1, batch_size):
            rows = ids[order[s : s + batch_size]]
            yield rows[:, :-1], rows[:, 1:]


def recover(model, ids: torch.Tensor, train: TrainConfig, seed: int = 0) -> dict:
    """Fine-tune `model` in place for train.steps steps on windows of ids (N, T) with the
    pretraining loss, on the one Trainer (its checkpoints go to a temporary directory). Returns
    the Trainer's last log row."""
    from zerolm.train.batches import Stream
    from zerolm.train.losses import lm_loss
    from zerolm.train.trainer import Trainer

    if len(ids) < train.batch_size:
        raise ValueError(
            f"recovery needs at least train.batch_size={train.batch_size} windows, got {len(ids)}"
        )
    with tempfile.TemporaryDirectory(prefix="zerolm-recover-") as tmp:
        batches = Stream(windows(ids, train.batch_size, seed))
        trainer = Trainer(model, train, tmp, batches=batches, loss_fn=lm_loss, progress=False)
        row = trainer.fit()
    model.eval()
    return row


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _structured(model, cfg, tok, calib: torch.Tensor, seq_len: int) -> None:
    """Remove channels and kv groups, then recover for prune.recover_steps; prints both."""
    import dataclasses

    from zerolm.transforms.structured import prune_structured

    pc, cc = cfg.prune, cfg.calib
    start, before = time.perf_counter(), _params(model)
    prune_structured(model, pc, calib)
    c = model.cfg
    print(
        f"structured: {before:,} -> {_params(model):,} parameters (d_ff {c.d_ff}, "
        f"{c.n_heads} heads / {c.n_kv_heads} kv) in {time.perf_counter() - start:.1f} s"
    )
    if not pc.recover_steps:
        return
    train = dataclasses.replace(cfg.train, steps=pc.recover_steps)
    n = pc.recover_steps * train.batch_size * train.grad_accum
    ids = calibration_ids(cc, tok, seq_len, n, cc.seed + 1)
    start = time.perf_counter()
    row = recover(model, ids, train, cfg.seed)
    print(
        f"recovery: {pc.recover_steps} steps on {n} calibration windows of {seq_len} tokens in "
        f"{time.perf_counter() - start:.1f} s, last loss {row.get('loss', float('nan')):.4f}"
    )


def main(args, extra) -> None:
    from zerolm.files import atomic_dir, writing_into
    from zerolm.model import load_model, save_model
    from zerolm.tokenizer import Tokenizer
    from zerolm.transforms.prune import (
        check_prunable,
        format_sparsity,
        prune_model,
        sparsity_report,
    )
    from zerolm.transforms.structured import removed_counts

    src, out = Path(model_dir(args)), Path(args.out)
    if out.exists() and (out.resolve() == src.resolve() or any(out.iterdir())):
        raise ValueError(f"--out {out} already exists: choose a new directory for the pruned model")
    cfg = resolve_config(args, extra, **RECOVER_DEFAULTS)
    pc, cc = cfg.prune, cfg.calib
    model = load_model(src)
    check_prunable(model, pc)
    if pc.method == "structured":
        removed_counts(model.cfg, pc)  # every check before the calibration text is read
    tok = Tokenizer.load(src)
    seq_len = min(cc.seq_len, model.cfg.max_seq_len)
    calib = (
        None if pc.method == "magnitude" else calibration_ids(cc, tok, seq_len, cc.seqs, cc.seed)
    )
    if pc.method == "structured":
        assert calib is not None
        _structured(model, cfg, tok, calib, seq_len)
    else:
        prune_model(model, pc, calib)
        print(format_sparsity(sparsity_report(model)))
        print(DENSE_NOTE)
    with writing_into(out.parent, "the pruned model"), atomic_dir(out) as tmp:
        save_model(model, tmp, tok)
    print(f"pruned model ({pc.method}) written to {out}")


def setup_arg_parser(sub) -> None:
    p = sub.add_parser(
        "prune",
        help="prune a model: magnitude / wanda / 2:4 (zeros) or structured (a smaller model)",
        description="prune a zerolm decoder: --method magnitude or wanda set --sparsity of each "
        "block linear's weights to zero (or --pattern 2:4) and save a float model of the same "
        "size and speed (a dense kernel gains nothing from zeros: quality figures only); "
        "--method structured removes --ffn-fraction of the FFN channels and --heads-fraction of "
        "the kv groups per block by their contribution on calibration text ([calib]), giving a "
        "smaller, faster model, then fine-tunes it for --recover-steps ([train] section)",
    )
    model_arg(p, "zerolm model directory")
    add_recipe_args(p)
    alias(p, "--method", key="prune.method", choices=["magnitude", "wanda", "structured"])
    alias(p, "--sparsity", key="prune.sparsity", type=float, help="share of zeros per layer")
    alias(p, "--pattern", key="prune.pattern", choices=["unstructured", "2:4"])
    alias(p, "--ffn-fraction", key="prune.ffn_fraction", type=float)
    alias(p, "--heads-fraction", key="prune.heads_fraction", type=float)
    alias(p, "--recover-steps", key="prune.recover_steps", type=int)
    alias(p, "--calib-data", key="calib.data", nargs="+", help="calibration .txt/.jsonl files")
    p.add_argument("--out", required=True, help="output model directory (new), written whole")
    p.set_defaults(run=main)
