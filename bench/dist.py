"""Data parallelism on this machine: training tokens/s of one process against 2 processes under
torchrun (DDP, FSDP2; gloo on CPU, nccl on CUDA), and each rank's memory, on the one Trainer.

Every run trains the same llama (--d-model, --layers; fp32 by default) on the same random global
batches of --batch sequences x --seq tokens for --steps steps; tokens/s = global tokens per step /
median step time after --warmup steps. Per rank: peak RSS (ru_maxrss, the whole process), and the
bytes of training state it holds, measured from its tensors (parameters, gradients, AdamW's two
moments: a sharded parameter counts its local shard) next to what `zerolm inspect`'s accounting
predicts for them (4 x the weights' bytes, divided by the world size under FSDP2). `ratio`: tokens/s
of each 2-process run over one process at the same total thread count, and FSDP2's per-rank state
over DDP's. On CPU the 2 processes run 1 thread each, the single process 2 (and 1, for scale).

    .venv/bin/python bench/dist.py [--steps 30] [--d-model 384] [--layers 6] [--batch 8]

Progress on stderr; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

VOCAB = 4096


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _state_bytes(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state this rank holds (DTensors: local). The
    gradients are the trainable parameters' size: held from backward to the optimizer step."""

    def local(t: torch.Tensor) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    params = list(module.parameters())
    moments = [v for s in optimizer.state.values() for v in s.values()]
    opt = sum(local(v) for v in moments if isinstance(v, torch.Tensor))
    return {
        "parameters": sum(local(p) for p in params),
        "gradients": sum(local(p) for p in params if p.requires_grad),
        "optimizer": opt,
    }


def worker(args: argparse.Namespace) -> None:
    """One rank (or the single process): train, then write this rank's figures to OUT/rank-R."""
    from zerolm.config import DistConfig, ModelConfig, TrainConfig
    from zerolm.dist import group
    from zerolm.inspect.accounting import account
    from zerolm.model import build_model
    from zerolm.train.batches import Stream
    from zerolm.train.losses import lm_loss
    from zerolm.train.trainer import Trainer

    torch.set_num_threads(args.threads)
    group.init(DistConfig())
    device = "cuda" if torch.cuda.is_available() else "cpu"  # init chose this rank's GPU
    cfg = ModelConfig(
        preset="llama",
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.d_model // 64,
        max_seq_len=args.seq,
    )
    model = build_model(cfg, vocab_size=VOCAB, seed=0).to(device)
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(args.steps):
        seq = torch.randint(0, VOCAB, (args.batch, args.seq + 1), generator=g)
        data.append((seq[:, :-1].to(device), seq[:, 1:].to(device)))
    train = TrainConfig(
        steps=args.steps,
        batch_size=args.batch,
        precision=args.precision,
        warmup_steps=1,
        compile=args.compile,
    )
    strategy = args.strategy if group.active() else "none"
    out = Path(args.out)
    trainer = Trainer(
        model,
        train,
        out / "run",
        batches=Stream(data),
        loss_fn=lm_loss,
        progress=False,
        dist=DistConfig(strategy=strategy),  # type: ignore[arg-type]
    )
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        trainer.train_step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    state = _state_bytes(trainer.par.trained, trainer.optimizer)
    weights = account(trainer.par.trained)["weights_bytes"]  # a DTensor counts its global size
    shard = group.world_size() if strategy == "fsdp" else 1
    row = {
        "rank": group.rank(),
        "step_s": statistics.median(times[args.warmup :]),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "state_mb": {k: round(v / 2**20, 2) for k, v in state.items()},
        "predicted_state_mb": round(4 * weights / shard / 2**20, 2),
    }
    if device == "cuda":
        row["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    (out / f"rank-{group.rank()}.json").write_text(json.dumps(row))


def launch(args: argparse.Namespace, procs: int, threads: int, strategy: str, out: Path) -> dict:
    """Run the workers (torchrun for procs > 1) and gather their rows."""
    out.mkdir(parents=True)
    flags = [
        "--worker",
        f"--out={out}",
        f"--threads={threads}",
        f"--strategy={strategy}",
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
        f"--d-model={args.d_model}",
        f"--layers={args.layers}",
        f"--batch={args.batch}",
        f"--seq={args.seq}",
        f"--precision={args.precision}",
        *(["--compile"] if args.compile else []),
    ]
    cmd = [sys.executable, __file__, *flags]
    if procs > 1:
        run = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={procs}"]
        cmd = [*run, f"--master-port={_free_port()}", __file__, *flags]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(procs)]
    step = max(r["step_s"] for r in ranks)
    return {
        "processes": procs,
        "threads_per_process": threads,
        "strategy": strategy,
        "tokens_per_s": round(args.batch * args.seq / step, 1),
        "ranks": ranks,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--d-model", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8, help="global sequences per step")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--strategy", default="none", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    cores = os.cpu_count() or 2
    plan = [(1, 1, "none"), (1, 2, "none"), (2, 1, "ddp"), (2, 1, "fsdp")]
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for procs, threads, strategy in plan:
            name = f"{strategy}-{procs}x{threads}"
            runs[name] = launch(args, procs, threads, strategy, Path(tmp) / name)
            print(name, json.dumps(runs[name]), file=sys.stderr, flush=True)
    one = runs["none-1x2"]["tokens_per_s"]
    ddp, fsdp = runs["ddp-2x1"], runs["fsdp-2x1"]

    def state(run: dict) -> float:
        return sum(run["ranks"][0]["state_mb"].values())

    print(
        json.dumps(
            {
                "bench": "dist",
                "machine": {
                    "cores": cores,
                    "torch": torch.__version__,
                    "loadavg": os.getloadavg(),
                    "device": "cuda" if torch.cuda.is_available() else "cpu",
                },
                "model": {"d_model": args.d_model, "layers": args.layers, "vocab": VOCAB},
                "global_batch": [args.batch, args.seq],
                "precision": args.precision,
                "compile": args.compile,
                "runs": runs,
                "ratio": {
                    "ddp_2x1_vs_1x2": round(ddp["tokens_per_s"] / one, 3),
                    "fsdp_2x1_vs_1x2": round(fsdp["tokens_per_s"] / one, 3),
                    "fsdp_vs_ddp_state_per_rank": round(state(fsdp) / state(ddp), 3),
                },
            }
        )
    )


if __name__ == "__main__":
    main()
