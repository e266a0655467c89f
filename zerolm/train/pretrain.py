"""`zerolm pretrain`: prepared shards -> a trained next-token model in OUT/model."""

from __future__ import annotations

import logging
from functools import partial

from zerolm.config import Config
from zerolm.data.loader import TokenBatches
from zerolm.data.prepare import prepare, read_docs
from zerolm.eval.mode import eval_mode
from zerolm.eval.perplexity import evaluate_lm
from zerolm.infer.engine import Engine, GenerateRequest
from zerolm.infer.sampling import SamplingParams
from zerolm.inspect.accounting import account
from zerolm.model import save_model
from zerolm.model.presets import arch_of
from zerolm.model.protocol import LanguageModel
from zerolm.tokenizer import Tokenizer
from zerolm.train.fingerprint import pretrain_data_fingerprint
from zerolm.train.losses import lm_loss
from zerolm.train.mlm import pretrain_bert
from zerolm.train.run import Stage, StageResult, begin, log_model, new_model, open_out, run
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
    ids = tok.completion_ids(prompts)
    with eval_mode(model):
        outs = Engine(model).generate(ids, req)
    return [p + tok.decode([t for t in o if t not in tok.eos_ids]) for p, o in zip(prompts, outs)]


def pretrain(cfg: Config, progress: bool = True) -> StageResult:
    """Prepare data if needed, train, save OUT/model; returns the final metrics. A bert model
    pretrains with masked-LM + next-sentence prediction, an encdec model on parallel pairs."""
    arch = arch_of(cfg.model)
    if arch == "bert":
        return pretrain_bert(cfg, progress)
    if arch == "encdec":
        return pretrain_seq2seq(cfg, progress)
    data_fp = pretrain_data_fingerprint(cfg)
    # before prepare, which would rebuild the run's tokenizer and shards on changed inputs
    out = begin(cfg, data_fp)
    summary = prepare(cfg, progress=progress)
    open_out(cfg)
    tok = Tokenizer.load(out / "tokenizer")
    model = new_model(cfg, cfg.model, tok.vocab_size)
    log_model(model, model.cfg.preset)
    shards, token_bytes, bs = out / "shards", tok.token_byte_lengths(), cfg.train.batch_size
    first_val = next(read_docs(out / "docs" / "val.jsonl"), None)
    # unconditional, and a held-out opening
    prompts = ["", first_val["text"][:2]] if first_val else [""]
    result = run(
        cfg,
        Stage(
            model,
            TokenBatches(
                shards, "train", batch_size=bs, seq_len=model.cfg.max_seq_len, seed=cfg.seed
            ),
            lm_loss,
            save=partial(save_model, model, tokenizer=tok),  # float32, whatever the precision
            evaluate=partial(
                evaluate_lm,
                shard_dir=shards,
                token_bytes=token_bytes,
                batch_size=bs,
                max_batches=cfg.train.eval_batches,
            ),
            final=partial(evaluate_lm, shard_dir=shards, token_bytes=token_bytes, batch_size=bs),
            samples=partial(sample_texts, tok=tok, prompts=prompts, seed=cfg.seed),
            flops_per_token=account(model)["train_flops_per_token"],
            fingerprint={
                **data_fp,
                "tokenizer.sha256": tok.sha256,
                "data.shards": summary["shards"]["fingerprint"],
            },
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
