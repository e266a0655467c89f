"""Export a zerolm decoder as one GGUF file: what llama.cpp, Ollama and transformers' GGUF reader
run.

Preset llama becomes llama.cpp's `qwen3` (q/k norms), `qwen2` (biases on q/k/v only, NEOX RoPE) or
`llama` (Q/K rows permuted for its interleaved RoPE, as convert_hf_to_gguf.py's LlamaModel.permute
does: zerolm rotates halves, as HF does); preset gpt2 becomes `gpt2` (fused attn_qkv). Metadata keys
and tensor names come from gguf's own tables. Matrices take the chosen dtype; 1-D norms and biases
stay F32, as in llama.cpp's files; q8_0/q4_0 quantise every 2-D matrix, embedding and output
included (like `llama-quantize --pure`). A quantized model's layers with groups of 32 are copied
as its Q8_0 / Q4_0 / Q4_1 blocks (gguf_blocks.py). Everything is checked before a byte is written,
and the file appears whole or not at all.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch

from zerolm.files import file_mode, writing_into
from zerolm.interop.gguf_blocks import export_state, file_type
from zerolm.interop.gguf_tokenizer import write_tokenizer
from zerolm.interop.hf_decoder import _fit_biases
from zerolm.interop.hf_llama_family import FFN, OUT, QKV
from zerolm.model import Transformer
from zerolm.model.rope import inv_frequencies

Q = gguf.GGMLQuantizationType
F = gguf.LlamaFileType
DTYPES = {  # --dtype -> (type of the matrices, general.file_type)
    "f32": (Q.F32, F.ALL_F32),
    "f16": (Q.F16, F.MOSTLY_F16),
    "bf16": (Q.BF16, F.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0),
    "q4_0": (Q.Q4_0, F.MOSTLY_Q4_0),
    "q4_1": (Q.Q4_1, F.MOSTLY_Q4_1),
}
T = gguf.MODEL_TENSOR
TENSORS = {  # zerolm module (in blocks.{i}. for the block parts) -> llama.cpp tensor
    "tok_emb": T.TOKEN_EMBD,
    "pos_emb": T.POS_EMBD,
    "norm_f": T.OUTPUT_NORM,
    "lm_head": T.OUTPUT,
    "norm1": T.ATTN_NORM,
    "attn.q": T.ATTN_Q,
    "attn.k": T.ATTN_K,
    "attn.v": T.ATTN_V,
    "attn.qkv": T.ATTN_QKV,  # gpt2: q, k, v fused
    "attn.o": T.ATTN_OUT,
    "attn.q_norm": T.ATTN_Q_NORM,
    "attn.k_norm": T.ATTN_K_NORM,
    "norm2": T.FFN_NORM,
    "ffn.gate": T.FFN_GATE,
    "ffn.up": T.FFN_UP,
    "ffn.down": T.FFN_DOWN,
}
BIASES = {  # the block biases each llama.cpp architecture loads (zerolm part names)
    "llama": QKV + OUT + FFN,
    "qwen2": QKV,
    "qwen3": QKV,
    "gpt2": QKV + OUT + ("ffn.up", "ffn.down"),
}
REQUIRED = {  # what each llama.cpp architecture fixes
    "llama": dict(norm="rmsnorm", norm_placement="pre", position="rope", ffn="swiglu"),
    "gpt2": dict(norm="layernorm", norm_placement="pre", position="learned", ffn="gelu"),
}


def _choose(cfg) -> str:
    if cfg.preset == "gpt2":
        return "gpt2"
    if cfg.qk_norm:
        return "qwen3"
    if cfg.qkv_bias and not cfg.bias and cfg.head_dim * cfg.n_heads == cfg.d_model:
        return "qwen2"  # llama.cpp's qwen2 has head_dim d/h; otherwise llama (with biases) does it
    return "llama"


def gguf_arch(cfg) -> str:
    """The llama.cpp architecture of a resolved model config, or a one-line ValueError naming the
    options llama.cpp cannot express and what to do instead."""
    if cfg.arch != "decoder" or cfg.preset not in REQUIRED:
        raise ValueError(
            f"cannot export a {cfg.arch} model of preset {cfg.preset!r} to GGUF: llama.cpp runs "
            "decoder-only llama- and gpt2-preset models; use --format hf"
        )
    arch, need = _choose(cfg), REQUIRED[cfg.preset].items()
    bad = [f"{k}={getattr(cfg, k)!r} (needs {v!r})" for k, v in need if getattr(cfg, k) != v]
    problems = [
        (cfg.embed_norm or cfg.embed_scale, "embed_norm/embed_scale (llama.cpp has neither)"),
        (
            0 < cfg.sliding_window < cfg.max_seq_len,
            f"sliding_window={cfg.sliding_window} (llama.cpp's {arch} attends to the whole "
            f"context: needs 0 or >= max_seq_len={cfg.max_seq_len})",
        ),
        (
            arch == "gpt2"
            and (cfg.n_kv_heads, cfg.head_dim * cfg.n_heads) != (cfg.n_heads, cfg.d_model),
            "grouped-query attention or head_dim != d_model/n_heads (gpt2 has neither)",
        ),
        (arch == "gpt2" and cfg.qk_norm, "qk_norm=True (gpt2 has no q/k norms)"),
        (
            cfg.rope_scaling == "yarn" or (cfg.rope_scaling == "llama3" and arch != "llama"),
            f"rope_scaling={cfg.rope_scaling!r} (supported: none, linear, and llama3 on llama): "
            "llama.cpp would rotate differently",
        ),
    ]
    bad += [msg for hit, msg in problems if hit]
    if bad:
        raise ValueError(
            f"cannot export this model as llama.cpp's {arch}: {'; '.join(bad)}; change those "
            "options (or use --format hf)"
        )
    return arch


def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rotate-half (HF) rows -> llama.cpp's interleaved pairs: convert_hf_to_gguf's permute."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _layout(state: dict, cfg, arch: str) -> None:
    """zerolm's tensors -> llama.cpp's layout, in place: biases it lacks dropped (if zero), Q/K
    rows permuted (llama), q/k/v fused (gpt2)."""
    own = (QKV if cfg.qkv_bias else ()) + (OUT + FFN if cfg.bias else ())
    wanted = tuple(p for p in own if p in BIASES[arch])
    _fit_biases(state, cfg.n_layers, wanted, f"llama.cpp's {arch}")
    for i in range(cfg.n_layers):
        for s in ("weight", "bias"):
            if arch == "llama":
                for part, heads in (("q", cfg.n_heads), ("k", cfg.n_kv_heads)):
                    if (key := f"blocks.{i}.attn.{part}.{s}") in state:
                        state[key] = permute(state[key], heads)
            if arch == "gpt2":
                parts = [state.pop(f"blocks.{i}.attn.{p}.{s}") for p in "qkv"]
                state[f"blocks.{i}.attn.qkv.{s}"] = torch.cat(parts)


def _gguf_name(key: str) -> str | None:
    """blocks.3.attn.q.weight -> blk.3.attn_q.weight; None where llama.cpp has no such tensor."""
    module, _, suffix = key.rpartition(".")
    i, part = -1, module
    if module.startswith("blocks."):
        _, n, part = module.split(".", 2)
        i = int(n)
    if part not in TENSORS:
        return None
    return f"{gguf.TENSOR_NAMES[TENSORS[part]].format(bid=i)}.{suffix}"


def _state(
    model: Transformer, arch: str, dtype: str | None
) -> tuple[dict[str, torch.Tensor], dict]:
    """The model's tensors under llama.cpp's names, in its layout (float32, or a quantized layer's
    copied blocks), and the GGUF type of each copied one."""
    cfg = model.cfg
    state, copied = export_state(model, dtype)
    _layout(state, cfg, arch)
    # gpt2's fused attn.qkv is q, k and v's rows, stored alike
    types = {k: copied.get(k, copied.get(k.replace(".qkv.", ".q."))) for k in state}
    names = {k: _gguf_name(k) for k in state}
    if stray := [k for k, n in names.items() if n is None]:
        raise ValueError(
            f"model has tensors outside the plain {arch} architecture ({stray[:3]}): merge LoRA "
            "adapters (merge_lora) or export the unquantised model"
        )
    out = {str(names[k]): t for k, t in state.items()}
    types = {str(names[k]): q for k, q in types.items() if q is not None}
    if cfg.rope_scaling == "llama3":  # frequency divisors, as convert_hf_to_gguf makes them
        plain = dataclasses.replace(cfg, rope_scaling="none", rope_factor=1.0)
        out[gguf.TENSOR_NAMES[T.ROPE_FREQS] + ".weight"] = (
            inv_frequencies(plain)[0] / inv_frequencies(cfg)[0]
        )
    return out, types


def _qtype(name: str, t: torch.Tensor, dtype: str) -> Q:
    """1-D tensors stay F32; position embeddings are not quantised (llama-quantize neither)."""
    if t.dim() < 2:
        return Q.F32
    q = DTYPES[dtype][0]
    if q in (Q.Q8_0, Q.Q4_0, Q.Q4_1) and name.startswith(gguf.TENSOR_NAMES[T.POS_EMBD]):
        return Q.F32
    return q


def _data(t: torch.Tensor, q: Q) -> np.ndarray:
    if t.dtype == torch.uint8:  # a quantized layer's blocks, copied
        return t.numpy()
    if q == Q.F32:
        return t.numpy()
    if q == Q.F16:
        return t.half().numpy()
    if q == Q.BF16:  # torch rounds to nearest even, as gguf.quants' BF16 does; bytes (rows, 2*cols)
        return t.bfloat16().view(torch.uint8).numpy()
    return gguf.quants.quantize(t.numpy(), q)


def _metadata(w: gguf.GGUFWriter, cfg, arch: str, ftype: F, name: str) -> None:
    """The keys convert_hf_to_gguf.py writes for this architecture (what llama-model.cpp reads)."""
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    if arch == "gpt2":
        w.add_layer_norm_eps(cfg.norm_eps)
        return
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.head_dim)
    if cfg.head_dim * cfg.n_heads != cfg.d_model:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    if cfg.rope_scaling == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(cfg.rope_factor)


def export_gguf(
    model: Transformer,
    path: str | Path,
    tokenizer=None,
    dtype: str | None = None,
    name: str | None = None,
) -> Path:
    """Write `model` (with `tokenizer`'s vocabulary, special ids and chat template, if given) as
    the GGUF file `path`, matrices in `dtype` (f32, f16, bf16, q8_0, q4_0, q4_1; None: f16, or for
    a quantized model as stored: its group-32 layers' blocks copied, float matrices f32; a given
    dtype re-encodes the dequantized layers of other types). Options llama.cpp cannot express,
    and shapes the dtype's blocks cannot take, are a ValueError before anything is written; the
    file is written to a temporary sibling and renamed, so a failure leaves none."""
    if dtype is None and not getattr(model, "zerolm_quant", None):
        dtype = "f16"
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"unknown GGUF dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    cfg, out = model.cfg, Path(path)
    arch = gguf_arch(cfg)
    if tokenizer is not None and tokenizer.vocab_size != cfg.vocab_size:
        raise ValueError(
            f"the model has {cfg.vocab_size} token embeddings but its tokenizer "
            f"{tokenizer.vocab_size} tokens: llama.cpp needs one token per row; export a model "
            "sized to its tokenizer"
        )
    state, copied = _state(model, arch, dtype)
    plan = {
        k: (t, copied[k] if k in copied else _qtype(k, t, dtype or "f32")) for k, t in state.items()
    }
    for k, (t, q) in plan.items():
        block = gguf.GGML_QUANT_SIZES[q][0]
        if k not in copied and t.shape[-1] % block:
            raise ValueError(
                f"--dtype {dtype} quantises rows in blocks of {block}, but {k} has rows of "
                f"{t.shape[-1]}: choose f32, f16 or bf16 (or a model whose sizes divide by {block})"
            )
    writer = gguf.GGUFWriter(None, arch)
    ftype = DTYPES[dtype][1] if dtype is not None else file_type(copied)
    _metadata(writer, cfg, arch, ftype, name or out.stem)
    if tokenizer is not None:
        write_tokenizer(writer, tokenizer)
    for k, (t, q) in plan.items():
        writer.add_tensor(k, _data(t, q), raw_dtype=q)
    _write(writer, out)
    return out


def _write(writer: gguf.GGUFWriter, out: Path) -> None:
    """The whole file into a temporary sibling, then renamed over `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with writing_into(out.parent, out.name):
            writer.write_header_to_file(path=Path(tmp))
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
        os.chmod(tmp, file_mode())
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        Path(tmp).unlink(missing_ok=True)
        raise
