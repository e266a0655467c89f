"""zerolm's GGUF header parser (gguf_file.py) against the `gguf` package's own reader: the same
metadata, tensor table and dequantised values, on the real SmolLM2 file and llama.cpp's
vocabulary files; and the errors for what is not a whole GGUF file."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize

from zerolm.interop.gguf_file import fields, open_gguf


def _reference(path):
    r = gguf.GGUFReader(path)
    return r, {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


def _same(path, n_tensors: int = 4) -> None:
    ours = open_gguf(path)
    reader, meta = _reference(path)
    assert fields(ours) == meta
    assert [t.name for t in ours.tensors] == [t.name for t in reader.tensors]
    for a, b in zip(ours.tensors, reader.tensors):
        assert a.shape == tuple(int(n) for n in b.shape) and a.tensor_type == b.tensor_type
        assert a.n_bytes == b.n_bytes == a.data.nbytes
    for a, b in list(zip(ours.tensors, reader.tensors))[:n_tensors]:
        ours, theirs = dequantize(a.data, a.tensor_type), dequantize(b.data, b.tensor_type)
        assert np.array_equal(ours.reshape(-1), theirs.reshape(-1))


@pytest.mark.slow
def test_smollm2_reads_as_the_gguf_package_reads_it(smollm2_gguf):
    _same(smollm2_gguf, n_tensors=12)  # Q8_0 embedding, F32 norms, Q4_1 matrices


@pytest.mark.parametrize("name", ["llama-spm", "bert-bge", "gpt-2"])
def test_vocabulary_files_read_as_the_gguf_package_reads_them(name, llama_cpp_models):
    _same(llama_cpp_models / f"ggml-vocab-{name}.gguf")


def test_written_values_of_every_kind_come_back(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    w.add_uint32("a.u32", 7)
    w.add_int64("a.i64", -3)
    w.add_float32("a.f32", 0.1)
    w.add_float64("a.f64", 0.1)
    w.add_bool("a.bool", True)
    w.add_string("a.str", "床前明月光")
    w.add_array("a.strs", ["x", "", "月"])
    w.add_array("a.ints", [1, -2, 3])
    w.add_tensor("t", np.arange(64, dtype=np.float32).reshape(2, 32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _same(tmp_path / "k.gguf")
    meta = fields(open_gguf(tmp_path / "k.gguf"))
    assert meta["a.strs"] == ["x", "", "月"] and meta["a.str"] == "床前明月光"
    assert meta["a.i64"] == -3 and meta["a.bool"] is True and meta["a.ints"] == [1, -2, 3]


def test_truncated_and_foreign_files_are_one_line_errors(smollm2_gguf, tmp_path):
    head = smollm2_gguf.read_bytes()[:300_000]  # cut inside the vocabulary
    (tmp_path / "cut.gguf").write_bytes(head)
    with pytest.raises(ValueError, match="truncated or corrupt GGUF"):
        open_gguf(tmp_path / "cut.gguf")
    (tmp_path / "v9.gguf").write_bytes(b"GGUF" + (9).to_bytes(4, "little") + bytes(16))
    with pytest.raises(ValueError, match="version 9"):
        open_gguf(tmp_path / "v9.gguf")
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 not gguf")
    with pytest.raises(ValueError, match="not a GGUF file"):
        open_gguf(tmp_path / "x.gguf")
