"""Writing a Config as TOML that load_config reads back to an equal config."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from zerolm.config.schema import Config
from zerolm.files import atomic_write_text


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if v is None:
        raise AssertionError("None cannot be written to TOML")
    raise AssertionError(f"cannot write {type(v)} to TOML")


def to_toml(cfg, prefix: str = "") -> str:
    """Serialise a config tree to TOML that load_config reads back to an equal config."""
    scalars, sections = [], []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            sections.append(f"\n[{prefix}{f.name}]\n" + to_toml(v, f"{prefix}{f.name}."))
        elif v is not None:  # None (TOML has no null) means "the default": leave the key out
            scalars.append(f"{f.name} = {_toml_value(v)}\n")
    return "".join(scalars) + "".join(sections)


def save_config(cfg: Config, out_dir: str | Path) -> Path:
    """Write the resolved config as out_dir/config.toml (atomically)."""
    path = Path(out_dir) / "config.toml"
    atomic_write_text(path, to_toml(cfg))
    return path
