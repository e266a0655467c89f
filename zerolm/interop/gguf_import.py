"""Import a llama.cpp GGUF file (architectures llama — also how Mistral GGUFs come —, qwen2, qwen3,
gpt2) as a zerolm model: the metadata becomes the HF config.json it was converted from and the
tensor names its HF names, so the HF importers' validation and refusals apply unchanged; tensors
are dequantised with the `gguf` package and llama's permuted Q/K rows put back (convert_hf_to_gguf
permutes them for llama.cpp's interleaved RoPE; qwen2/qwen3/gpt2 are stored as in HF)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

from zerolm.files import atomic_dir
from zerolm.interop.gguf_file import fields, open_gguf
from zerolm.interop.hf_checkpoint import _replaceable, build_imported
from zerolm.interop.hf_decoder import FROM_HF, _from_hf_state
from zerolm.model import Transformer, resolve, save_model
from zerolm.tokenizer import Tokenizer

TYPES: tuple[Q, ...] = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q5_0, Q.Q5_1, Q.Q4_0, Q.Q4_1)
TYPES += (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)  # the tensor types import reads
ARCHS = ("llama", "qwen2", "qwen3", "gpt2")  # general.architecture (also the HF model_type)
TOP = {
    "llama": {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"},
    "gpt2": {
        "token_embd": "transformer.wte",
        "position_embd": "transformer.wpe",
        "output_norm": "transformer.ln_f",
        "output": "lm_head",
    },
}
BLOCK = {
    "llama": {
        "attn_norm": "input_layernorm",
        **{f"attn_{p}": f"self_attn.{p}_proj" for p in "qkv"},
        "attn_output": "self_attn.o_proj",
        "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm",
        "ffn_norm": "post_attention_layernorm",
        **{f"ffn_{p}": f"mlp.{p}_proj" for p in ("gate", "up", "down")},
    },
    "gpt2": {
        "attn_norm": "ln_1",
        "attn_qkv": "attn.c_attn",
        "attn_output": "attn.c_proj",
        "ffn_norm": "ln_2",
        "ffn_up": "mlp.c_fc",
        "ffn_down": "mlp.c_proj",
    },
}
LAYER = {"llama": "model.layers.{i}.", "gpt2": "transformer.h.{i}."}
CONV1D = ("attn_qkv", "attn_output", "ffn_up", "ffn_down")  # gpt2: HF stores these (in, out)
ROPE_FREQS = "rope_freqs.weight"  # llama 3 rope scaling, as per-frequency factors
LLAMA3 = dict(low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)


def import_gguf(
    path: str | Path, out_dir: str | Path | None = None, dtype: torch.dtype | None = torch.float32
) -> Transformer:
    """Load a GGUF file as a zerolm model (weights dequantised, cast to `dtype`). With `out_dir`,
    also write a zerolm model directory there with the GGUF's tokenizer and chat template, all or
    nothing. Anything zerolm cannot read is a ValueError before anything is written."""
    reader = open_gguf(path)
    meta = fields(reader)
    arch = meta.get("general.architecture")
    if arch not in ARCHS:
        raise ValueError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(ARCHS)}"
        )
    tensors = {t.name: t for t in reader.tensors}
    _check_tensors(path, tensors)
    hf = hf_config(arch, meta, tensors)
    cfg = resolve(FROM_HF[arch](hf))  # the HF importer's refusals
    if out_dir is not None:
        _replaceable(out_dir)  # refuse a non-model directory before the slow part
    state = {}
    for name, t in tensors.items():
        if name != ROPE_FREQS:
            state[hf_name(arch, name)] = _weight(arch, name, t, hf)
    model = build_imported(
        Transformer, cfg, _from_hf_state(arch, state, cfg), Path(path), None, dtype
    )
    if out_dir is not None:
        with atomic_dir(_replaceable(out_dir)) as tmp:
            save_model(model, tmp)
            if "tokenizer.ggml.model" in meta:
                from zerolm.interop.gguf_tokenizer import tokenizer_files_from_gguf

                tokenizer_files_from_gguf(meta, tmp)
                Tokenizer.load(tmp)  # a tokenizer zerolm cannot use fails the import
    return model


def _check_tensors(path, tensors: dict) -> None:
    """Every tensor of a type import reads, placed, and whole (not cut short)."""
    bad = sorted({t.tensor_type.name for t in tensors.values() if t.tensor_type not in TYPES})
    if bad:
        raise ValueError(
            f"{path}: GGUF tensor type {', '.join(bad)} is not supported; supported: "
            f"{', '.join(q.name for q in TYPES)}"
        )
    for t in tensors.values():
        if t.data.nbytes != t.n_bytes:
            raise ValueError(f"{path} is a truncated GGUF file (tensor {t.name} is cut short)")


def hf_name(arch: str, name: str) -> str:
    """The HF parameter name of a GGUF tensor name (ValueError for one zerolm cannot place)."""
    family = "gpt2" if arch == "gpt2" else "llama"
    base, _, kind = name.rpartition(".")
    if kind in ("weight", "bias") and base in TOP[family]:
        return f"{TOP[family][base]}.{kind}"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m and m[2] in BLOCK[family]:
        return f"{LAYER[family].format(i=m[1])}{BLOCK[family][m[2]]}.{m[3]}"
    raise ValueError(f"GGUF {arch} tensor {name!r} has no place in a zerolm model")


def _weight(arch: str, name: str, t, hf: dict) -> torch.Tensor:
    """One tensor, dequantised to float32 in HF's layout (numpy's dims are GGUF's reversed)."""
    values = dequantize(t.data, t.tensor_type).reshape([int(n) for n in reversed(t.shape)])
    w = torch.from_numpy(np.require(values, np.float32, ["C", "W"]))
    if arch == "llama" and re.search(r"\.attn_[qk]\.", name):  # undo convert's LlamaModel.permute
        heads = hf["num_attention_heads" if ".attn_q." in name else "num_key_value_heads"]
        w = w.reshape(heads, -1, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
    if arch == "gpt2" and name.split(".")[-2] in CONV1D and w.dim() == 2:
        w = w.T
    return w


def _get(meta: dict, arch: str, key: str, default=None):
    return meta.get(f"{arch}.{key}", default)


def hf_config(arch: str, meta: dict, tensors: dict) -> dict:
    """The HF config.json a GGUF's metadata stands for (llama.cpp's defaults where keys are
    absent): what convert_hf_to_gguf.py wrote, read back."""
    vocab = int(tensors["token_embd.weight"].shape[1]) if "token_embd.weight" in tensors else None
    tied = "output.weight" not in tensors
    eps = _get(meta, arch, "attention.layer_norm_epsilon")
    if arch == "gpt2":
        return dict(
            model_type="gpt2",
            vocab_size=vocab,
            n_positions=_get(meta, arch, "context_length"),
            n_embd=_get(meta, arch, "embedding_length"),
            n_layer=_get(meta, arch, "block_count"),
            n_head=_get(meta, arch, "attention.head_count"),
            n_inner=_get(meta, arch, "feed_forward_length"),
            activation_function="gelu_new",  # ggml's gelu is the tanh approximation
            layer_norm_epsilon=eps if eps is not None else 1e-5,
            tie_word_embeddings=tied,
        )
    d, heads = _get(meta, arch, "embedding_length"), _get(meta, arch, "attention.head_count")
    head_dim = _get(meta, arch, "attention.key_length") or d // heads
    value_dim = _get(meta, arch, "attention.value_length") or head_dim
    rope_dim = _get(meta, arch, "rope.dimension_count") or head_dim
    if value_dim != head_dim:
        raise ValueError(f"GGUF {arch}: value_length {value_dim} != key_length {head_dim}")
    names = set(tensors)
    return dict(
        model_type=arch,
        vocab_size=vocab,
        hidden_size=d,
        intermediate_size=_get(meta, arch, "feed_forward_length"),
        num_hidden_layers=_get(meta, arch, "block_count"),
        num_attention_heads=heads,
        num_key_value_heads=_get(meta, arch, "attention.head_count_kv") or heads,
        head_dim=head_dim,
        partial_rotary_factor=rope_dim / head_dim,  # the HF importer refuses partial rotary
        max_position_embeddings=_get(meta, arch, "context_length"),
        rms_norm_eps=_get(meta, arch, "attention.layer_norm_rms_epsilon", 1e-5),
        tie_word_embeddings=tied,
        rope_theta=float(_get(meta, arch, "rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(arch, meta, tensors, head_dim),
        attention_bias=any(re.search(r"\.attn_\w+\.bias$", n) for n in names),
        mlp_bias=any(re.search(r"\.ffn_\w+\.bias$", n) for n in names),
    )


def _rope_scaling(arch: str, meta: dict, tensors: dict, head_dim: int) -> dict | None:
    """rope.scaling.* (linear, yarn) or llama 3's rope_freqs tensor as an HF rope_scaling."""
    kind = _get(meta, arch, "rope.scaling.type", "none")
    factor = _get(meta, arch, "rope.scaling.factor")
    if ROPE_FREQS in tensors:
        if kind != "none":
            raise ValueError(f"GGUF {arch}: both rope_freqs and rope.scaling.type={kind!r}")
        t = tensors[ROPE_FREQS]
        factors = dequantize(t.data, t.tensor_type).reshape(-1)
        theta = float(_get(meta, arch, "rope.freq_base", 10000.0))
        return _llama3_scaling(factors, theta, head_dim)
    if kind == "none" or (kind == "linear" and factor in (None, 1.0)):
        return None
    if kind not in ("linear", "yarn"):
        raise ValueError(f"GGUF rope.scaling.type {kind!r} is not supported (linear, yarn)")
    out = {"rope_type": kind, "factor": float(factor)}
    if kind == "yarn":
        for key, hf_key in (
            ("original_context_length", "original_max_position_embeddings"),
            ("yarn_beta_fast", "beta_fast"),
            ("yarn_beta_slow", "beta_slow"),
            ("yarn_attn_factor", "attention_factor"),
        ):
            if (v := _get(meta, arch, f"rope.scaling.{key}")) is not None:
                out[hf_key] = v
    return out


def _llama3_scaling(factors: np.ndarray, theta: float, head_dim: int) -> dict:
    """The llama3 rope_scaling that convert_hf_to_gguf turned into these per-frequency factors:
    Llama 3.x's low/high frequency factors and context, the factor being the largest; anything
    else is refused rather than guessed."""
    factor = float(factors.max())
    lo, hi = LLAMA3["low_freq_factor"], LLAMA3["high_freq_factor"]
    ctx = LLAMA3["original_max_position_embeddings"]
    expect = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        smooth = (ctx / wavelen - lo) / (hi - lo)
        expect.append(
            1.0
            if wavelen < ctx / hi
            else factor
            if wavelen > ctx / lo
            else 1 / ((1 - smooth) / factor + smooth)
        )
    if len(factors) != len(expect) or not np.allclose(factors, expect, rtol=1e-5):
        raise ValueError(
            "GGUF rope_freqs factors are not Llama 3's rope scaling (low 1, high 4, context "
            "8192): zerolm cannot express them"
        )
    return {"rope_type": "llama3", "factor": factor, **LLAMA3}
