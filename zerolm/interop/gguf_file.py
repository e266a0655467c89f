"""Opening a GGUF file (llama.cpp's format) with the `gguf` package, with one-line errors for what
is not one: a missing, truncated or corrupt file. gguf_import.py turns its tensors into a zerolm
model and gguf_tokenizer.py its metadata into a tokenizer; gguf_export.py writes the format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MAGIC = b"GGUF"


def open_gguf(path: str | Path):
    """A `gguf.GGUFReader` over `path` (memory-mapped: tensors are read when used)."""
    import gguf

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p} does not exist: give the path of a .gguf file")
    with p.open("rb") as f:
        head = f.read(4)
    if head != MAGIC:
        raise ValueError(
            f"{p} is not a GGUF file (it starts with {head!r}, not {MAGIC!r}): give a llama.cpp "
            ".gguf model file"
        )
    try:
        return gguf.GGUFReader(p)
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError) as e:
        raise ValueError(
            f"{p} is a truncated or corrupt GGUF file ({type(e).__name__}: {e}); download or "
            "export it again"
        ) from None


def fields(reader) -> dict[str, Any]:
    """The metadata as Python values: str, int, float, bool, or lists of them (GGUF.* header
    fields left out)."""
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
