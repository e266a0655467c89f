"""The stage runner: what every training stage (pretrain, bert, seq2seq, sft, classify, reward,
dpo, ppo) does around the one Trainer, written once. A stage builds a `Stage` (its model, batches,
loss, evaluation, samples, FLOPs per token, save) and calls `run`, which trains, evaluates and
saves, and returns a `StageResult`. Before that, `begin` guards the output directory and
`open_out` writes its config; `new_model` / `load_trainable` / `start_model` give the model (LoRA or
not), and `save_trainable` writes it back as a plain model directory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from torch import nn

from zerolm.config import Config, ModelConfig, save_config
from zerolm.dist import group
from zerolm.model import Transformer, build_model, load_model, save_model
from zerolm.model.bert import Bert
from zerolm.model.encdec import EncoderDecoder
from zerolm.quant.linear import quant_layers
from zerolm.tokenizer import Tokenizer
from zerolm.train.batches import Batches
from zerolm.train.checkpoint import list_checkpoints
from zerolm.train.fingerprint import check_resume
from zerolm.train.losses import LossResult
from zerolm.train.trainer import Trainer
from zerolm.transforms.lora import (
    apply_lora,
    lora_config_of,
    merge_lora,
    save_adapters,
    trainable_report,
)

log = logging.getLogger(__name__)

# a model of any zerolm arch (decoder, bert, encdec), as built or loaded; transforms keep its class
AnyModel = Transformer | Bert | EncoderDecoder


M = TypeVar("M", bound=nn.Module)  # the stage's model class (a zerolm model, RewardModel, ...)


@dataclasses.dataclass
class Stage(Generic[M]):
    """What a stage declares; the Trainer and the runner do the rest."""

    model: M
    batches: Batches
    loss: Callable[[M, Any], LossResult]  # (model, batch) -> LossResult
    save: Callable[[Path], object]  # writes the trained model to the directory given (OUT/model)
    evaluate: Callable[[M], dict] | None = None  # periodic, during training
    final: Callable[[M], dict] | None = None  # once at the end (e.g. the whole split)
    samples: Callable[[M], list[str]] | None = None  # texts shown at the eval steps
    flops_per_token: float = 0.0
    fingerprint: dict = dataclasses.field(default_factory=dict)  # what a resume must match
    info: dict = dataclasses.field(default_factory=dict)  # the stage's own summary (data, LoRA)
    row_groups: int = 1  # 2: a batch's rows are B chosen then B rejected (zerolm.train.parallel)


@dataclasses.dataclass
class StageResult:
    """A trained stage: `model_dir` (OUT/model), `last` (the Trainer's last log row: step, loss,
    lr, ...), `final` (the final held-out figures, e.g. {"val_loss": ...}) and `info` (the
    stage's own summary: data counts, LoRA report, reference, rollouts, ...)."""

    model_dir: str
    last: dict
    final: dict
    info: dict


def begin(cfg: Config, early: dict | None = None) -> Path:
    """Before a stage reads or writes anything: refuse an output directory that holds checkpoints
    unless resuming, compare `early` (what is known before data is rebuilt) with its newest
    checkpoint, and set train.threads. Under torchrun, join the process group first (every rank
    with the same config). Returns the output directory."""
    group.setup(cfg)
    out = Path(cfg.out_dir)
    found = list_checkpoints(out)
    if found and not cfg.train.resume:
        raise ValueError(
            f"{out} already holds checkpoints: continue with --train.resume=true, or use a new "
            "--out"
        )
    if found and early is not None:
        check_resume(found[-1], early, cfg.train.resume_changed)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    return out


def open_out(cfg: Config) -> Path:
    """The output directory, created, with the resolved config.toml written into it (by rank
    0)."""
    out = Path(cfg.out_dir)
    with group.main_first():
        out.mkdir(parents=True, exist_ok=True)
        if group.is_main():
            save_config(cfg, out)
    return out


def new_model(cfg: Config, model_cfg: ModelConfig, vocab_size: int) -> AnyModel:
    """A freshly initialised model of `model_cfg` (seeded by cfg.seed), on the GPU when there is
    one."""
    torch.manual_seed(cfg.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return build_model(model_cfg, vocab_size, seed=cfg.seed, device=device)


def log_model(model: AnyModel, name: str) -> None:
    cfg = model.cfg
    shape = ", ".join(
        f"{k}={getattr(cfg, k)}" for k in ("d_model", "n_layers", "n_heads", "max_seq_len")
    )
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %s, %.2f M parameters (%s)", name, n_params / 1e6, shape)


def load_trainable(cfg: Config, base: Path) -> tuple[AnyModel, dict | None]:
    """The base model to train: all of it, or LoRA adapters on it (lora.rank > 0); (model, the
    LoRA report or None)."""
    torch.manual_seed(cfg.seed)
    model = load_model(base)
    if not cfg.lora.rank:
        if quant_layers(model) or cfg.lora.base_quant != "none":
            raise ValueError(
                f"{base}: a quantized base trains only through adapters (QLoRA), its codes stay "
                "frozen: give --lora.rank=8 (say), or fine-tune its float source model"
            )
        return model, None
    apply_lora(model, cfg.lora, seed=cfg.seed)
    report = trainable_report(model)
    log.info("LoRA: %s", json.dumps(report))
    return model, report


def start_model(cfg: Config, vocab_size: int) -> tuple[AnyModel, dict | None]:
    """The model a pretraining run trains: train.init's (all of it, or LoRA adapters on it), on
    the GPU when there is one, else a new model of cfg.model; (model, the LoRA report or None)."""
    if not cfg.train.init:
        return new_model(cfg, cfg.model, vocab_size), None
    model, lora = load_trainable(cfg, Path(cfg.train.init))
    return model.to("cuda" if torch.cuda.is_available() else "cpu"), lora


def save_trainable(model: AnyModel, model_dir: Path, tok: Tokenizer) -> Path:
    """model_dir as a plain model (LoRA adapters saved next to it as adapters.safetensors, then
    merged into the weights)."""
    if lora_config_of(model) is not None:
        save_adapters(model, model_dir.parent / "adapters.safetensors", tok.sha256)
        merge_lora(model)
    return save_model(model, model_dir, tok)


def run(cfg: Config, stage: Stage[Any], progress: bool = True) -> StageResult:
    """Train `stage` on the Trainer to cfg.train.steps (resuming when asked), evaluate it once
    more, and save it to OUT/model. Under torchrun rank 0 evaluates and saves; every rank returns
    its figures."""
    out = Path(cfg.out_dir)
    trainer = Trainer(
        stage.model,
        cfg.train,
        out,
        batches=stage.batches,
        loss_fn=stage.loss,
        eval_fn=stage.evaluate,
        sample_fn=stage.samples,
        flops_per_token=stage.flops_per_token,
        progress=progress,
        fingerprint=stage.fingerprint,
        dist=cfg.dist,
        row_groups=stage.row_groups,
    )
    last = trainer.fit()
    final: dict = {}
    with trainer.par.full_model(keep=True) as model:  # stage.model, trained, on rank 0
        if model is not None:
            final = stage.final(stage.model) if stage.final is not None else {}
            stage.save(out / "model")
    final = group.broadcast(final)
    return StageResult(str(out / "model"), last, final, stage.info)
