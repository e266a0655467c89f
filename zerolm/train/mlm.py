"""BERT pretraining (`zerolm pretrain --model.arch=bert`): masked-LM + next-sentence prediction on
the prepared documents, on the one Trainer; the model lands in OUT/model like every other stage.

Legend: B sequences, T tokens, D d_model, V vocabulary, N predicted (selected) tokens.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from zerolm.config import Config
from zerolm.data.collate import IGNORE
from zerolm.data.mlm import BertIds, pair_ids
from zerolm.data.mlm_batches import PairBatches, fixed_batches
from zerolm.data.nsp import SentenceCorpus
from zerolm.data.prepare import prepare, read_docs
from zerolm.dist.group import is_main, main_first
from zerolm.eval.mode import eval_mode
from zerolm.inspect.accounting import account
from zerolm.model import save_model
from zerolm.model.bert import Bert
from zerolm.tokenizer import Tokenizer
from zerolm.train.fingerprint import pretrain_data_fingerprint, stage_fingerprint
from zerolm.train.losses import LossResult
from zerolm.train.run import Stage, StageResult, begin, log_model, new_model, open_out, run

log = logging.getLogger(__name__)


def _mlm_nsp(model: Bert, batch):
    """(MLM logits (N, V), MLM labels (N,), NSP logits (B, 2), NSP labels (B,)) of a batch from
    zerolm.data.mlm: the vocabulary projection runs only at the N selected positions (over all
    B*T positions it would be the most expensive matmul of the step)."""
    device = next(model.parameters()).device
    ids, segments, attention, labels, nsp_labels = (t.to(device) for t in batch)
    h = model.hidden(ids, segments, attention)  # (B, T, D)
    selected = labels != IGNORE  # (B, T)
    return model.mlm_logits(h[selected]), labels[selected], model.nsp_logits(h), nsp_labels


def mlm_nsp_loss(model: Bert, batch, nsp: bool = True) -> LossResult:
    """The Trainer's loss: mean cross entropy over the selected (masked) tokens + NSP cross
    entropy over the pairs (nsp=False: MLM only); counted: the N selected tokens; stats: mlm,
    nsp, nsp_acc."""
    mlm_logits, mlm_labels, nsp_logits, nsp_labels = _mlm_nsp(model, batch)
    n = mlm_labels.new_tensor(mlm_labels.numel())
    mlm = F.cross_entropy(mlm_logits.float(), mlm_labels, reduction="sum") / n.clamp(min=1)
    if not nsp:
        return LossResult(mlm, n, {"mlm": mlm.detach()})
    nsp_logits = nsp_logits.float()
    nsp_loss = F.cross_entropy(nsp_logits, nsp_labels)
    acc = (nsp_logits.argmax(-1) == nsp_labels).float().mean()
    stats = {"mlm": mlm.detach(), "nsp": nsp_loss.detach(), "nsp_acc": acc}
    return LossResult(mlm + nsp_loss, n, stats)


@torch.no_grad()
def evaluate_mlm(model: Bert, batches: list, nsp: bool = True) -> dict:
    """Held-out MLM loss (nats per selected token), MLM accuracy (argmax == original token, over
    the selected tokens, [MASK]ed or not), NSP loss and accuracy over the pairs."""
    nats = correct = n = nsp_nats = nsp_correct = pairs = 0.0
    with eval_mode(model):
        for batch in batches:
            mlm_logits, mlm_labels, nsp_logits, nsp_labels = _mlm_nsp(model, batch)
            nats += float(F.cross_entropy(mlm_logits.float(), mlm_labels, reduction="sum"))
            correct += float((mlm_logits.argmax(-1) == mlm_labels).sum())
            n += mlm_labels.numel()
            nsp_nats += float(F.cross_entropy(nsp_logits.float(), nsp_labels, reduction="sum"))
            nsp_correct += float((nsp_logits.argmax(-1) == nsp_labels).sum())
            pairs += len(nsp_labels)
    out = {"val_mlm_loss": nats / max(n, 1), "val_mlm_acc": correct / max(n, 1)}
    if nsp:
        out |= {
            "val_nsp_loss": nsp_nats / max(pairs, 1),
            "val_nsp_acc": nsp_correct / max(pairs, 1),
        }
    return out


@torch.no_grad()
def fill_mask(model: Bert, tok: Tokenizer, texts: list[str], every: int = 5) -> list[str]:
    """Mask every `every`-th token of each text and show the model's guesses: 床前[明→明]月光."""
    with eval_mode(model):
        return [_fill_one(model, tok, text, every) for text in texts]


def _fill_one(model: Bert, tok: Tokenizer, text: str, every: int) -> str:
    device = next(model.parameters()).device
    ids = tok.encode(text)[: model.cfg.max_seq_len - 2]
    x = torch.tensor([pair_ids(ids, [], BertIds.of(tok))[0]], device=device)  # [CLS] text [SEP]
    where = torch.arange(1, x.shape[1] - 1, every, device=device)  # text tokens 0, every, ...
    x_masked = x.clone()
    x_masked[0, where] = tok.mask_id
    guess = model.mlm_logits(model.hidden(x_masked)[0, where]).argmax(-1).tolist()
    shown = [tok.decode([t]) for t in ids]
    for w, g in zip(where.tolist(), guess):
        shown[w - 1] = f"[{shown[w - 1]}→{tok.decode([g])}]"
    return "".join(shown) if tok.kind != "wordpiece" or not text.isascii() else " ".join(shown)


def _flops_per_selected_token(model: Bert, mask_prob: float) -> float:
    """Training FLOPs per predicted token (the Trainer's token count here): the encoder's per
    input token / mask_prob (inputs per predicted token) + the MLM head, which runs only at
    predicted positions."""
    cfg = model.cfg
    per_token = account(model)["train_flops_per_token"]  # counts the MLM head at every position
    head = 6 * (cfg.vocab_size * cfg.d_model + cfg.d_model * cfg.d_model)
    return (per_token - head) / mask_prob + head


def pretrain_bert(cfg: Config, progress: bool = True) -> StageResult:
    """Prepare documents and tokenizer (no shards), pretrain a bert model with MLM (+ NSP), save
    OUT/model; returns the last training row and the final held-out metrics (whole val split)."""
    data_fp = pretrain_data_fingerprint(cfg)
    out = begin(cfg, data_fp)  # before prepare rebuilds the docs and tokenizer of changed inputs
    with main_first():  # under torchrun: rank 0 prepares, the others find it prepared
        prepare(cfg, stages=("docs", "tokenizer"), progress=progress and is_main())
    open_out(cfg)
    tok = Tokenizer.load(out / "tokenizer")
    if tok.kind != "wordpiece":
        log.info("bert with a %s tokenizer (BERT's own is --tokenizer.kind=wordpiece)", tok.kind)
    model = new_model(cfg, cfg.model, tok.vocab_size)
    assert isinstance(model, Bert)  # pretrain dispatches here on arch=bert
    log_model(model, "bert")
    batches, val = _pair_batches(cfg, out, tok, model.cfg.max_seq_len)
    nsp = cfg.mlm.objective == "mlm+nsp"
    first_val = next(read_docs(out / "docs" / "val.jsonl"), None)
    result = run(
        cfg,
        Stage(
            model,
            batches,
            partial(mlm_nsp_loss, nsp=nsp),
            save=partial(save_model, model, tokenizer=tok),
            evaluate=partial(evaluate_mlm, batches=val[: cfg.train.eval_batches], nsp=nsp)
            if val
            else None,
            final=partial(evaluate_mlm, batches=val, nsp=nsp) if val else None,
            samples=partial(fill_mask, tok=tok, texts=[first_val["text"][:64]])
            if first_val
            else None,
            flops_per_token=_flops_per_selected_token(model, cfg.mlm.mask_prob),
            fingerprint={**data_fp, **stage_fingerprint(cfg, tok, ("mlm",))},
        ),
        progress,
    )
    log.info(
        "final held-out (whole val split): %s",
        " | ".join(f"{k} {v:.4f}" for k, v in result.final.items()),
    )
    return result


def _pair_batches(cfg: Config, out: Path, tok: Tokenizer, seq_len: int) -> tuple[PairBatches, list]:
    """The training pairs (fresh each epoch) and the fixed held-out batches, of the prepared
    docs."""
    m, nsp = cfg.mlm, cfg.mlm.objective == "mlm+nsp"
    corpora = {
        split: SentenceCorpus.from_texts(
            (d["text"] for d in read_docs(out / "docs" / f"{split}.jsonl")), tok
        )
        for split in ("train", "val")
    }
    common: dict[str, Any] = dict(  # the keyword arguments both batchings take
        batch_size=cfg.train.batch_size,
        max_seq_len=seq_len,
        bert_ids=BertIds.of(tok),
        seed=cfg.seed,
        mask_prob=m.mask_prob,
        nsp=nsp,
    )
    batches = PairBatches(corpora["train"], **common, short_seq_prob=m.short_seq_prob)
    val = fixed_batches(corpora["val"], **common)
    log.info(
        "sentence pairs: train %d documents -> %d pairs per epoch (%d batches); val %d documents "
        "-> %d pairs",
        corpora["train"].n_docs,
        *batches.epoch_size(),
        corpora["val"].n_docs,
        sum(len(b[4]) for b in val),
    )
    return batches, val
