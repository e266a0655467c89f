"""`zerolm pretrain`: prepared shards -> a trained next-token model in OUT/model: a new one, or
(`--init DIR`, train.init) that model continued on the user's text with its own tokenizer."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import cast

from zerolm.config import Config, ModelConfig
from zerolm.data.loader import TokenBatches
from zerolm.data.prepare import prepare, read_docs
from zerolm.dist.group import is_main, main_first
from zerolm.eval.mode import eval_mode
from zerolm.eval.perplexity import evaluate_lm
from zerolm.infer.engine import Engine, GenerateRequest
from zerolm.infer.sampling import SamplingParams
from zerolm.inspect.accounting import account
from zerolm.model import read_model_config
from zerolm.model.presets import arch_of
from zerolm.model.protocol import LanguageModel
from zerolm.tokenizer import Tokenizer
from zerolm.train.fingerprint import pretrain_data_fingerprint, stage_fingerprint
from zerolm.train.losses import lm_loss
from zerolm.train.mlm import pretrain_bert
from zerolm.train.run import (
    Stage,
    StageResult,
    begin,
    log_model,
    open_out,
    run,
    save_trainable,
    start_model,
)
from zerolm.train.seq2seq import pretrain_seq2seq

log = logging.getLogger(__name__)


def sample_texts(
    model: LanguageModel,
    tok: Tokenizer,
    prompts: list[str],
    max_new_tokens: int = 48,
    seed: int = 0,
) -> list[str]:
    """Continue each prompt (after an eos, i.e. at a document start) and decode up to the next
    eos."""
    req = GenerateRequest(
        max_new_tokens=min(max_new_tokens, model.cfg.max_seq_len - 16),
        sampling=SamplingParams(temperature=0.8, top_k=50),
        stop_token_ids=tok.eos_ids,
        seed=seed,
    )
    # an empty prompt with nothing added (a foreign tokenizer without bos): after the eos that
    # ends the previous document, where every training document starts
    ids = [p or [tok.eos_id] for p in tok.completion_ids(prompts)]
    with eval_mode(model):
        outs = Engine(model).generate(ids, req)
    return [p + tok.decode([t for t in o if t not in tok.eos_ids]) for p, o in zip(prompts, outs)]


def init_config(cfg: Config) -> Config:
    """cfg to continue train.init's model: its own tokenizer prepares the data and its architecture
    replaces the [model] section, whose max_seq_len (at most the model's window) is the training
    window. ValueError for a model that cannot be continued or settings that contradict it."""
    init = Path(cfg.train.init)
    m = read_model_config(init)
    if m.arch != "decoder":
        raise ValueError(f"--init {init} is a {m.arch} model: pretrain --init continues decoders")
    tok = Tokenizer.load(init)
    if cfg.tokenizer.path and Tokenizer.load(cfg.tokenizer.path).sha256 != tok.sha256:
        raise ValueError(
            f"--tokenizer.path {cfg.tokenizer.path} is not the tokenizer of --init {init}: the "
            "model reads only its own token ids; drop --tokenizer.path"
        )
    if tok.vocab_size > m.vocab_size:
        raise ValueError(
            f"--init {init}: its tokenizer has {tok.vocab_size} tokens but the model embeds "
            f"{m.vocab_size}: resize the model with its tokenizer (zerolm tokenizer extend)"
        )
    default = ModelConfig()
    given = [
        f.name
        for f in dataclasses.fields(ModelConfig)
        if f.name != "max_seq_len" and getattr(cfg.model, f.name) != getattr(default, f.name)
    ]
    if given:
        raise ValueError(
            f"--init {init} gives the architecture: drop --model.{', --model.'.join(given)} "
            "(only --model.max_seq_len, the training window, applies)"
        )
    window = min(cfg.model.max_seq_len, m.max_seq_len)
    return dataclasses.replace(
        cfg,
        tokenizer=dataclasses.replace(cfg.tokenizer, path=str(init)),
        model=dataclasses.replace(m, max_seq_len=window),
    )


def _before(cfg: Config, model, evaluate: Callable, seq_len: int) -> dict:
    """{"init": train.init's validation figures before any step}, logged; {} for a new model."""
    if not cfg.train.init:
        return {}
    before = evaluate(cast(LanguageModel, model))
    log.info(
        "validation before training (step 0, %s, %d-token windows): loss %.4f | bits/byte %.4f",
        cfg.train.init,
        seq_len,
        before["val_loss"],
        before["val_bpb"],
    )
    return {"init": {"model": cfg.train.init, "seq_len": seq_len, **before}}


def pretrain(cfg: Config, progress: bool = True) -> StageResult:
    """Prepare data if needed, train, save OUT/model; returns the final metrics. A bert model
    pretrains with masked-LM + next-sentence prediction, an encdec model on parallel pairs;
    train.init continues that model (init_config) and reports its validation figures before
    training in result.info["init"]."""
    if cfg.train.init:
        cfg = init_config(cfg)
    arch = arch_of(cfg.model)
    if arch == "bert":
        return pretrain_bert(cfg, progress)
    if arch == "encdec":
        return pretrain_seq2seq(cfg, progress)
    data_fp = pretrain_data_fingerprint(cfg)
    # before prepare, which would rebuild the run's tokenizer and shards on changed inputs
    out = begin(cfg, data_fp)
    with main_first():  # under torchrun: rank 0 prepares, the others find it prepared
        summary = prepare(cfg, progress=progress and is_main())
    open_out(cfg)
    tok = Tokenizer.load(out / "tokenizer")
    model, lora = start_model(cfg, tok.vocab_size)
    log_model(model, cfg.train.init or model.cfg.preset)
    shards, token_bytes, bs = out / "shards", tok.token_byte_lengths(), cfg.train.batch_size
    seq_len = min(model.cfg.max_seq_len, cfg.model.max_seq_len)
    evaluate = partial(
        evaluate_lm, shard_dir=shards, token_bytes=token_bytes, batch_size=bs, seq_len=seq_len
    )
    info = _before(cfg, model, evaluate, seq_len) | ({"lora": lora} if lora else {})
    first_val = next(read_docs(out / "docs" / "val.jsonl"), None)
    # unconditional, and a held-out opening
    prompts = ["", first_val["text"][:2]] if first_val else [""]
    fingerprint = {
        **data_fp,
        "tokenizer.sha256": tok.sha256,
        "data.shards": summary["shards"]["fingerprint"],
    }
    if cfg.train.init:
        fingerprint |= stage_fingerprint(cfg, None, ("lora",)) | {"train.init": cfg.train.init}
    result = run(
        cfg,
        Stage(
            model,
            TokenBatches(shards, "train", batch_size=bs, seq_len=seq_len, seed=cfg.seed),
            lm_loss,
            save=partial(save_trainable, model, tok=tok),  # float32, whatever the precision
            evaluate=partial(evaluate, max_batches=cfg.train.eval_batches),
            final=evaluate,
            samples=partial(sample_texts, tok=tok, prompts=prompts, seed=cfg.seed),
            flops_per_token=account(model)["train_flops_per_token"],
            fingerprint=fingerprint,
            info=info,
        ),
        progress,
    )
    final = result.final
    log.info(
        "final validation (whole split): loss %.4f | bits/byte %.4f | ppl %.2f",
        final["val_loss"],
        final["val_bpb"],
        final["val_ppl"],
    )
    return result
