"""Opening a GGUF file (llama.cpp's format), with one-line errors for what is not one: a missing,
truncated or corrupt file. gguf_import.py turns its tensors into a zerolm model and
gguf_tokenizer.py its metadata into a tokenizer; gguf_export.py writes the format.

The header is parsed here rather than by `gguf.GGUFReader`, which builds a numpy view per value
and takes 14 s on Qwen2's 151,936-token vocabulary (5 s on SmolLM2's); this reads it in well
under a second. The layout is GGUF v2/v3 as llama.cpp's ggml/include/gguf.h defines it, and
tests/interop/test_gguf_file.py checks the result equals the `gguf` package's reading. Tensor
data stays memory-mapped and is dequantised by `gguf.quants`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"GGUF"
# GGUF value types (gguf.h's enum gguf_type) -> struct format; 8 = string, 9 = array
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q"}
SCALARS |= {11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
NUMPY = {0: "u1", 1: "i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8"}
NUMPY |= {11: "<i8", 12: "<f8"}


@dataclass
class TensorInfo:
    """One tensor: GGUF's dims (fastest first, as gguf.ReaderTensor.shape), its type and its
    bytes (a memory-mapped view; shorter than n_bytes if the file is cut short)."""

    name: str
    shape: tuple[int, ...]
    tensor_type: Any  # gguf.GGMLQuantizationType
    data: np.ndarray
    n_bytes: int


@dataclass
class GGUFFile:
    meta: dict[str, Any]
    tensors: list[TensorInfo]


class _Cursor:
    def __init__(self, buf) -> None:
        self.buf, self.at = buf, 0

    def take(self, fmt: str):
        value = struct.unpack_from(fmt, self.buf, self.at)[0]
        self.at += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.take("<Q")
        if self.at + n > len(self.buf):
            raise ValueError(f"a string of {n} bytes runs past the end")
        raw = bytes(self.buf[self.at : self.at + n])
        self.at += n
        return raw.decode("utf-8")

    def value(self, kind: int):
        if kind in SCALARS:
            return self.take(SCALARS[kind])
        if kind == STRING:
            return self.string()
        if kind != ARRAY:
            raise ValueError(f"unknown value type {kind}")
        item, n = self.take("<I"), self.take("<Q")
        if item in NUMPY:
            size = np.dtype(NUMPY[item]).itemsize * n
            if self.at + size > len(self.buf):
                raise ValueError(f"an array of {n} values runs past the end")
            out = np.frombuffer(self.buf, NUMPY[item], n, self.at).tolist()
            self.at += size
            return out
        return [self.value(item) for _ in range(n)]


def open_gguf(path: str | Path) -> GGUFFile:
    """The metadata and the tensor table of `path` (tensor data memory-mapped, read when used)."""
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
    buf = np.memmap(p, dtype=np.uint8, mode="r")
    try:
        return _parse(buf)
    except (ValueError, struct.error, UnicodeDecodeError, OverflowError) as e:
        raise ValueError(
            f"{p} is a truncated or corrupt GGUF file ({type(e).__name__}: {e}); download or "
            "export it again"
        ) from None


def _parse(buf: np.memmap) -> GGUFFile:
    import gguf

    c = _Cursor(buf)
    c.at = 4
    version = c.take("<I")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} (zerolm reads versions 2 and 3)")
    n_tensors, n_kv = c.take("<Q"), c.take("<Q")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = c.string()
        meta[key] = c.value(c.take("<I"))
    table = []
    for _ in range(n_tensors):
        name = c.string()
        dims = tuple(c.take("<Q") for _ in range(c.take("<I")))
        table.append((name, dims, gguf.GGMLQuantizationType(c.take("<I")), c.take("<Q")))
    align = int(meta.get("general.alignment", 32))
    start = -(-c.at // align) * align
    tensors = []
    for name, dims, kind, offset in table:
        block, size = gguf.GGML_QUANT_SIZES[kind]
        n_bytes = int(np.prod(dims, dtype=np.int64)) // block * size
        data = buf[start + offset : start + offset + n_bytes]
        if kind not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            data = data.reshape(-1, dims[0] // block * size) if data.size == n_bytes else data
        tensors.append(TensorInfo(name, dims, kind, data, n_bytes))
    return GGUFFile(meta, tensors)


def fields(f: GGUFFile) -> dict[str, Any]:
    """The metadata as Python values: str, int, float, bool, or lists of them."""
    return f.meta
