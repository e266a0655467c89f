"""Tensor parallelism for inference, a transform on a built decoder: each block's attention and FFN
split over the ranks of a 1-D device mesh (the plan of gpt-fast and torchtitan), everything else
replicated.

Per block: q, k, v and up (and gate) column-wise (DTensor placement Shard(0) of the weight), so a
rank computes whole heads (H/N query heads, K/N kv heads, GQA groups kept together) and F/N FFN
channels of its own; o and down row-wise (Shard(1)), whose partial products are summed by one
all-reduce each, so every block's output is whole on every rank. The token embedding, positions,
norms and LM head stay replicated (the simplest plan: only the blocks' matmuls are split). The
attention modules then run with their local head counts and `model.cfg` describes this rank's
shard (n_heads, n_kv_heads, d_ff divided by N), so the KV cache a rank allocates holds only its
own kv heads. Logits are broadcast from rank 0, so every rank samples from the same numbers (with
the same seed: text.py).

DTensor's `distribute_tensor` cuts each weight into its shards. The blocks then run on the local
shards as plain tensors, with the row-wise all-reduce written out: `parallelize_module`'s
per-operation DTensor dispatch cost ~35 ms of a 65 ms decode token on this CPU (torch.profiler,
2 gloo ranks, speedrun-shaped llama), and the plain shards decode 4.1x faster with the same
tokens.

For the split layout `load_model` builds: the fused decode layout (transforms/layout.py) is not
applied on top; quantized layers and the compiled decode step are not supported.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
from torch import nn

from zerolm.model.attention import Attention
from zerolm.model.layers import FFN
from zerolm.model.presets import head_size
from zerolm.model.protocol import LanguageModel


def check_divisible(cfg: Any, n: int) -> None:
    """ValueError unless N divides the query heads, the kv heads and the FFN width."""
    bad = [
        f"{name}={value}"
        for name, value in (
            ("n_heads", cfg.n_heads),
            ("n_kv_heads", cfg.n_kv_heads),
            ("d_ff", cfg.d_ff),
        )
        if value % n
    ]
    if bad:
        fits = [
            t
            for t in range(1, cfg.n_kv_heads + 1)
            if not (cfg.n_heads % t or cfg.n_kv_heads % t or cfg.d_ff % t)
        ]
        raise ValueError(
            f"--tp {n} does not divide the model's {', '.join(bad)} (n_heads={cfg.n_heads}, "
            f"n_kv_heads={cfg.n_kv_heads}): each rank takes whole heads; use --tp in {fits}"
        )


def check_launch(n: int | None, compile: bool = False) -> None:
    """ValueError unless this process runs under torchrun with WORLD_SIZE == n (and no --compile);
    n None (no --tp given): unless it runs outside torchrun (or as its only process)."""
    world = os.environ.get("WORLD_SIZE")
    if n is None:
        if world is not None and int(world) > 1:
            raise ValueError(
                f"under torchrun with WORLD_SIZE={world} each process would decode on its own: "
                f"pass --tp {world} to split the model over them, or run without torchrun"
            )
        return
    if n < 1:
        raise ValueError(f"--tp {n}: give a tensor-parallel degree of 1 or more")
    if n > 1 and world is None:
        raise ValueError(
            f"--tp {n} needs one process per rank: run `torchrun --nproc-per-node {n} -m zerolm "
            "...` (WORLD_SIZE is unset: this is not a torchrun process)"
        )
    if world is not None and int(world) != n:
        raise ValueError(
            f"--tp {n} under torchrun with WORLD_SIZE={world}: start torchrun with "
            f"--nproc-per-node {n}, or pass --tp {world}"
        )
    if n > 1 and compile:
        raise ValueError(
            "--compile with --tp is not supported (the ahead-of-time decode step is built for one "
            "process): drop --compile"
        )


def mesh(n: int, cfg: Any = None):
    """Join the torchrun job (gloo on CPU, nccl on CUDA; `cfg`: its DistConfig, e.g. the timeout)
    and return its 1-D mesh of n ranks."""
    from torch.distributed.device_mesh import init_device_mesh

    from zerolm.config import DistConfig
    from zerolm.dist import group

    check_launch(n)
    group.init(cfg or DistConfig())
    return init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (n,))


def _plain(*mods: nn.Module | None) -> bool:
    return all(m is None or type(m) is nn.Linear for m in mods)


class RowParallelLinear(nn.Module):
    """This rank's Shard(1) columns of a Linear: x (..., in/N) -> the whole (..., out), the ranks'
    partial products summed by one all-reduce, then the bias (whole on every rank) added once."""

    def __init__(self, lin: nn.Linear, tp_mesh):
        super().__init__()
        from torch.distributed.tensor import Shard, distribute_tensor

        self.group = tp_mesh.get_group()
        w = distribute_tensor(lin.weight.detach(), tp_mesh, [Shard(1)]).to_local()
        self.weight = nn.Parameter(w, requires_grad=False)
        b = lin.bias  # replicated: the same on every rank, as loaded
        self.bias = None if b is None else nn.Parameter(b.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        y = torch.nn.functional.linear(x, self.weight)
        dist.all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias


def _column(lin: nn.Linear, tp_mesh) -> None:
    """Keep this rank's Shard(0) rows of `lin` (and of its bias), in place."""
    from torch.distributed.tensor import Shard, distribute_tensor

    for name in ("weight", "bias"):
        if (t := getattr(lin, name)) is not None:
            local = distribute_tensor(t.detach(), tp_mesh, [Shard(0)]).to_local()
            setattr(lin, name, nn.Parameter(local, requires_grad=False))
    lin.out_features = lin.weight.shape[0]


def tensor_parallel(model: LanguageModel, tp_mesh) -> LanguageModel:
    """Shard `model`'s blocks over `tp_mesh` (in place; see the module docstring). ValueError for a
    degree that does not divide the heads or the FFN width, or for layers other than nn.Linear
    (quantized, LoRA-wrapped, fused)."""
    n = tp_mesh.size()
    m: Any = model  # a Transformer: its blocks and cfg are rewritten below
    cfg = m.cfg
    check_divisible(cfg, n)
    blocks = getattr(m, "blocks", None)
    if blocks is None or getattr(m, "encoder", None) is not None:
        raise ValueError("--tp supports decoder-only models (gpt2, llama, simple) only")
    for i, block in enumerate(blocks):
        attn, ffn = block.attn, block.ffn
        if type(attn) is not Attention or type(ffn) is not FFN:
            raise ValueError(f"--tp: block {i} is not in load_model's split layout")
        if not _plain(attn.q, attn.k, attn.v, attn.o, ffn.up, ffn.gate, ffn.down):
            raise ValueError(
                "--tp supports float models only (nn.Linear layers): this one is quantized or "
                "has adapters; use the float model directory (before `zerolm quantize`)"
            )
    for block in blocks:
        attn, ffn = block.attn, block.ffn
        for lin in (attn.q, attn.k, attn.v, ffn.up, ffn.gate):
            if lin is not None:
                _column(lin, tp_mesh)
        attn.o, ffn.down = RowParallelLinear(attn.o, tp_mesh), RowParallelLinear(ffn.down, tp_mesh)
        attn.h, attn.kv = attn.h // n, attn.kv // n  # the heads of this rank
        ffn.d_ff //= n
    m.cfg = dataclasses.replace(
        cfg,
        n_heads=cfg.n_heads // n,
        n_kv_heads=cfg.n_kv_heads // n,
        d_ff=cfg.d_ff // n,
        head_dim=head_size(cfg),  # explicit: d_model / (n_heads / N) would be wrong
    )
    m.tp_degree = n
    _broadcast_logits(m, tp_mesh)
    return model


def _broadcast_logits(model: Any, tp_mesh) -> None:
    """model.logits gives rank 0's values on every rank (one broadcast per call)."""
    import torch.distributed as dist

    pg = tp_mesh.get_group()
    src = dist.get_global_rank(pg, 0)
    logits = model.logits

    def same_logits(hidden: torch.Tensor) -> torch.Tensor:
        out = logits(hidden).contiguous()
        dist.broadcast(out, src=src, group=pg)
        return out

    model.logits = same_logits
