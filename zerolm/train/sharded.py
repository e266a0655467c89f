"""Sharded training checkpoints under torchrun, with torch.distributed.checkpoint (DCP): every rank
writes its own shards of the model and optimizer (no gather to rank 0) and its own RNG state, into
a temporary directory that rank 0 renames into place once every rank has finished, so a
half-written checkpoint never has a checkpoint's name:

    OUT/checkpoints/step-0000200/{.metadata, __0_0.distcp, __1_0.distcp, rng-0.pt, rng-1.pt,
                                  state.pt, config.json}

state.pt holds what every rank shares (step, data position, lr_scale, ...). DCP stores each tensor
by name with its global shape, so a checkpoint loads into any world size and strategy, one
process included (no process group needed). The single-process format stays that of
zerolm/train/checkpoint.py; the Trainer writes this one when the world is larger than 1 and loads
either (`is_sharded`). Every function here that writes is a collective: all ranks call it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from zerolm.dist import group
from zerolm.files import disk_full, publish_tree
from zerolm.train.checkpoint import (
    NonFiniteError,
    last_good,
    nonfinite_tensors,
    prune,
    rng_state,
    set_rng_state,
)

log = logging.getLogger(__name__)


def is_sharded(path: str | Path) -> bool:
    """Whether checkpoint `path` is a DCP one (its .metadata is written last, by rank 0)."""
    return (Path(path) / ".metadata").is_file()


def _local(t: Any) -> Any:
    return t.to_local() if hasattr(t, "to_local") else t


def same_on_every_rank(obj: Any) -> bool:
    """Whether `obj` equals rank 0's on every rank (the same answer everywhere)."""
    differs = float(group.broadcast(obj) != obj)
    return group.all_sum([differs])[0] == 0


def _write_error(path: Path, why: BaseException | None, out_dir: str | Path) -> ValueError:
    """The one-line error of a save that failed on some rank (`why`: this rank's, if here)."""
    if why is None:
        what = "another rank could not write its shards (its log says why)"
    elif disk_full(why) or "No space left" in str(why):
        what = "the disk is full"
    else:
        what = (str(why).strip().splitlines() or [type(why).__name__])[0][:200]
    return ValueError(
        f"could not write checkpoint {path.name} into {path.parent}: {what}; nothing partial "
        f"was kept. Free space there (or lower --train.keep_checkpoints) and resume with "
        f"--train.resume=true; {last_good(out_dir)}"
    )


def _publish(tmp: Path, path: Path, out_dir: str | Path, keep: int) -> None:
    """Rank 0: the complete `tmp` renamed to `path` (replacing a re-saved step), then pruning."""
    publish_tree(tmp)
    if path.exists():  # the same step saved again (a rollback's re-save)
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, path)
    prune(out_dir, keep)


def save_sharded(
    out_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer,
    state: dict,
    config: dict,
    keep: int,
) -> Path:
    """Write checkpoint `step` of `model` (the module the optimizer updates: plain, or FSDP2's
    sharded copy) and `optimizer`, with rank 0's `state` (torch.save) and `config` (JSON), then
    keep the newest `keep`. Non-finite weights on any rank raise NonFiniteError everywhere and
    write nothing."""
    path = Path(out_dir) / "checkpoints" / f"step-{step:07d}"
    tmp = path.with_name(f".{path.name}.dcp.tmp")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    bad = nonfinite_tensors({k: _local(v) for k, v in model_sd.items()})
    if group.all_sum([float(len(bad))])[0]:
        raise NonFiniteError(
            f"refusing to save checkpoint {path.name}: non-finite weights"
            f"{' in ' + ', '.join(bad[:3]) if bad else ' on another rank'}; {last_good(out_dir)}"
        )
    same = same_on_every_rank(state["data"])  # a collective: not inside the assert (python -O)
    assert same, "the ranks' data positions differ: they must draw the same global batches"
    if group.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    group.barrier()
    try:
        # collective: returns on every rank once all shards and rank 0's .metadata are written
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
        torch.save(rng_state(), tmp / f"rng-{group.rank()}.pt")
        if group.is_main():
            torch.save({"step": step, **state}, tmp / "state.pt")
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
        why: BaseException | None = None
    except (OSError, CheckpointException) as e:  # DCP reports a failed write on every rank
        why = e
    if group.all_sum([float(why is not None)])[0]:
        if group.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(path, why, out_dir)
    if group.is_main():
        _publish(tmp, path, out_dir, keep)
    group.barrier()  # no rank lists checkpoints before the rename
    return path


def load_sharded(path: str | Path, model: nn.Module, optimizer) -> dict:
    """Load DCP checkpoint `path` into `model` and `optimizer` (any world size, one process too)
    and this rank's RNG state (rank 0's where the saving job had fewer ranks); returns state.pt."""
    path = Path(path)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    both: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
    with warnings.catch_warnings():  # one process: DCP warns that it assumes one, as intended
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(both, checkpoint_id=path, no_dist=not group.active())
    set_state_dict(model, optimizer, model_state_dict=both["model"], optim_state_dict=both["optim"])
    rng = path / f"rng-{group.rank()}.pt"
    if not rng.is_file():
        log.warning(
            "%s was saved by fewer ranks: rank %d starts from rank 0's RNG state",
            path,
            group.rank(),
        )
        rng = path / "rng-0.pt"
    set_rng_state(torch.load(rng, weights_only=True))
    return torch.load(path / "state.pt", weights_only=True)
