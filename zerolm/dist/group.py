"""The process group: set up under torchrun (WORLD_SIZE > 1 in the environment), never otherwise.
A plain `zerolm pretrain` is one process and touches no torch.distributed; every helper here is then
a no-op (rank 0 of 1). Backend by device: nccl on CUDA, gloo on CPU.

Rank 0 writes the logs and files; the other ranks log warnings and errors only, prefixed with their
rank, and print nothing to stdout.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import difflib
import logging
import os
import sys
from typing import Any

import torch
import torch.distributed as dist

from zerolm.config import Config, DistConfig, to_toml

log = logging.getLogger(__name__)
_timeout = [0.0]  # the process group's, in seconds (init)


def env_world_size() -> int:
    """The WORLD_SIZE torchrun set (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def strategy(cfg: DistConfig) -> str:
    """The strategy this process trains with: none in one process, else dist.strategy (ddp when
    left empty); ValueError for `none` under torchrun, which would train N unrelated copies."""
    n = env_world_size()
    if n == 1:
        return "none"
    if cfg.strategy == "none":
        raise ValueError(
            f"--dist.strategy=none under torchrun with WORLD_SIZE={n}: each process would train "
            "its own copy; use --dist.strategy=ddp or fsdp, or run without torchrun"
        )
    return cfg.strategy or "ddp"


def init(cfg: DistConfig) -> None:
    """Join the job's process group when WORLD_SIZE > 1 (once; a no-op in one process)."""
    if env_world_size() == 1 or active():
        return
    strategy(cfg)  # a bad strategy fails before any rank waits for another
    _timeout[0] = cfg.timeout
    cuda = torch.cuda.is_available()
    if cuda:  # "cuda" means this rank's own GPU from here on (new_model builds on it)
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(
        "nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=cfg.timeout)
    )
    atexit.register(cleanup)
    if not is_main():
        _quiet(rank())


def cleanup() -> None:
    """Leave the process group (registered at exit by init)."""
    if active():
        dist.destroy_process_group()


class _RankFilter(logging.Filter):
    """Warnings and errors only, with the rank in front (for ranks other than 0)."""

    def __init__(self, rank: int):
        super().__init__()
        self.prefix = f"[rank {rank}] "

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return False
        if not str(record.msg).startswith(self.prefix):
            record.msg = self.prefix + str(record.msg)
        return True


def _quiet(rank: int) -> None:
    for handler in logging.getLogger().handlers:
        handler.addFilter(_RankFilter(rank))
    sys.stdout = open(os.devnull, "w")  # the commands' result lines come from rank 0


def check_batch(batch_size: int, world: int) -> None:
    """ValueError unless the global micro-batch splits evenly over the ranks."""
    if batch_size % world:
        fit = -(-batch_size // world) * world
        raise ValueError(
            f"train.batch_size {batch_size} (sequences per micro-batch, all ranks together) is not "
            f"divisible by the world size {world}: use --train.batch_size={fit} (or a multiple of "
            f"{world})"
        )


def setup(cfg: Config) -> None:
    """init, then check that every rank resolved the same config (ValueError naming the first
    differing line otherwise) and that its batch splits over them."""
    init(cfg.dist)
    if not active():
        return
    texts: list[Any] = [None] * world_size()
    dist.all_gather_object(texts, to_toml(cfg))
    for r, text in enumerate(texts):
        if text != texts[0]:
            diff = [
                line
                for line in difflib.unified_diff(texts[0].splitlines(), text.splitlines(), n=0)
                if line[:1] in "+-" and line[:3] not in ("+++", "---")
            ]
            raise ValueError(
                f"rank {r} resolved a different config from rank 0's ({' vs '.join(diff[:2])}): "
                "every rank must get the same command line, recipe and files"
            )
    check_batch(cfg.train.batch_size, world_size())


class PeerError(ValueError):
    """A collective failed because another rank died or stopped answering; a ValueError, so the
    CLI prints one line."""


_LOST = ("Connection reset", "Connection closed", "Broken pipe", "timed out", "Timed out", "NCCL")


def lost_peer(e: BaseException, doing: str, after: str) -> PeerError | None:
    """The PeerError for `e` if it is a failed collective of this job (None otherwise): it names
    the other rank where there is one, what this rank was `doing`, and `after` (what to do)."""
    if not active() or not (isinstance(e, dist.DistError) or any(s in str(e) for s in _LOST)):
        return None
    peer = f"rank {1 - rank()}" if world_size() == 2 else "another rank"
    cause = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0][:200]
    return PeerError(
        f"rank {rank()} lost {peer} while {doing} ({cause}): {peer} died, or hung for "
        f"--dist.timeout={_timeout[0]:g}s; its own log or torchrun's summary says why. {after}"
    )


def barrier() -> None:
    if active():
        dist.barrier()


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (e.g. preparing data into the output directory), the others
    after it has finished (finding the work done)."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(values: list[float]) -> list[float]:
    """The element-wise sum of `values` over the ranks (float64)."""
    if not active():
        return values
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.tolist()


def all_gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order ([obj] in one process)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
