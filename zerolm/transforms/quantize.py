"""Weight quantization, a transform on a built decoder model: every linear layer of the blocks,
the output head and the token embedding become quantized layers (zerolm/quant) in place.

  int8   Q8_0's code: int8 per weight, one float16 scale per `group` weights of a row
  int4   Q4_0's code (sym) or Q4_1's (asym), round-to-nearest
  gptq   int4 codes chosen column by column against calibration activations (zerolm/quant/gptq.py)
  awq    int4 after activation-aware per-channel scaling (zerolm/quant/awq.py)

The head (with a tied embedding, the embedding too) is kept at int8 by default, as llama.cpp keeps
its output tensor at higher precision than the body (Q6_K in a Q4_0 file).
"""

from __future__ import annotations

import torch
from torch import nn

from zerolm.config import QuantConfig
from zerolm.model.transformer import Transformer
from zerolm.quant.formats import Quantized, check_group, quantize
from zerolm.quant.linear import QuantSpec, quant_layers, replace_layer
from zerolm.transforms.calibrate import calibrated_codes

BITS = {"int8": 8, "int4": 4, "gptq": 4, "awq": 4}


def quant_targets(model: nn.Module, cfg: QuantConfig) -> dict[str, QuantSpec]:
    """Module name -> how it is stored, for every layer this config quantizes."""
    bits = BITS[cfg.method]
    body = QuantSpec(bits, cfg.group, "sym" if bits == 8 else cfg.scheme)
    head_bits = {"auto": 8, "int8": 8, "int4": 4, "float": 0}[cfg.head]
    head = QuantSpec(head_bits, cfg.group, "sym" if head_bits == 8 else cfg.scheme)
    out = {
        name: body
        for name, mod in model.named_modules()
        if name.startswith("blocks.") and type(mod) is nn.Linear
    }
    tied = getattr(model, "lm_head", None) is None
    if head_bits:
        out["tok_emb" if tied else "lm_head"] = head
    if not tied:
        out["tok_emb"] = body  # llama.cpp stores token_embd in the file's own type
    return out


def check_quantizable(model: nn.Module, cfg: QuantConfig) -> None:
    """A one-line ValueError for a model or config this transform cannot take."""
    if quant_layers(model):
        meta = getattr(model, "zerolm_quant", {})
        raise ValueError(
            f"this model is already quantized ({meta.get('method', 'quantized')}); quantizing "
            "codes again only adds error: quantize its float source model instead"
        )
    if not isinstance(model, Transformer):
        raise ValueError(
            f"quantization supports decoder models (gpt2, llama, qwen...); this is a "
            f"{type(model).__name__}: use its float weights, or export it and quantize elsewhere"
        )
    if cfg.method == "int8" and cfg.scheme == "asym":
        raise ValueError("int8 is symmetric only (Q8_0's code); drop --scheme asym")
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear | nn.Embedding) and name in quant_targets(model, cfg):
            k = mod.in_features if isinstance(mod, nn.Linear) else mod.embedding_dim
            check_group(k, cfg.group, name)


@torch.no_grad()
def quantize_model(
    model: nn.Module, cfg: QuantConfig, calib: torch.Tensor | None = None
) -> nn.Module:
    """Quantize `model` in place and return it. calib: (N, T) token ids of held-out text, needed by
    gptq and awq (transforms/calibrate.py's calibration_ids draws them)."""
    check_quantizable(model, cfg)
    targets = quant_targets(model, cfg)
    if cfg.method in ("gptq", "awq"):
        if calib is None:
            raise ValueError(f"{cfg.method} needs calibration text (token ids); see [calib]")
        codes = calibrated_codes(model, targets, cfg, calib)
    else:
        codes = {}
    for name, spec in targets.items():
        w = model.get_submodule(name).weight
        assert isinstance(w, torch.Tensor)
        qw: Quantized = codes.get(name) or quantize(w, spec.bits, spec.group, spec.scheme)
        replace_layer(model, name, spec, qw)
    model.zerolm_quant = {  # type: ignore[assignment]
        "method": cfg.method,
        "layers": {n: s.as_dict() for n, s in targets.items()},
    }
    return model
