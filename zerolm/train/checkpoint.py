"""Training checkpoints: model (safetensors) + optimizer + RNG + data position + step, written
into a temporary directory and renamed into place, so a crash never leaves a partial one.

    OUT/checkpoints/step-0000200/{model.safetensors, state.pt, config.json}
"""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from zerolm.files import atomic_dir

_NAME = re.compile(r"^step-(\d{7})$")


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if _NAME.match(p.name) and (p / "state.pt").is_file())


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].tolist(),
            "python": random.getstate()[1]}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np_state = np.random.get_state()
    np.random.set_state((np_state[0], np.array(state["numpy"], dtype=np.uint32), *np_state[2:]))
    py = random.getstate()
    random.setstate((py[0], tuple(state["python"]), py[2]))


def save_checkpoint(out_dir: str | Path, step: int, model, optimizer, extra: dict, keep: int) -> Path:
    """Write checkpoint `step` atomically and delete all but the newest `keep`."""
    path = Path(out_dir) / "checkpoints" / f"step-{step:07d}"
    with atomic_dir(path) as tmp:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "rng": rng_state(), **extra},
                   tmp / "state.pt")
        (tmp / "config.json").write_text(json.dumps({"zerolm_model": model.cfg.__dict__}, indent=2))
    for old in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint(path: str | Path, model, optimizer) -> dict:
    """Restore model + optimizer + RNG from `path`; returns the saved extras (step, loader, ...)."""
    from zerolm.model import load_state

    path = Path(path)
    state = load_file(str(path / "model.safetensors"))
    load_state(model, state, str(path), assign=False)
    saved = torch.load(path / "state.pt", weights_only=True)
    optimizer.load_state_dict(saved.pop("optimizer"))
    set_rng_state(saved.pop("rng"))
    return saved
