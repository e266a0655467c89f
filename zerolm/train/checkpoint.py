"""Training checkpoints: model (safetensors) + optimizer + RNG + data position + step, written
into a temporary directory and renamed into place, so a crash never leaves a partial one (and
the temporary directory a kill -9 leaves is removed at the next start). Weights with a NaN or an
inf are never written, so pruning to the newest `keep` never drops a good one for a bad one.

    OUT/checkpoints/step-0000200/{model.safetensors, state.pt, config.json}

That is the format of one process; under torchrun each rank writes its shards instead
(zerolm/train/sharded.py: DCP's .metadata in place of model.safetensors). Both load anywhere.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from zerolm.files import atomic_dir, disk_full
from zerolm.model import load_state

log = logging.getLogger(__name__)
_NAME = re.compile(r"^step-(\d{7})$")
_PARTIAL = re.compile(r"^\.step-\d{7}\.(.+\.tmp|old-\d+)$")  # atomic_dir's temporaries


class NonFiniteError(ValueError):
    """Training produced NaN/inf (loss, gradients or weights); a ValueError, so the CLI prints one
    line."""


def last_good(out_dir: str | Path) -> str:
    found = list_checkpoints(out_dir)
    return f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was saved yet"


def nonfinite_tensors(state: dict) -> list[str]:
    return [
        k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]


def remove_partial(out_dir: str | Path) -> None:
    """Delete the temporary directories of saves that a kill -9 cut short."""
    root = Path(out_dir) / "checkpoints"
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        if _PARTIAL.match(p.name) and p.is_dir():
            log.info("removing %s: a checkpoint save that was cut short", p)
            shutil.rmtree(p, ignore_errors=True)


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(
        p
        for p in root.iterdir()
        if _NAME.match(p.name)
        and (p / "state.pt").is_file()
        and ((p / "model.safetensors").is_file() or (p / ".metadata").is_file())
    )


def prune(out_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints, each renamed first: a kill mid-delete leaves
    a partial (removed at the next start), not a step."""
    for old in list_checkpoints(out_dir)[:-keep]:
        gone = old.with_name(f".{old.name}.old-{os.getpid()}")
        os.replace(old, gone)
        shutil.rmtree(gone, ignore_errors=True)


# numpy's stub types np.random.get_state() as legacy=False's dict; it returns the legacy tuple
# (name, key, pos, has_gauss, gauss), hence the ignores on its indexing below.


def rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state()[1].tolist(),  # type: ignore[index]
        "python": random.getstate()[1],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np_state = np.random.get_state()
    key = np.array(state["numpy"], dtype=np.uint32)
    np.random.set_state((np_state[0], key, *np_state[2:]))  # type: ignore[index]
    py = random.getstate()
    random.setstate((py[0], tuple(state["python"]), py[2]))


def save_checkpoint(
    out_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer,
    extra: dict,
    keep: int,
    run: dict | None = None,
) -> Path:
    """Write checkpoint `step` atomically and delete all but the newest `keep`. Non-finite weights
    raise NonFiniteError and write nothing; so does a full disk, as a ValueError naming the
    directory. `run` is the fingerprint a resume compares (zerolm/train/fingerprint.py)."""
    path = Path(out_dir) / "checkpoints" / f"step-{step:07d}"
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if bad := nonfinite_tensors(state):
        raise NonFiniteError(
            f"refusing to save checkpoint {path.name}: non-finite weights in {', '.join(bad[:3])}"
            f"{f' and {len(bad) - 3} more' if len(bad) > 3 else ''}; {last_good(out_dir)}"
        )
    try:
        with atomic_dir(path) as tmp:
            save_file(state, str(tmp / "model.safetensors"))
            torch.save(
                {"step": step, "optimizer": optimizer.state_dict(), "rng": rng_state(), **extra},
                tmp / "state.pt",
            )
            config = {
                "zerolm_model": model.cfg.__dict__,
                **({"run": run} if run is not None else {}),
            }
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
    except (OSError, SafetensorError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not _is_write_error(e):
            raise
        full = disk_full(e)
        raise ValueError(
            f"could not write checkpoint {path.name} into {path.parent}: "
            f"{'the disk is full' if full else str(e).strip().splitlines()[0][:200]}; "
            f"nothing partial was kept. Free space there (or lower --train.keep_checkpoints) and "
            f"resume with --train.resume=true; {last_good(out_dir)}"
        ) from None
    prune(out_dir, keep)
    return path


def _is_write_error(e: RuntimeError) -> bool:
    """torch.save reports a failed write as a RuntimeError from its zip writer."""
    return any(
        s in str(e) for s in ("PytorchStreamWriter failed", "file write failed", "No space left")
    )


def load_checkpoint(path: str | Path, model: nn.Module, optimizer, put=None) -> dict:
    """Restore model + optimizer + RNG from `path`; returns the saved extras (step, loader, ...).
    `put(optimizer, model_state, optimizer_state)` loads the two where the caller places them
    (into FSDP2 shards), else they go into the model and optimizer as they are."""
    path = Path(path)
    state = load_file(str(path / "model.safetensors"))
    saved = torch.load(path / "state.pt", weights_only=True)
    if put is not None:
        put(optimizer, state, saved.pop("optimizer"))
    else:
        load_state(model, state, str(path), assign=False)
        optimizer.load_state_dict(saved.pop("optimizer"))
    set_rng_state(saved.pop("rng"))
    return saved
