"""AWQ on a decoder block: which linear layers share an input, where their input scale 1/s folds
exactly, and the search of s and of the clipping ranges (the math is quant/awq.py).

Groups, as in the AWQ reference (llm-awq's auto_scale for llama):
  q, k, v     fed by norm1: 1/s folds into the norm's weight (and bias); judged by the attention's
              output on a sample of the calibration sequences
  o           fed by the attention's values: 1/s folds into v's rows, exact only when every query
              head has its own kv head (no GQA); judged by o's own output error
  gate, up    fed by norm2: as q, k, v, judged by the FFN's output
  down        fed by silu(gate) * up: 1/s folds into up's rows (SwiGLU only)
A post-norm block, or an FFN without SwiGLU, keeps the groups it cannot fold exactly at s = 1.
Clipping is searched for every layer but q and k (whose errors the q k^T product mixes).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from zerolm.config import QuantConfig
from zerolm.model.attention import Attention
from zerolm.model.layers import FFN
from zerolm.quant.awq import clip_search, fake_quant, scaled_weight_error, search_scales
from zerolm.quant.formats import Quantized, dequantize, quantize
from zerolm.quant.linear import QuantSpec

SEARCH_TOKENS = 4096  # calibration tokens the attention / FFN output losses run on
NO_CLIP = ("attn.q", "attn.k")


class Group(NamedTuple):
    names: tuple[str, ...]  # the layers fed one input, relative to the block
    prev: nn.Module  # the op whose output is that input: 1/s folds into it
    judge: nn.Module | None  # the module whose output error chooses s; None: the layers' own


def linear(block: nn.Module, name: str) -> nn.Linear:
    mod = block.get_submodule(name)
    assert isinstance(mod, nn.Linear), f"{name} is a {type(mod).__name__}"
    return mod


def awq_groups(block: Any) -> list[Group]:
    """The scale groups of a zerolm Block whose folds are exact (none for other modules)."""
    attn, ffn = getattr(block, "attn", None), getattr(block, "ffn", None)
    if not getattr(block, "pre", False) or type(attn) is not Attention or type(ffn) is not FFN:
        return []
    groups = [Group(("attn.q", "attn.k", "attn.v"), block.norm1, attn)]
    if attn.kv == attn.h:
        groups.append(Group(("attn.o",), attn.v, None))
    if ffn.kind == "swiglu":
        groups.append(Group(("ffn.gate", "ffn.up"), block.norm2, ffn))
        groups.append(Group(("ffn.down",), ffn.up, None))
    else:
        groups.append(Group(("ffn.up",), block.norm2, ffn))
    return groups


def fold_scales(prev: nn.Module, lins: list[nn.Linear], s: torch.Tensor) -> None:
    """lins' inputs become x / s and their weight columns w * s: the same float function. prev is a
    norm (weight and bias divided by s) or a linear layer (its output rows divided by s)."""
    weight = prev.weight
    assert isinstance(weight, torch.Tensor)
    weight.data.div_((s[:, None] if isinstance(prev, nn.Linear) else s).to(weight.dtype))
    bias = getattr(prev, "bias", None)
    if bias is not None:
        bias.data.div_(s.to(bias.dtype))
    for lin in lins:
        lin.weight.data.mul_(s.to(lin.weight.dtype))


def _judge_loss(judge: nn.Module, lins: list[nn.Linear], inp: list, kw: dict, spec: QuantSpec):
    """loss(s): the squared error of judge's output on the sample inputs when lins are stored as
    fake_quant(w * s) / s, against its float output."""
    ref = [judge(x, **kw) for x in inp]
    originals = [lin.weight.data for lin in lins]

    def loss(s: torch.Tensor) -> float:
        try:
            for lin, w in zip(lins, originals):
                wq = fake_quant(w.float() * s, spec.bits, spec.group, spec.scheme) / s
                lin.weight.data = wq.to(w.dtype)
            return sum(float(((judge(x, **kw) - r) ** 2).sum()) for x, r in zip(inp, ref))
        finally:
            for lin, w in zip(lins, originals):
                lin.weight.data = w

    return loss


def _judge_inputs(block: Any, chunks: list[torch.Tensor], kw: dict) -> dict[str, list]:
    """The attention's and the FFN's float inputs on the first SEARCH_TOKENS tokens' sequences."""
    sample, n = [], 0
    for x in chunks:
        take = max(1, min(x.shape[0], (SEARCH_TOKENS - n) // x.shape[1]))
        sample.append(x[:take])
        n += take * x.shape[1]
        if n >= SEARCH_TOKENS:
            break
    h1 = [block.norm1(x) for x in sample]
    h2 = [block.norm2(x + block.attn(h, **kw)) for x, h in zip(sample, h1)]
    return {"attn": h1, "ffn": h2}


def awq_block(
    block: nn.Module,
    specs: dict[str, QuantSpec],
    stats: dict[str, Any],
    chunks: list[torch.Tensor],
    kw: dict,
    cfg: QuantConfig,
) -> dict[str, Quantized]:
    """AWQ codes of the block's named layers; folds each group's chosen 1/s into the block (the
    float block computes what it did) and leaves each layer holding its dequantized codes."""
    inputs = _judge_inputs(block, chunks, kw)
    for group in awq_groups(block):
        if not all(n in specs for n in group.names):
            continue
        spec = specs[group.names[0]]
        lins = [linear(block, n) for n in group.names]
        st = stats[group.names[0]]
        if group.judge is None:
            ws = [m.weight for m in lins]
            loss = scaled_weight_error(ws, st.hessian(), spec.bits, spec.group, spec.scheme)
        else:
            judge_kw = kw if isinstance(group.judge, Attention) else {}
            key = "attn" if isinstance(group.judge, Attention) else "ffn"
            loss = _judge_loss(group.judge, lins, inputs[key], judge_kw, spec)
        s, _, _ = search_scales(st.mean_abs(), loss, cfg.awq_grid)
        fold_scales(group.prev, lins, s)
        st.scale_inputs(s)
    out: dict[str, Quantized] = {}
    for name, spec in specs.items():
        lin = linear(block, name)
        w = lin.weight.detach().float()
        if not name.endswith(NO_CLIP):
            w = clip_search(w, stats[name].hessian(), spec.bits, spec.group, spec.scheme)
        qw = quantize(w, spec.bits, spec.group, spec.scheme)
        lin.weight.data = dequantize(qw, spec.bits, lin.weight.dtype)
        out[name] = qw
    return out
