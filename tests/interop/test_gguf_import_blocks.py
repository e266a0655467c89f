"""`import_gguf` on small GGUF files written here: llama's Q/K permutation against a hand-written
reference, the K-quant block formats against values computed by hand from their layout (ggml's
block_q4_K / block_q5_K / block_q6_K), and the bad inputs that must fail in one line, leaving no
output directory."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter

from zerolm.interop.gguf_import import import_gguf

D, HEADS, KV, FF, VOCAB = 64, 4, 2, 256, 32  # ffn_down rows are 256 long: one K-quant block


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's storage of q/k rows: each head's first and second halves interleaved."""
    half = w.shape[0] // heads // 2
    out = np.empty_like(w)
    for h in range(heads):
        for i in range(half):
            out[h * 2 * half + 2 * i] = w[h * 2 * half + i]
            out[h * 2 * half + 2 * i + 1] = w[h * 2 * half + half + i]
    return out


def hf_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """A one-layer llama's weights in HF layout, by GGUF name (q/k not yet permuted)."""
    rng = np.random.default_rng(seed)
    shapes = {
        "token_embd.weight": (VOCAB, D),
        "output_norm.weight": (D,),
        "blk.0.attn_norm.weight": (D,),
        "blk.0.attn_q.weight": (D, D),
        "blk.0.attn_k.weight": (KV * D // HEADS, D),
        "blk.0.attn_v.weight": (KV * D // HEADS, D),
        "blk.0.attn_output.weight": (D, D),
        "blk.0.ffn_norm.weight": (D,),
        "blk.0.ffn_gate.weight": (FF, D),
        "blk.0.ffn_up.weight": (FF, D),
        "blk.0.ffn_down.weight": (D, FF),
    }
    return {k: rng.standard_normal(s).astype(np.float32) * 0.1 for k, s in shapes.items()}


def write_gguf(path, weights: dict, raw: dict | None = None, arch: str = "llama"):
    """A GGUF file of `weights` (F32; q/k permuted as llama.cpp stores them) and `raw`
    {name: (bytes as uint8 rows, type)}."""
    w = GGUFWriter(path, arch=arch)
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(D)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    for name, t in weights.items():
        if name not in (raw or {}):
            heads = {"blk.0.attn_q.weight": HEADS, "blk.0.attn_k.weight": KV}.get(name)
            w.add_tensor(name, permute(t, heads) if heads else t)
    for name, (data, qtype) in (raw or {}).items():
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_llama_q_k_rows_come_back_in_hf_order(tmp_path):
    weights = hf_weights()
    model = import_gguf(write_gguf(tmp_path / "tiny.gguf", weights))
    block = model.blocks[0]
    for part, name in (("q", "attn_q"), ("k", "attn_k"), ("v", "attn_v"), ("o", "attn_output")):
        got = getattr(block.attn, part).weight.detach().numpy()
        assert np.array_equal(got, weights[f"blk.0.{name}.weight"]), part
    assert model.cfg.tie_embeddings and model.cfg.n_kv_heads == KV and model.cfg.head_dim == 16


# ------------------------------------------------------------------ K-quant blocks, by hand


def pack_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 12 bytes of eight 6-bit scales and mins (ggml's get_scale_min_k4, inverted)."""
    out = np.zeros((len(sc), 12), np.uint8)
    out[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
    return out


def k_blocks(qtype: Q, rows: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """(the bytes of `rows` blocks of 256 values, the values they stand for), from random
    quants and scales: y = d * scale * q - dmin * min per sub-block of 32 (Q4_K, Q5_K), or
    y = d * scale * (q - 32) per sub-block of 16 (Q6_K)."""
    d = rng.uniform(0.001, 0.01, (rows, 1)).astype(np.float16)
    dmin = rng.uniform(0.001, 0.01, (rows, 1)).astype(np.float16)
    bits = {Q.Q4_K: 4, Q.Q5_K: 5, Q.Q6_K: 6}[qtype]
    q = rng.integers(0, 2**bits, (rows, 256)).astype(np.uint8)
    if qtype == Q.Q6_K:
        sc = rng.integers(-128, 128, (rows, 16)).astype(np.int8)
        y = d.astype(np.float64) * np.repeat(sc, 16, axis=1) * (q.astype(np.float64) - 32)
        ql = np.zeros((rows, 128), np.uint8)
        qh = np.zeros((rows, 64), np.uint8)
        for half in (0, 1):  # 128 values: four runs of 32, low nibbles then high nibbles
            v = q[:, 128 * half : 128 * half + 128].reshape(rows, 4, 32)
            ql[:, 64 * half : 64 * half + 32] = (v[:, 0] & 15) | ((v[:, 2] & 15) << 4)
            ql[:, 64 * half + 32 : 64 * half + 64] = (v[:, 1] & 15) | ((v[:, 3] & 15) << 4)
            qh[:, 32 * half : 32 * half + 32] = sum((v[:, g] >> 4) << (2 * g) for g in range(4))
        data = np.concatenate([ql, qh, sc.view(np.uint8), d.view(np.uint8)], axis=1)
        return data, y.astype(np.float32)
    sc = rng.integers(0, 64, (rows, 8)).astype(np.uint8)
    m = rng.integers(0, 64, (rows, 8)).astype(np.uint8)
    d64, dmin64 = d.astype(np.float64), dmin.astype(np.float64)
    y = d64 * np.repeat(sc, 32, axis=1) * q - dmin64 * np.repeat(m, 32, axis=1)
    v = q.reshape(rows, 4, 2, 32)  # four chunks of 64: the first 32 in low nibbles, then high
    qs = ((v[:, :, 0] & 15) | ((v[:, :, 1] & 15) << 4)).reshape(rows, 128)
    parts = [d.view(np.uint8), dmin.view(np.uint8), pack_scales(sc, m)]
    if qtype == Q.Q5_K:  # the fifth bit of value 64c + 32k + l is bit 2c + k of qh[l]
        high = (v >> 4).reshape(rows, 8, 32)
        parts.append(sum(high[:, j] << j for j in range(8)).astype(np.uint8))
    return np.concatenate([*parts, qs], axis=1), y.astype(np.float32)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda q: q.name)
def test_k_quant_blocks_give_the_values_their_layout_says(qtype, tmp_path):
    data, want = k_blocks(qtype, D, np.random.default_rng(1))
    assert data.shape[1] == {Q.Q4_K: 144, Q.Q5_K: 176, Q.Q6_K: 210}[qtype]  # ggml's block sizes
    path = write_gguf(tmp_path / "k.gguf", hf_weights(), {"blk.0.ffn_down.weight": (data, qtype)})
    got = import_gguf(path).blocks[0].ffn.down.weight.detach()
    assert torch.allclose(got, torch.from_numpy(want), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ bad input


def assert_refused(path, out, match: str) -> str:
    with pytest.raises(ValueError, match=match) as e:
        import_gguf(path, out)
    msg = str(e.value)
    assert "\n" not in msg and not out.exists() and not list(out.parent.glob(f".{out.name}*"))
    return msg


def test_unsupported_architecture_is_refused_naming_the_supported(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", hf_weights(), arch="mamba")
    msg = assert_refused(path, tmp_path / "out", "architecture 'mamba' is not supported")
    assert "llama, qwen2, qwen3, gpt2" in msg


def test_unsupported_tensor_type_is_refused(tmp_path):
    raw = {"blk.0.ffn_down.weight": (np.zeros((D, 8 * 18), np.uint8), Q.IQ4_NL)}  # 18 B per 32
    path = write_gguf(tmp_path / "iq.gguf", hf_weights(), raw)
    msg = assert_refused(path, tmp_path / "out", "tensor type IQ4_NL is not supported")
    assert "Q4_K" in msg and "Q8_0" in msg


@pytest.mark.slow  # reads the 98 MB header three times
def test_truncated_and_non_gguf_files_are_refused(smollm2_gguf, tmp_path):
    data = smollm2_gguf.read_bytes()
    cuts = {"header": 3000, "tensor data": len(data) // 2, "last bytes": len(data) - 7}
    for where, n in cuts.items():
        path = tmp_path / f"cut-{where}.gguf"
        path.write_bytes(data[:n])
        assert_refused(path, tmp_path / "out", "truncated or corrupt|truncated GGUF")
        path.unlink()
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    assert_refused(tmp_path / "model.safetensors", tmp_path / "out", "is not a GGUF file")
    assert_refused(tmp_path / "missing.gguf", tmp_path / "out", "does not exist")


@pytest.mark.slow  # a CLI subprocess
def test_cli_refusal_is_one_line_and_leaves_nothing(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", hf_weights(), arch="mamba")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "zerolm", "import", "--from", "gguf", path, "--out", out]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and not out.exists()
    assert r.stderr.count("\n") == 1 and "architecture 'mamba' is not supported" in r.stderr
