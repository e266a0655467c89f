"""The one training loop. Stages plug in their Batches (next, state_dict, load_state_dict) and a
loss function returning a LossResult (zerolm/train/run.py builds them into a stage); the loop owns
precision, accumulation, clipping, schedule, logging, evaluation, checkpoints, exact resume (of the
same run: see fingerprint.py), Ctrl-C / SIGTERM, and non-finite losses (skipped, stopped on, or
rolled back from: train.nonfinite). Under torchrun it runs the same loop on every rank through
zerolm/train/parallel.py (DDP or FSDP2; each rank takes its rows of every global micro-batch), and
rank 0 alone logs and writes files.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from zerolm.config import DistConfig, TrainConfig
from zerolm.dist import group
from zerolm.train.batches import Batches
from zerolm.train.checkpoint import (
    NonFiniteError,
    last_good,
    list_checkpoints,
    load_checkpoint,
    remove_partial,
    save_checkpoint,
)
from zerolm.train.fingerprint import check_resume, trainer_fingerprint
from zerolm.train.losses import LossResult
from zerolm.train.optim import build_optimizer, lr_at
from zerolm.train.parallel import Parallel
from zerolm.train.precision import autocast, measure_peak_flops
from zerolm.train.sharded import is_sharded, load_sharded, save_sharded
from zerolm.train.signals import Abort, Signals

log = logging.getLogger(__name__)

# (model, batch) -> LossResult; the model is the stage's own class (train/run.py's Stage types it)
LossFn = Callable[[Any, Any], LossResult]


def _json_row(row: dict) -> str:
    """One strict-JSON log row: NaN and inf become null (json.dumps would write bare NaN)."""
    clean = {
        k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()
    }
    return json.dumps(clean, allow_nan=False)


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        out_dir: str | Path,
        *,
        batches: Batches,
        loss_fn: LossFn,
        eval_fn: Callable | None = None,
        sample_fn: Callable | None = None,
        flops_per_token: float = 0.0,
        progress: bool = True,
        fingerprint: dict | None = None,
        dist: DistConfig | None = None,
        row_groups: int = 1,
    ):
        """`fingerprint`: the stage's part of what a resume must match (seed, tokenizer, data; see
        fingerprint.py); the model config and the training settings are added here. `dist`: the
        strategy when the process group is up (zerolm.dist.group.setup); `row_groups`: 2 where a
        batch's rows are B chosen then B rejected (each rank takes its share of both)."""
        if not isinstance(batches, Batches):
            raise TypeError(
                f"batches must be Batches (next, state_dict, load_state_dict), not "
                f"{type(batches).__name__}: wrap a plain iterator in zerolm.train.batches.Stream"
            )
        self.model, self.cfg, self.out = model, cfg, Path(out_dir)
        strategy = group.strategy(dist or DistConfig()) if group.active() else "none"
        group.check_batch(cfg.batch_size, group.world_size())
        self.par = Parallel(model, strategy, row_groups)
        self.step_fn: nn.Module | None = None  # the loss as DDP / FSDP2 run it (_ready)
        self.batches, self.loss_fn = batches, loss_fn
        self.eval_fn, self.sample_fn = eval_fn, sample_fn
        self.flops_per_token, self.progress = flops_per_token, progress and self.par.main
        self.device = next(model.parameters()).device
        self.optimizer = build_optimizer(model, cfg)
        # compile the whole loss (forward + cross-entropy), not just the module: inductor then fuses
        # the float32 logits cast and log-softmax too (bench/train.py: llama 10M bf16 ~1.4x eager)
        self.train_loss = torch.compile(loss_fn) if cfg.compile else loss_fn
        self._compiled_ok = False
        self.step = 0
        self.precision: str = cfg.precision  # "auto" until fit() measures the choice
        self.run = {**(fingerprint or {}), **trainer_fingerprint(model.cfg, cfg)}
        self.lr_scale, self.bad_steps, self.rollbacks = 1.0, 0, 0  # train.nonfinite handling
        self.changed: list[str] = []  # resumes that train.resume_changed let through, as recorded
        self._saved_step = -1
        self._saving = ""  # what a lost peer interrupted, when not a training step
        self._note: dict[str, object] = {}  # fields for the next log row
        self._signals = Signals()

    # ---------------------------------------------------------------- one optimizer step
    def _loss(self, model, batch):
        if self.train_loss is self.loss_fn or self._compiled_ok:
            return self.train_loss(model, batch)
        try:  # the first compiled call compiles: if that fails, eager mode still trains
            out = self.train_loss(model, batch)
        except Exception as e:
            if not type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
                raise
            log.warning(
                "torch.compile failed, training continues in eager mode (install a C++ compiler "
                "such as g++, or set train.compile=false): %s",
                str(e).strip().splitlines()[0][:300],
            )
            self.train_loss = self.loss_fn
            return self.loss_fn(model, batch)
        self._compiled_ok = True
        return out

    def _ready(self) -> nn.Module:
        """The training module, wrapped once the precision is known (FSDP2's policy needs it)."""
        if self.step_fn is None:
            self.step_fn = self.par.wrap(self._loss, self.precision)
            if self.par.trained is not self.model:  # sharded parameters: a new optimizer
                self.optimizer = build_optimizer(self.par.trained, self.cfg)
        return self.step_fn

    def _micro_step(self, batch, inner: bool) -> tuple[float, int, dict]:
        """Forward and backward of this rank's rows of a global micro-batch; an `inner` one (not
        the step's last) keeps its gradients local. Returns the global loss, count and stats."""
        step_fn = self._ready()
        with self.par.accumulating(inner):
            with autocast(self.precision, self.device):
                out = step_fn(self.par.shard(batch))
            loss, n, stats, scale = self.par.reduce(out)
            (out.loss * scale / self.cfg.grad_accum).backward()  # scale: 1.0 in one process
        return loss, n, stats

    def train_step(self) -> dict:
        """One optimizer step. A non-finite loss or gradient norm (checked once the micro-batches
        are accumulated) skips the update; the step still counts toward train.steps and the data
        moves on."""
        lr = lr_at(self.step, self.cfg) * self.lr_scale
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.model.train()
        losses, tokens = [], 0
        stats: dict[str, float] = {}
        for i in range(self.cfg.grad_accum):
            loss, n, extra = self._micro_step(next(self.batches), i < self.cfg.grad_accum - 1)
            losses.append(loss)
            tokens += n
            for k, v in extra.items():
                stats[k] = stats.get(k, 0.0) + v / self.cfg.grad_accum
        params = [p for p in self.par.trained.parameters() if p.grad is not None]
        gnorm = torch.nn.utils.clip_grad_norm_(
            params, self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        )
        if hasattr(gnorm, "full_tensor"):  # FSDP2: the norm of DTensor shards, made global
            gnorm = gnorm.full_tensor()
        row = {
            "step": self.step + 1,
            "loss": sum(losses) / len(losses),
            **stats,
            "lr": lr,
            "grad_norm": gnorm.item(),
            "tokens": tokens,
        }
        finite = math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"])
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.stat_keys = list(stats)  # the loss's own figures, printed in the step's log line
        self.bad_steps = 0 if finite else self.bad_steps + 1
        if not finite:
            row.update(self._nonfinite(row))
        return row

    def _nonfinite(self, row: dict) -> dict:
        """Apply train.nonfinite to a step whose update was skipped; returns fields for its log
        row."""
        cfg, what = (
            self.cfg,
            f"loss {row['loss']:.4g}, grad norm {row['grad_norm']:.4g} at lr {row['lr']:.3g}",
        )
        if cfg.nonfinite == "stop":
            raise NonFiniteError(
                f"step {self.step}: non-finite {what} (train.nonfinite=stop); the update was "
                f"skipped and {last_good(self.out)}. Lower --train.lr or set --train.nonfinite=skip"
            )
        if cfg.nonfinite == "skip":
            if self.bad_steps >= cfg.nonfinite_limit:
                raise NonFiniteError(
                    f"training diverged: non-finite loss or gradient norm at {self.bad_steps} "
                    f"consecutive steps (steps {self.step - self.bad_steps + 1}-{self.step}; last "
                    f"{what}); the updates were skipped and {last_good(self.out)}. Lower "
                    "--train.lr (and resume with --resume-changed, or start a new --out), or set "
                    "--train.nonfinite=rollback"
                )
            log.warning(
                "step %d: non-finite %s: update skipped (%d in a row; train.nonfinite_limit=%d)",
                self.step,
                what,
                self.bad_steps,
                cfg.nonfinite_limit,
            )
            return {"skipped": True}
        found = list_checkpoints(self.out)
        if self.rollbacks >= cfg.nonfinite_limit or not found:
            raise NonFiniteError(
                f"step {self.step}: non-finite {what} after {self.rollbacks} rollback(s) "
                f"(train.nonfinite_limit={cfg.nonfinite_limit}); {last_good(self.out)}. Lower "
                "--train.lr and resume with --resume-changed"
            )
        scale, rollbacks = self.lr_scale * cfg.nonfinite_lr_factor, self.rollbacks + 1
        self._load(found[-1])
        self.lr_scale, self.rollbacks, self.bad_steps = scale, rollbacks, 0
        log.warning(
            "step %d: non-finite %s: rolled back to %s with lr x%.3g (rollback %d of at most %d)",
            row["step"],
            what,
            found[-1].name,
            scale,
            rollbacks,
            cfg.nonfinite_limit,
        )
        return {"skipped": True, "rolled_back_to": self.step, "lr_scale": scale}

    def _choose_precision(self) -> str:
        """'auto': time fp32 and bf16 forward+backward on a real batch and keep the faster."""
        if self.cfg.precision != "auto":
            return self.cfg.precision
        if self.device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        rng = torch.get_rng_state()
        state = self.batches.state_dict()
        batch = next(self.batches)
        times: dict[str, float] = {}
        for precision in ("fp32", "bf16", "fp32", "bf16"):
            t0 = time.perf_counter()
            with autocast(precision, self.device):
                loss = self.loss_fn(self.model, batch).loss
            loss.backward()
            times[precision] = min(times.get(precision, math.inf), time.perf_counter() - t0)
        self.optimizer.zero_grad(set_to_none=True)
        torch.set_rng_state(rng)
        self.batches.load_state_dict(state)
        choice = group.broadcast("bf16" if times["bf16"] < 0.9 * times["fp32"] else "fp32")
        log.info(
            "precision auto: fp32 %.0f ms, bf16 %.0f ms per micro-batch -> %s",
            1e3 * times["fp32"],
            1e3 * times["bf16"],
            choice,
        )
        return choice

    # ---------------------------------------------------------------- checkpoints
    def save(self) -> Path:
        """Write a checkpoint of this step: one process's files, or under torchrun every rank's
        shards (zerolm/train/sharded.py); signals wait until it is complete."""
        self._ready()
        with self._signals.hold():
            extra = {
                "precision": self.precision,
                "lr_scale": self.lr_scale,
                "rollbacks": self.rollbacks,
                "resume_changed": self.changed,
                "data": self.batches.state_dict(),
            }
            keep = self.cfg.keep_checkpoints
            if self.par.world > 1:
                config = {"zerolm_model": self.model.cfg.__dict__, "run": self.run}
                self._saving = f"saving checkpoint step-{self.step:07d}"  # for a PeerError
                path = save_sharded(
                    self.out, self.step, self.par.trained, self.optimizer, extra, config, keep
                )
                self._saving = ""
            else:
                path = save_checkpoint(
                    self.out, self.step, self.model, self.optimizer, extra, keep, run=self.run
                )
        self._saved_step = self.step
        return path

    def _load(self, path: Path) -> None:
        """Restore checkpoint `path`, of either format, into this world (any size)."""
        self._ready()
        if is_sharded(path):
            saved = load_sharded(path, self.par.trained, self.optimizer)
        else:  # the one file holds the whole model: FSDP2 puts it into its shards
            put = None if self.par.strategy != "fsdp" else self.par.load_full_state
            saved = load_checkpoint(path, self.model, self.optimizer, put=put)
        self.step, self.precision = saved["step"], saved["precision"]
        self.lr_scale, self.rollbacks = saved.get("lr_scale", 1.0), saved.get("rollbacks", 0)
        self.changed = list(saved.get("resume_changed", []))
        if "data" in saved:
            self.batches.load_state_dict(saved["data"])
        self._saved_step = self.step

    def resume(self) -> bool:
        """Continue from the newest checkpoint, if it was taken by the same run (or
        train.resume_changed)."""
        found = list_checkpoints(self.out)
        if not found:
            return False
        changed = check_resume(found[-1], self.run, self.cfg.resume_changed)
        # the precision first: FSDP2 shards for it (_ready) before the state is loaded
        self.precision = torch.load(found[-1] / "state.pt", weights_only=True, mmap=True)[
            "precision"
        ]
        self._load(found[-1])
        if changed:
            self.changed.append(f"step {self.step}: {'; '.join(changed)}")
            self._note["resume_changed"] = "; ".join(changed)
        log.info("resumed from %s (step %d)", found[-1], self.step)
        return True

    # ---------------------------------------------------------------- the loop
    def _evaluate(self) -> dict:
        """Evaluation and samples, on rank 0 (the others return {})."""
        due = self.cfg.sample_every == 0 or self.step % self.cfg.sample_every == 0
        if self.eval_fn is None and not (self.sample_fn is not None and due):
            return {}
        with self.par.full_model() as model:
            return self._evaluate_on(model, due) if model is not None else {}

    def _evaluate_on(self, model: nn.Module, sample: bool) -> dict:
        out = {}
        if self.eval_fn is not None:
            model.eval()
            with torch.no_grad(), autocast(self.precision, self.device):
                out = self.eval_fn(model)
            log.info("step %d: %s", self.step, " | ".join(f"{k} {v:.4f}" for k, v in out.items()))
        if self.sample_fn is not None and sample:
            model.eval()
            for text in self.sample_fn(model):
                log.info("  sample: " + text.replace("\n", "\n          "))
        return out

    def _due(self, every: int) -> bool:
        """At every `every` steps (0: never) and at the last step."""
        return (every > 0 and self.step % every == 0) or self.step == self.cfg.steps

    def fit(self) -> dict:
        """Train until cfg.steps; returns the last logged row (with the latest eval metrics).
        Under torchrun, a rank that dies or hangs makes every other one raise PeerError."""
        try:
            return self._fit()
        except (RuntimeError, CheckpointException) as e:
            after = (
                f"{last_good(self.out)}; resume with --train.resume=true (on any number of ranks)"
            )
            doing = self._saving or f"training step {self.step + 1}"
            lost = group.lost_peer(e, doing, after)
            if lost is None:
                raise
            if threading.current_thread() is threading.main_thread():
                # the job is over; torchrun's SIGTERM to the survivors must not cut this short
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            raise lost from e

    def _fit(self) -> dict:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        with group.main_first():
            if self.par.main:
                remove_partial(self.out)
        if not (cfg.resume and self.resume()):
            self.precision = self._choose_precision()
            if cfg.nonfinite == "rollback" and not list_checkpoints(self.out):
                self.save()  # a point to roll back to before the first checkpoint is due
        self._ready()
        self._log_setup()
        # the whole job's: MFU is of all the ranks together
        self._peak = sum(group.all_sum([measure_peak_flops(self.precision, self.device)]))
        # line-buffered: rows survive a kill; rank 0's only
        log_file = open(
            self.out / "train_log.jsonl" if self.par.main else os.devnull,
            "a",
            encoding="utf-8",
            buffering=1,
        )
        bar = tqdm(
            total=cfg.steps,
            initial=self.step,
            desc="train",
            unit="step",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        row: dict = {}
        self._t_start, self._step_start, self._tokens_seen = time.perf_counter(), self.step, 0
        stop = self._signals
        with logging_redirect_tqdm(), stop:  # log lines print above the progress bar
            try:
                # signals land between steps: consistent
                while self.step < cfg.steps and not self._stopping():
                    row = self._logged_step(log_file, bar)
                if self.step < cfg.steps and self._stopping():
                    self._stop_requested(stop.requested or "a signal on another rank")
            except Abort:
                log.warning(f"aborted at step {self.step}, nothing saved: {last_good(self.out)}")
                raise
            finally:
                bar.close()
                log_file.close()
        return row

    def _stopping(self) -> bool:
        """A signal arrived (on any rank: all stop at the same step)."""
        requested = float(bool(self._signals.requested))
        return (group.all_sum([requested])[0] if self.par.world > 1 else requested) > 0

    def _log_setup(self) -> None:
        cfg, par = self.cfg, self.par
        if par.world > 1:
            log.info(
                "distributed: %s over %d processes; global batch %d sequences per step = %d per "
                "micro-batch x %d accumulation, %d per rank per micro-batch",
                par.strategy,
                par.world,
                cfg.batch_size * cfg.grad_accum,
                cfg.batch_size,
                cfg.grad_accum,
                cfg.batch_size // par.world,
            )

    def _logged_step(self, log_file, bar) -> dict:
        """One step with its log row, evaluation, log line and checkpoint; returns the row."""
        cfg = self.cfg
        t0 = time.perf_counter()
        row = {**self.train_step(), **self._note}
        self._note = {}
        dt = time.perf_counter() - t0
        self._tokens_seen += row["tokens"]
        row["tok_per_s"] = row["tokens"] / dt
        row["mfu"] = (
            self.flops_per_token * row["tokens"] / dt / self._peak if self.flops_per_token else 0.0
        )
        if "rolled_back_to" in row:
            log_file.write(_json_row(row) + "\n")
            bar.n = self.step
            return row
        if self._due(cfg.eval_every):
            row.update(self._evaluate())
        log_file.write(_json_row(row) + "\n")
        bar.update(1)
        if self._due(cfg.log_every):
            self._log_line(row)
        if self._due(cfg.ckpt_every) and self.bad_steps:  # a checkpoint must end on a finite step
            log.warning(
                "step %d: no checkpoint while the loss is non-finite; %s",
                self.step,
                last_good(self.out),
            )
        elif self._due(cfg.ckpt_every):
            self.save()
        return row

    def _log_line(self, row: dict) -> None:
        cfg = self.cfg
        elapsed = time.perf_counter() - self._t_start
        eta = elapsed / max(1, self.step - self._step_start) * (cfg.steps - self.step)
        extra = "".join(f"{k} {row[k]:.4g} | " for k in self.stat_keys)
        log.info(
            f"step {self.step:>6}/{cfg.steps} | loss {row['loss']:.4f} | {extra}lr {row['lr']:.2e} "
            f"| gnorm {row['grad_norm']:.2f} | {self._tokens_seen / elapsed:,.0f} tok/s | MFU "
            f"{100 * row['mfu']:.1f}% | ETA {eta:,.0f}s"
        )

    def _stop_requested(self, what: str) -> None:
        """A signal stopped the loop before cfg.steps: save a checkpoint (on a finite step),
        stop."""
        if self.bad_steps:
            log.info(
                f"{what} at step {self.step}, whose loss is non-finite: no checkpoint saved; "
                f"{last_good(self.out)} (resume with --train.resume=true)"
            )
        else:
            log.info(
                f"{what} at step {self.step}: saving a checkpoint (resume with --train.resume=true)"
            )
            if self._saved_step != self.step:
                self.save()
        raise KeyboardInterrupt
