"""A tensor-parallel server (`torchrun --nproc-per-node N -m zerolm serve --tp N`): rank 0 runs
the HTTP server and the scheduler, the other ranks follow it.

Each rank holds its shard of every block (dist/tensor.py) and a KV cache of its own kv heads. The
scheduler's model passes and KV-cache changes (scheduler.run_op: prefill, decode, reset, move,
scrub) go through `Leader.run` on rank 0, which broadcasts the operation's name and arguments
(token ids and slot numbers only) and then makes it; `follow` on every other rank receives each
operation and makes it on its own shard and cache. The passes' all-reduces line up, every rank's
cache holds the same sequences, and rank 0 alone samples, from the logits it broadcasts.

Waiting for requests, rank 0 sends a heartbeat every `heartbeat` seconds, so the followers' waits
never reach the process group's timeout (--dist.timeout); shutting down, it sends "stop" and every
rank exits 0. A follower whose rank 0 died exits non-zero with one line saying so.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path

import torch

from zerolm.config import DistConfig
from zerolm.dist import group
from zerolm.infer.engine import Engine
from zerolm.infer.kv_cache import KVCache
from zerolm.model import load_model
from zerolm.model.protocol import LanguageModel
from zerolm.serve.scheduler import run_op

log = logging.getLogger(__name__)


def load_sharded(model_dir: str | Path, tp: int, cfg: DistConfig) -> LanguageModel:
    """This rank's shard of the model (every rank of the torchrun job calls it)."""
    from zerolm.dist.tensor import mesh, tensor_parallel

    tp_mesh = mesh(tp, cfg)  # nccl on CUDA: each rank's weights on its own GPU
    device = tp_mesh.device_type if tp_mesh.device_type == "cuda" else "cpu"
    return tensor_parallel(load_model(model_dir, device=device), tp_mesh)


class Leader:
    """Rank 0's side: the scheduler's engine and cache (Scheduler's `mirror`), every operation
    on them made by every rank."""

    def __init__(self, model: LanguageModel, max_batch: int, heartbeat: float = 60.0):
        self.engine, self.cache = Engine(model), KVCache.for_model(model, max_batch)
        self.heartbeat = heartbeat
        self.broken = ""  # why the followers cannot be reached, once they cannot
        self._lock = threading.Lock()  # one collective at a time: an operation, or a heartbeat
        self._last = time.monotonic()
        self._closed = threading.Event()
        threading.Thread(target=self._beat, name="zerolm-tp-heartbeat", daemon=True).start()

    def run(self, op: str, args: tuple):
        with self._lock:
            if self.broken:  # no pass can complete: fail at once
                raise RuntimeError(f"{self.broken}: restart the server")
            self._send(op, args)
            return run_op(self.engine, self.cache, op, args)

    def _send(self, op: str, args: tuple) -> None:
        """Broadcast an operation (under the lock); a lost follower is kept in `broken`, which
        /health reports, and raised."""
        try:
            group.broadcast((op, args))
        except Exception as e:
            self.broken = self.broken or f"a tensor-parallel rank is gone ({str(e).strip()[:200]})"
            raise
        self._last = time.monotonic()

    def close(self) -> None:
        """Tell the followers to exit (once; a follower already gone is logged, not raised)."""
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
            try:
                self._send("stop", ())
            except Exception:
                log.warning(
                    "tensor-parallel shutdown: a follower is already gone (%s)", self.broken
                )

    def _beat(self) -> None:
        while not self._closed.wait(self.heartbeat / 4):
            with self._lock:
                if self._closed.is_set() or time.monotonic() - self._last < self.heartbeat:
                    continue
                try:
                    self._send("ping", ())
                except Exception:  # a follower is gone: /health says so
                    log.error("tensor-parallel heartbeat failed: %s", self.broken)
                    return


def follow(model: LanguageModel, max_batch: int) -> None:
    """A follower rank: make rank 0's operations on this rank's shard until it says "stop".
    SIGTERM and Ctrl-C are left to rank 0 (torchrun sends them to every rank): it finishes or
    cancels what runs, then says "stop"."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    engine, cache = Engine(model), KVCache.for_model(model, max_batch)
    rank = group.rank()
    with torch.inference_mode():
        while True:
            try:
                op, args = group.broadcast(None)
            except Exception as e:
                raise RuntimeError(
                    f"rank {rank} lost rank 0, the server ({str(e).strip()[:200]}): rank 0 died "
                    "or hung; its own output or torchrun's summary says why"
                ) from None
            if op == "stop":
                return
            if op == "ping":
                continue
            try:
                run_op(engine, cache, op, args)
            except Exception:  # rank 0 fails the same pass and ends the sequences in it
                log.exception("rank %d: the scheduler's %s failed", rank, op)
