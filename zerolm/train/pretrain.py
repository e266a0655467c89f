"""`zerolm pretrain`: prepared shards -> a trained next-token model in OUT/model."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import torch

from zerolm.config import Config, save_config
from zerolm.data.loader import TokenBatches
from zerolm.data.prepare import prepare, read_docs
from zerolm.eval.perplexity import evaluate_lm
from zerolm.infer.engine import Engine, GenerateRequest
from zerolm.infer.sampling import SamplingParams
from zerolm.inspect.accounting import account
from zerolm.model import build_model, save_model
from zerolm.model.presets import arch_of
from zerolm.tokenizer import EOS, Tokenizer
from zerolm.train.fingerprint import check_start, pretrain_data_fingerprint
from zerolm.train.losses import lm_loss
from zerolm.train.trainer import Trainer

log = logging.getLogger(__name__)


def sample_texts(
    model, tok: Tokenizer, prompts: list[str], max_new_tokens: int = 48, seed: int = 0
) -> list[str]:
    """Continue each prompt (after an eos, i.e. at a document start) and decode up to the next eos."""
    eos = tok.token_id(EOS)
    req = GenerateRequest(
        max_new_tokens=min(max_new_tokens, model.cfg.max_seq_len - 16),
        sampling=SamplingParams(temperature=0.8, top_k=50),
        stop_token_ids=(eos,),
        seed=seed,
    )
    ids = [[eos, *tok.encode(p)] for p in prompts]
    was_training = model.training
    outs = Engine(model).generate(ids, req)
    model.train(was_training)
    return [p + tok.decode([t for t in o if t != eos]) for p, o in zip(prompts, outs)]


def pretrain(cfg: Config, progress: bool = True) -> dict:
    """Prepare data if needed, train, save OUT/model; returns the final metrics. A bert model
    pretrains with masked-LM + next-sentence prediction, an encdec model on parallel pairs."""
    arch = arch_of(cfg.model)
    if arch == "bert":
        from zerolm.train.mlm import pretrain_bert

        return pretrain_bert(cfg, progress)
    if arch == "encdec":
        from zerolm.train.seq2seq import pretrain_seq2seq

        return pretrain_seq2seq(cfg, progress)
    out = Path(cfg.out_dir)
    data_fp = pretrain_data_fingerprint(cfg)
    check_start(
        cfg, data_fp
    )  # before prepare, which would rebuild the run's tokenizer and shards on changed inputs
    summary = prepare(cfg, progress=progress)
    save_config(cfg, out)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    tok = Tokenizer.load(out / "tokenizer")
    torch.manual_seed(cfg.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(cfg.model, tok.vocab_size, seed=cfg.seed, device=device)
    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "model: %s, %.2f M parameters (%s)",
        model.cfg.preset,
        n_params / 1e6,
        ", ".join(
            f"{k}={getattr(model.cfg, k)}"
            for k in ("d_model", "n_layers", "n_heads", "max_seq_len")
        ),
    )
    seq_len = model.cfg.max_seq_len
    batches = TokenBatches(
        out / "shards", "train", batch_size=cfg.train.batch_size, seq_len=seq_len, seed=cfg.seed
    )
    token_bytes = tok.token_byte_lengths()
    eval_fn = partial(
        evaluate_lm,
        shard_dir=out / "shards",
        token_bytes=token_bytes,
        batch_size=cfg.train.batch_size,
        max_batches=cfg.train.eval_batches,
    )
    first_val = next(read_docs(out / "docs" / "val.jsonl"), None)
    prompts = (
        ["", first_val["text"][:2]] if first_val else [""]
    )  # unconditional, and a held-out opening
    sample_fn = partial(sample_texts, tok=tok, prompts=prompts, seed=cfg.seed)
    trainer = Trainer(
        model,
        cfg.train,
        out,
        batches=batches,
        loss_fn=lm_loss,
        eval_fn=eval_fn,
        sample_fn=sample_fn,
        flops_per_token=account(model)["train_flops_per_token"],
        progress=progress,
        fingerprint={
            **data_fp,
            "tokenizer.sha256": tok.sha256,
            "data.shards": summary["shards"]["fingerprint"],
        },
    )
    row = trainer.fit()
    final = evaluate_lm(
        model, out / "shards", token_bytes, batch_size=cfg.train.batch_size
    )  # the whole split
    save_model(model, out / "model", tok)  # float32 weights, whatever the training precision
    log.info(
        "final validation (whole split): loss %.4f | bits/byte %.4f | ppl %.2f",
        final["val_loss"],
        final["val_bpb"],
        final["val_ppl"],
    )
    return {**row, **{f"final_{k}": v for k, v in final.items()}, "model_dir": str(out / "model")}
