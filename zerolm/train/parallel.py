"""Data parallelism for the one Trainer: DDP or FSDP2 around a stage's loss, each rank's share of a
global batch, gradient accumulation without inner all-reduces, losses weighted over the whole
global batch, and full (unsharded) state dicts for one-process checkpoint files and the final model.

The unit that DDP wraps and FSDP2 shards is the loss, not the model (`LossModule`): a stage's loss
may call any method of its model (hidden, encode, score, ...), and all of that then runs inside
their forward. FSDP2 shards a copy of the stage's model (each `blocks` entry, then the root) and
frees the original's parameters; rank 0 gets the trained weights back into the original
(`full_model`) for evaluation, samples and the final save.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch
from torch import nn

from zerolm.dist import group
from zerolm.train.losses import LossResult

log = logging.getLogger(__name__)


def shard_rows(batch: Any, rank: int, world: int, groups: int = 1) -> Any:
    """This rank's rows of a global batch: each tensor's dim 0 cut into `world` contiguous
    near-equal blocks, within each of `groups` equal parts (rows laid out as B chosen then B
    rejected: groups=2); through tuples, lists and dicts; anything else as it is."""
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 0:
            return batch
        parts = [p.tensor_split(world)[rank] for p in batch.tensor_split(groups)]
        return parts[0] if groups == 1 else torch.cat(parts)
    if isinstance(batch, (tuple, list)):
        return type(batch)(shard_rows(b, rank, world, groups) for b in batch)
    if isinstance(batch, dict):
        return {k: shard_rows(v, rank, world, groups) for k, v in batch.items()}
    return batch


class LossModule(nn.Module):
    """A stage's loss as a module: batch -> loss(model, batch), a LossResult."""

    def __init__(self, model: nn.Module, loss: Callable[[Any, Any], LossResult]):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, batch) -> LossResult:
        return self.loss(self.model, batch)


def _release(model: nn.Module) -> None:
    """Free the parameters' storage, keeping the Parameter objects (and so the ties)."""
    for p in model.parameters():
        p.data = p.data.new_empty(0)


class Parallel:
    """How the Trainer runs on this process: `strategy` none (one process: every method is the
    identity), ddp or fsdp. `row_groups`: see shard_rows."""

    def __init__(self, model: nn.Module, strategy: str, row_groups: int = 1):
        self.model, self.strategy, self.row_groups = model, strategy, row_groups
        self.rank, self.world = group.rank(), group.world_size()
        assert strategy == "none" or group.active(), "ddp/fsdp need init_process_group first"
        self.main = self.rank == 0
        self.trained: nn.Module = model  # whose parameters the optimizer updates
        self.module: nn.Module | None = None

    def wrap(self, loss: Callable[[Any, Any], LossResult], precision: str) -> nn.Module:
        """The training module (batch -> LossResult) for `loss`; under fsdp, self.trained becomes
        the sharded copy of the model (its optimizer must be built afresh)."""
        if self.strategy == "fsdp":
            self.trained = copy.deepcopy(self.model)
            _release(self.model)
            self.module = _fully_shard(LossModule(self.trained, loss), precision)
        elif self.strategy == "ddp":
            self.module = nn.parallel.DistributedDataParallel(LossModule(self.model, loss))
        else:
            self.module = LossModule(self.model, loss)
        return self.module

    def shard(self, batch):
        return (
            batch if self.world == 1 else shard_rows(batch, self.rank, self.world, self.row_groups)
        )

    @contextlib.contextmanager
    def accumulating(self, inner: bool) -> Iterator[None]:
        """An inner micro-step keeps its gradients local (no all-reduce / reduce-scatter)."""
        m: Any = self.module
        if not inner or self.strategy == "none":
            yield
        elif isinstance(m, nn.parallel.DistributedDataParallel):
            with m.no_sync():
                yield
        else:
            m.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                m.set_requires_gradient_sync(True)

    def reduce(self, out: LossResult) -> tuple[float, int, dict[str, float], float]:
        """(loss of the global micro-batch, items counted in it, stats averaged over the ranks,
        the factor for this rank's loss before backward). The global loss weights each rank's by
        what its mean is over (out.weight, else out.n), and the factor makes the gradients that
        DDP / FSDP average over the ranks those of that weighted loss: a step equals one process's
        on the concatenated batch."""
        loss, n = out.loss.item(), float(out.n)
        stats = {k: float(v) for k, v in out.stats.items()}
        if self.world == 1:
            return loss, int(n), stats, 1.0
        w = n if out.weight is None else float(out.weight)
        total = group.all_sum([loss * w, w, n, *stats.values()])
        weight = max(total[1], 1.0)
        mean = {k: v / self.world for k, v in zip(stats, total[3:])}
        return total[0] / weight, int(total[2]), mean, w * self.world / weight

    # ------------------------------------------------------------ full state dicts
    def load_full_state(self, optimizer, model: dict, optim: dict) -> None:
        """Under fsdp, the state dicts of a one-process checkpoint file (every rank holds them
        whole, with the optimizer's parameters by index) put into the shards."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.trained, model, options=opts)
        names = self._names(optimizer)
        optim = {
            "state": {names[i]: v for i, v in optim["state"].items()},
            "param_groups": [
                {**g, "params": [names[i] for i in g["params"]]} for g in optim["param_groups"]
            ],
        }
        set_optimizer_state_dict(self.trained, optimizer, optim, options=opts)

    def _names(self, optimizer) -> list[str]:
        """The parameter names in the optimizer's order (the indices of its state_dict)."""
        name = {id(p): n for n, p in self.trained.named_parameters()}
        return [name[id(p)] for g in optimizer.param_groups for p in g["params"]]

    def full_model(self, keep: bool = False) -> contextlib.AbstractContextManager:
        """A context giving the stage's model with the trained weights on rank 0, None on the
        others. Under fsdp they are gathered (every rank must enter) and, unless `keep`, freed
        again on leaving."""
        if self.strategy != "fsdp":
            return contextlib.nullcontext(self.model if self.main else None)
        return self._gathered(keep)

    @contextlib.contextmanager
    def _gathered(self, keep: bool) -> Iterator[nn.Module | None]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full: dict[str, Any] = get_model_state_dict(self.trained, options=opts)
        if not self.main:
            yield None
            return
        device = next(self.trained.parameters()).device
        for name, p in self.model.named_parameters():
            p.data = full[name].to(device)
        try:
            yield self.model
        finally:
            if not keep:
                _release(self.model)


def _fully_shard(module: LossModule, precision: str) -> nn.Module:
    """FSDP2: each entry of every `blocks` list its own unit, then the root (the rest: embeddings,
    final norm, head). bf16: parameters gathered and computed in bf16, gradients reduced in fp32;
    the root leaves the batch's floats alone (e.g. DPO's cached log-probs)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    bf16 = precision == "bf16"
    mp = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32 if bf16 else None
    )
    blocks = [
        b
        for name, m in module.named_modules()
        if name.rsplit(".", 1)[-1] == "blocks" and isinstance(m, nn.ModuleList)
        for b in m
    ]
    for block in blocks:
        fully_shard(block, mp_policy=mp)
    root = MixedPrecisionPolicy(
        param_dtype=mp.param_dtype, reduce_dtype=mp.reduce_dtype, cast_forward_inputs=False
    )
    return cast(nn.Module, fully_shard(module, mp_policy=root))
