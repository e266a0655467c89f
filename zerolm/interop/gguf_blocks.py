"""A quantized zerolm model's layers as GGUF tensors: with groups of 32, its codes and float16
scales (and mins) are llama.cpp's Q8_0 / Q4_0 / Q4_1 blocks already (zerolm/quant/formats.py), so
export copies them into the block layout, with no second rounding. Each GGUF row is its blocks in
order, `d (f16) [m (f16)] codes`, so a row permutation (llama's Q/K rows for its RoPE) or a row
concatenation (gpt2's fused q/k/v) moves the copied rows as it moves float rows."""

from __future__ import annotations

from collections import Counter

import gguf
import torch
from torch import nn

from zerolm.quant.formats import BLOCK, Quantized
from zerolm.quant.linear import QuantLinear, QuantSpec, quant_layers

Q = gguf.GGMLQuantizationType
COPY = {(8, "sym"): Q.Q8_0, (4, "sym"): Q.Q4_0, (4, "asym"): Q.Q4_1}
FILE_TYPE = {
    Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
    Q.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
    Q.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
}


def block_type(spec: QuantSpec, k: int) -> Q | None:
    """The GGUF type a layer of rows of k inputs copies into, or None: GGUF's blocks hold 32
    weights, so only groups of 32 copy."""
    return COPY[(spec.bits, spec.scheme)] if (spec.group or k) == BLOCK else None


def as_blocks(qw: Quantized) -> torch.Tensor:
    """Codes and scales (N rows, G groups of 32) -> uint8 (N, G * block bytes) in GGUF's layout."""
    n, groups = qw.scales.shape
    parts = [qw.scales.contiguous().view(torch.uint8).reshape(n, groups, 2)]
    if qw.mins is not None:
        parts.append(qw.mins.contiguous().view(torch.uint8).reshape(n, groups, 2))
    parts.append(qw.qweight.contiguous().view(torch.uint8).reshape(n, groups, -1))
    return torch.cat(parts, -1).reshape(n, -1)


def _uncopyable(name: str, layer: QuantLinear) -> ValueError:
    s = layer.spec
    group = f"groups of {s.group}" if s.group else "one scale per row"
    return ValueError(
        f"{name} is stored int{s.bits} with {group}, which GGUF's {BLOCK}-weight blocks cannot "
        "hold as they are: pass --dtype (q8_0, q4_0, q4_1, f16, ...) to re-encode the dequantized "
        "weights (a second rounding), or quantize the float model with --group 32"
    )


def export_state(model: nn.Module, dtype: str | None) -> tuple[dict[str, torch.Tensor], dict]:
    """The model's tensors for GGUF (float32, zerolm names) with each quantized layer as
    `NAME.weight`: its blocks (uint8 rows) where they copy and `dtype` (None: as stored) names no
    other type, else its dequantized weights for the caller to encode as `dtype`; and the GGUF type
    of each copied tensor. A layer that cannot be copied with dtype None is a ValueError."""
    quant = quant_layers(model)
    skip = {f"{n}.{s}" for n in quant for s in ("qweight", "scales", "mins")}
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items() if k not in skip}
    copied: dict[str, Q] = {}
    for name, layer in quant.items():
        q = block_type(layer.spec, layer.in_features)
        if q is None and dtype is None:
            raise _uncopyable(name, layer)
        if q is not None and (dtype is None or dtype == q.name.lower()):
            state[f"{name}.weight"] = as_blocks(layer.quantized()).cpu()
            copied[f"{name}.weight"] = q
        else:
            state[f"{name}.weight"] = layer.weight.detach().cpu()
    return state, copied


def file_type(copied: dict) -> gguf.LlamaFileType:
    """general.file_type of a file whose copied tensors are `copied`: the most common type (the
    body's, as llama-quantize names a file by its body, not its head)."""
    return FILE_TYPE[Counter(copied.values()).most_common(1)[0][0]]


def stored_types(model: nn.Module) -> str:
    """How a quantized model's layers export as stored: 'q4_0 + q8_0', for the summary line."""
    types = {block_type(m.spec, m.in_features) for m in quant_layers(model).values()}
    return " + ".join(sorted(t.name.lower() for t in types if t is not None))
