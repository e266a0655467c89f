"""zerolm: a complete small-LLM system built from zero on PyTorch.

`zerolm.load(dir)` and `zerolm.fit(config)` are the Python API (zerolm/api.py, imported on first
use, so `import zerolm` stays cheap: no torch); the `zerolm` command is zerolm/cli.py. (`fit`, not
`train`: zerolm.train is the training subpackage.)
"""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from zerolm.api import Model, fit, load

__all__ = ["Model", "__version__", "fit", "load"]


def _version() -> str:
    """The installed distribution's version, else (a source checkout) pyproject.toml's."""
    try:
        return metadata.version("zerolm")
    except metadata.PackageNotFoundError:
        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        if not pyproject.is_file():
            return "0+unknown"
        return tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["version"]


__version__ = _version()


def __getattr__(name: str) -> Any:
    if name in ("Model", "fit", "load"):
        from zerolm import api

        return getattr(api, name)
    raise AttributeError(f"module 'zerolm' has no attribute {name!r}")
