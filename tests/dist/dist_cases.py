"""Training cases run the same way in one process (the reference, inside pytest) and under torchrun
(`python -m torch.distributed.run ... tests/dist/dist_cases.py OUT`: every case in one job, rank 0
saving the results to OUT). Tiny llama, fp32, a fixed stream of global batches."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from zerolm.config import DistConfig, LoRAConfig, ModelConfig, TrainConfig
from zerolm.model import build_model
from zerolm.train.batches import Stream
from zerolm.train.losses import lm_loss
from zerolm.train.trainer import Trainer
from zerolm.transforms.lora import apply_lora

VOCAB, T = 50, 16


def batches(n: int, rows: int, masked: bool, seed: int = 0) -> list[tuple]:
    """n global batches of `rows` rows; masked: (x, y, mask) with a mask keeping a different
    number of targets per row (so the ranks count different numbers of tokens)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        data = torch.randint(0, VOCAB, (rows, T + 1), generator=g)
        x, y = data[:, :-1], data[:, 1:]
        if masked:
            keep = torch.randint(1, T + 1, (rows, 1), generator=g)
            out.append((x, y, (torch.arange(T)[None] < keep).long()))
        else:
            out.append((x, y))
    return out


def tiny_llama():
    """The seeded tiny llama every dist case trains (here and in ckpt_cases.py)."""
    return build_model(
        ModelConfig(preset="llama", d_model=32, n_layers=2, n_heads=4, max_seq_len=T),
        vocab_size=VOCAB,
        seed=3,
    )


def train(
    out: Path,
    steps: int,
    rows: int,
    accum: int = 1,
    masked: bool = False,
    strategy: str = "ddp",
    lora: bool = False,
    compile: bool = False,
    precision: str = "fp32",
) -> dict:
    """Losses and final parameters of `steps` steps on global batches of `rows` rows each
    (`accum` micro-batches of rows / accum per step); `lora`: rank-4 adapters on q and v, the
    rest frozen; `compile`: the compiled loss (train.compile); `precision`: train.precision."""
    model = tiny_llama()
    if lora:
        apply_lora(model, LoRAConfig(rank=4, alpha=8.0, targets=("q", "v")))
    cfg = TrainConfig(
        steps=steps,
        batch_size=rows // accum,
        grad_accum=accum,
        precision=precision,  # type: ignore[arg-type]
        warmup_steps=1,
        compile=compile,
    )
    data = batches(steps * accum, rows // accum, masked)
    trainer = Trainer(
        model,
        cfg,
        out,
        batches=Stream(data),
        loss_fn=lm_loss,
        progress=False,
        dist=DistConfig(strategy=strategy),  # type: ignore[arg-type]
    )
    losses = [trainer.train_step()["loss"] for _ in range(steps)]
    with trainer.par.full_model(keep=True) as full:
        state = None if full is None else {k: v.clone() for k, v in full.state_dict().items()}
    master = trainer.optimizer.param_groups[0]["params"][0]  # what AdamW steps (FSDP2: a shard)
    return {
        "losses": losses,
        "state": state,
        "compiled": trainer._compiled_ok,
        "master_dtype": str(master.dtype),
    }


CASES = {
    "ddp_masked": dict(steps=3, rows=8, masked=True),
    "ddp_20": dict(steps=20, rows=4),
    "fsdp_20": dict(steps=20, rows=4, strategy="fsdp"),
    "accum_2x2": dict(steps=3, rows=8, accum=2),
    "fsdp_accum_2x2": dict(steps=3, rows=8, accum=2, strategy="fsdp"),
    "ddp_lora": dict(steps=5, rows=8, lora=True),
    "fsdp_lora": dict(steps=5, rows=8, lora=True, strategy="fsdp"),
    "ddp_compiled": dict(steps=3, rows=8, compile=True),
    "fsdp_compiled": dict(steps=3, rows=8, compile=True, strategy="fsdp"),
    "fsdp_bf16": dict(steps=5, rows=8, strategy="fsdp", precision="bf16"),
}


def _mismatch() -> str:
    """setup() with a config that differs on rank 1: the error every rank raises."""
    from zerolm.config import Config
    from zerolm.dist import group

    try:
        group.setup(Config(seed=group.rank()))
    except ValueError as e:
        return str(e)
    return ""


def main(out: Path) -> None:
    from zerolm.dist import group

    group.init(DistConfig())
    results = {name: train(out / name, **kw) for name, kw in CASES.items()}  # type: ignore[arg-type]
    results["mismatch"] = _mismatch()  # type: ignore[assignment]
    if group.is_main():
        torch.save(results, out / "results.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]))
