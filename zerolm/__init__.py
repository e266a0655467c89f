"""zerolm: a complete small-LLM system built from zero on PyTorch.

`zerolm.load(dir)` and `zerolm.train(config)` are the Python API (zerolm/api.py, imported on first
use, so `import zerolm` stays cheap: no torch); the `zerolm` command is zerolm/cli.py.
"""

from __future__ import annotations

import importlib
import sys
import tomllib
import types
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from zerolm.api import Model, load

__all__ = ["Model", "__version__", "load", "train"]


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


class _TrainPackage(types.ModuleType):
    """`zerolm.train` names the training subpackage, so the API's train() cannot be a plain
    attribute (importing zerolm.train.X rebinds it): the subpackage itself is made callable."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from zerolm.api import train

        return train(*args, **kwargs)


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        if name == "train" and isinstance(value, types.ModuleType):  # the import system binds it
            value.__class__ = _TrainPackage
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    if name in ("Model", "load"):
        from zerolm import api

        return getattr(api, name)
    if name == "train":  # zerolm/train/__init__.py imports nothing: still cheap
        return importlib.import_module("zerolm.train")
    raise AttributeError(f"module 'zerolm' has no attribute {name!r}")
