"""Starting 2-process gloo jobs from a test: under torchrun, or as 2 plain processes (RANK,
WORLD_SIZE, MASTER_* set by hand: nothing kills the survivors when one rank dies)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra: str) -> dict[str, str]:
    paths = [str(ROOT), str(ROOT / "tests" / "dist"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(paths), **extra}


def torchrun(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node 2 ARGS` on a free port of 127.0.0.1."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["--master-addr", "127.0.0.1", "--master-port", str(free_port()), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(), cwd=ROOT)


def plain(*args: str, logs: list[Path] | None = None, **extra: str) -> list[subprocess.Popen]:
    """`python ARGS` as ranks 0 and 1 of a 2-process job, without torchrun; each rank's stderr a
    pipe, or with `logs` its stdout and stderr written to logs[rank]."""
    port = str(free_port())
    return [
        subprocess.Popen(
            [sys.executable, *args],
            env=env(
                RANK=str(r),
                LOCAL_RANK=str(r),
                WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
                **extra,
            ),
            stdout=subprocess.DEVNULL if logs is None else logs[r].open("w"),
            stderr=subprocess.PIPE if logs is None else subprocess.STDOUT,
            text=True,
            cwd=ROOT,
        )
        for r in range(2)
    ]
