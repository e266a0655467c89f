"""Import and export HF transformers checkpoints: GPT2LMHeadModel (preset gpt2) and the LLaMA family
(preset llama plus options): Llama, Mistral, Qwen2 and Qwen3ForCausalLM.

HF parameter and config names live in one module per family, each with its key map and config
functions: hf_decoder.py (weights; gpt2), hf_llama_family.py (llama, mistral, qwen2, qwen3),
hf_bert.py, hf_marian.py; hf_checkpoint.py reads and
writes the directories. Weights are read from safetensors only; pickled checkpoints are refused.
transformers itself is not needed: the files are plain JSON and safetensors.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch

from zerolm.interop.hf_checkpoint import (
    _read_weights,
    build_imported,
    generation_config,
    role_ids,
    write_hf_dir,
)
from zerolm.interop.hf_decoder import (
    FROM_HF,
    KEY_FAMILY,
    REQUIRED,
    TO_HF,
    _from_hf_state,
    _to_hf_state,
)
from zerolm.interop.hf_llama_family import export_type
from zerolm.model import Transformer, resolve

SUPPORTED = tuple(FROM_HF)  # gpt2, llama, mistral, qwen2, qwen3
ENCODERS = {
    "bert": "zerolm.interop.hf_bert",
    "marian": "zerolm.interop.hf_marian",
}  # model_type -> module


def import_hf(
    src_dir: str | Path,
    out_dir: str | Path | None = None,
    dtype: torch.dtype | None = torch.float32,
):
    """Load an HF GPT-2, LLaMA, Mistral, Qwen2, Qwen3, BERT or Marian checkpoint directory
    (config.json + safetensors) as a zerolm model.

    Weights are cast to `dtype` (None: keep the checkpoint's). With `out_dir`, also write a zerolm
    model directory there, with the source's tokenizer.json / tokenizer_config.json if present."""
    src = Path(src_dir)
    if not (src / "config.json").is_file():
        raise ValueError(
            f"{src} has no config.json: expected an HF transformers checkpoint directory"
        )
    raw = json.loads((src / "config.json").read_text(encoding="utf-8"))
    arch = raw.get("model_type")
    if arch in ENCODERS:  # encoder families live in their own modules, with their own key maps
        module = importlib.import_module(ENCODERS[arch])
        return module.import_hf(src, raw, out_dir, dtype)
    if arch not in SUPPORTED:
        raise ValueError(
            f"HF model_type {arch!r} is not supported; supported types: "
            f"{', '.join((*SUPPORTED, *ENCODERS))}"
        )
    cfg = resolve(FROM_HF[arch](raw))
    return build_imported(
        Transformer, cfg, _from_hf_state(arch, _read_weights(src), cfg), src, out_dir, dtype
    )


def export_hf(model: Transformer, out_dir: str | Path, tokenizer=None) -> Path:
    """Write `model` as an HF checkpoint directory (config.json + model.safetensors [+ tokenizer])
    that `AutoModelForCausalLM.from_pretrained` loads. Preset gpt2 exports as GPT2LMHeadModel;
    preset llama as the HF architecture that expresses its options: Qwen3 (qk_norm), Qwen2 (q/k/v
    biases only), Mistral (sliding window) or Llama. A model whose choices the HF architecture
    cannot express raises ValueError."""
    cfg = model.cfg
    if cfg.arch != "decoder":  # bert -> BertForPreTraining, encdec -> MarianMTModel
        module = importlib.import_module(ENCODERS[{"bert": "bert", "encdec": "marian"}[cfg.arch]])
        return module.export_hf(model, out_dir, tokenizer)
    arch = export_type(cfg) if cfg.preset == "llama" else "gpt2"
    bad = [
        f"{k}={getattr(cfg, k)!r} (needs {' or '.join(map(repr, ok))})"
        for k, ok in REQUIRED[KEY_FAMILY[arch]].items()
        if getattr(cfg, k) not in ok
    ]
    if arch == "gpt2" and cfg.n_kv_heads != cfg.n_heads:
        bad.append(
            f"n_kv_heads={cfg.n_kv_heads} (GPT-2 has no grouped-query attention: needs "
            f"{cfg.n_heads})"
        )
    if arch == "gpt2" and cfg.head_dim * cfg.n_heads != cfg.d_model:
        bad.append(f"head_dim={cfg.head_dim} (GPT-2 needs d_model/n_heads)")
    if bad:
        raise ValueError(f"cannot export this {cfg.preset!r} model as HF {arch}: {'; '.join(bad)}")
    config = TO_HF[arch](cfg)
    state = _to_hf_state(arch, model, config)
    ids, gen = role_ids(tokenizer), generation_config(tokenizer)  # the tokenizer's roles
    return write_hf_dir(out_dir, state, {**config, **ids}, tokenizer, gen)
