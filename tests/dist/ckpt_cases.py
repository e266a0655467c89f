"""Checkpoint and failure cases: one Trainer.fit on a fixed list of global batches (tiny llama,
fp32, a checkpoint every 5 steps), the same in one process (inside pytest) and on 2 ranks
(`ckpt_cases.py OUT MODE [MODE ...]` under torchrun, or as 2 plain processes with RANK and
WORLD_SIZE set). A rank told to die SIGKILLs itself while drawing a batch: a real kill at a
known point."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
from dist_cases import VOCAB, T, tiny_llama

from zerolm.config import DistConfig, TrainConfig
from zerolm.train.losses import lm_loss
from zerolm.train.trainer import Trainer

ROWS, STEPS = 4, 10


class Rows:
    """Batches over fixed global batches, resumable by position; on rank `die_rank`, drawing batch
    number `die_at` SIGKILLs (or, `how="stop"`, SIGSTOPs) this process."""

    def __init__(self, die_at: int = -1, die_rank: int = 1, how: str = "kill"):
        g = torch.Generator().manual_seed(0)
        data = torch.randint(0, VOCAB, (STEPS, ROWS, T + 1), generator=g)
        self.data = [(d[:, :-1], d[:, 1:]) for d in data]
        self.i, self.die_at, self.die_rank, self.how = 0, die_at, die_rank, how

    def __next__(self):
        if self.i == self.die_at and int(os.environ.get("RANK", "0")) == self.die_rank:
            os.kill(os.getpid(), signal.SIGKILL if self.how == "kill" else signal.SIGSTOP)
        batch = self.data[self.i]
        self.i += 1
        return batch

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, state: dict) -> None:
        self.i = state["i"]


def fit(out: Path, resume: bool = False, strategy: str = "ddp", **die) -> list[float]:
    """Train to STEPS (resuming from `out` when asked); the loss of every step, by the log's last
    row for it (a resumed run's own)."""
    model = tiny_llama()
    cfg = TrainConfig(
        steps=STEPS,
        batch_size=ROWS,
        precision="fp32",
        warmup_steps=1,
        eval_every=0,
        log_every=0,
        ckpt_every=5,
        keep_checkpoints=3,
        resume=resume,
    )
    trainer = Trainer(
        model,
        cfg,
        out,
        batches=Rows(**die),
        loss_fn=lm_loss,
        progress=False,
        dist=DistConfig(strategy=strategy),  # type: ignore[arg-type]
    )
    trainer.fit()
    return losses(out)


def losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return list({r["step"]: r["loss"] for r in rows}.values())


MODES = {
    "full": dict(),  # uninterrupted
    "fsdp": dict(strategy="fsdp"),
    "resume": dict(resume=True),
    "resume_fsdp": dict(resume=True, strategy="fsdp"),
    "killed": dict(die_at=7),  # rank 1 dies drawing step 8's batch: after step 5's checkpoint
    "stopped": dict(die_at=7, how="stop"),  # rank 1 hangs there
}


def main(out: Path, modes: list[str]) -> None:
    from zerolm.dist import group

    timeout = float(os.environ.get("ZEROLM_TEST_TIMEOUT", "1800"))
    group.init(DistConfig(timeout=timeout))
    results = {}
    for mode in modes:
        results[mode] = fit(out / mode, **MODES[mode])  # type: ignore[arg-type]
        if group.is_main():
            torch.save(results, out / "results.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]), sys.argv[2:])
