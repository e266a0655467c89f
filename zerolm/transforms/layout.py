"""The decode layout, a transform on a built model: swap each attention, SwiGLU FFN and RMSNorm
for its fused inference twin (model/attention.py, model/layers.py: same values, same state_dict)
and store every linear weight (out, in) as the transpose of a contiguous (in, out) matrix."""

from __future__ import annotations

import torch
from torch import nn

from zerolm.model.attention import Attention, FusedQKVAttention
from zerolm.model.layers import FFN, FusedGateUpFFN, FusedRMSNorm, RMSNorm
from zerolm.model.protocol import LanguageModel
from zerolm.quant import kernels
from zerolm.quant.linear import QuantLinear


def _quantized(mod: nn.Module, names: tuple[str, ...]) -> QuantLinear | None:
    """The first of `mod`'s parts `names` if all are QuantLinear of one spec, input width and bias
    presence (their codes, scales and mins then concatenate by rows exactly: groups run along the
    inputs), else None."""
    parts = [getattr(mod, n) for n in names]
    first = parts[0]
    if all(type(p) is QuantLinear for p in parts) and all(
        (p.spec, p.in_features, p.bias is None)
        == (first.spec, first.in_features, first.bias is None)
        for p in parts
    ):
        return first
    return None


def _quantize_fused(twin: nn.Module, attr: str, like: QuantLinear | None) -> nn.Module:
    """`twin` with its fused linear `attr` made a QuantLinear of `like`'s spec (meta), if any."""
    if like is not None:
        old = getattr(twin, attr)
        setattr(
            twin,
            attr,
            QuantLinear(old.in_features, old.out_features, like.spec, like.bias is not None),
        )
    return twin


def _twin(mod: nn.Module) -> tuple[nn.Module, tuple[str, ...]] | None:
    """The fused module of the same math as `mod`, built on the meta device, and the names of
    `mod`'s parts it fuses; None to keep `mod`. Exact types only: a module already fused, or whose
    parts are LoRA-wrapped, stays as it is. Quantized parts of one spec fuse into a quantized
    linear (split_keys keeps their split keys in the state_dict)."""

    def plain(*names: str) -> bool:
        return all(type(getattr(mod, n)) is nn.Linear for n in names)

    def fusable(*names: str) -> bool:
        return plain(*names) or _quantized(mod, names) is not None

    with torch.device("meta"):
        if type(mod) is Attention and fusable("q", "k", "v"):
            d, bias, o_bias = mod.q.in_features, mod.q.bias is not None, mod.o.bias is not None
            eps = None if mod.q_norm is None else mod.q_norm.eps
            twin = FusedQKVAttention(
                d,
                mod.h,
                mod.kv,
                o_bias,
                mod.dropout,
                head_dim=mod.dh,
                qkv_bias=bias,
                qk_norm_eps=eps,
            )
            return _quantize_fused(twin, "wqkv", _quantized(mod, ("q", "k", "v"))), ("q", "k", "v")
        if type(mod) is FFN and mod.kind == "swiglu" and fusable("gate", "up"):
            d, bias = mod.up.in_features, mod.up.bias is not None
            ffn = FusedGateUpFFN(d, mod.d_ff, mod.kind, bias, mod.drop.p)
            return _quantize_fused(ffn, "gate_up", _quantized(mod, ("gate", "up"))), ("gate", "up")
        if type(mod) is RMSNorm:
            return FusedRMSNorm(mod.weight.shape[0], mod.eps, mod.feeds_matmul), ("weight",)
    return None


def _swap(model: LanguageModel, name: str, mod: nn.Module, twin: nn.Module, fused: tuple[str, ...]):
    """Put `twin` in `mod`'s place: `mod`'s other children move into it as they are (o, down,
    dropout; LoRA-wrapped or not), and the fused parts' tensors load through its load hook, which
    joins the split weights (a tensor not joined is adopted, not copied)."""
    for n, child in mod.named_children():
        if n not in fused:
            setattr(twin, n, child)
    state = {k: v for k, v in mod.state_dict().items() if k.split(".")[0] in fused}
    twin.load_state_dict(state, strict=False, assign=True)
    grads = {n: p.requires_grad for n, p in mod.named_parameters()}
    parts = [g for n, g in grads.items() if n.split(".")[0] in fused]
    for n, p in twin.named_parameters():  # a fused weight is trainable if any of its parts was
        p.requires_grad_(grads.get(n, any(parts)))
    assert not any(t.is_meta for t in twin.state_dict().values()), name
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, twin.train(mod.training))


@torch.no_grad()
def decode_layout(model: LanguageModel) -> LanguageModel:
    """Inference layout, in place, same values and state_dict (keys, shapes): q/k/v (and SwiGLU
    gate/up) become one fused linear, so a decode step makes one matrix-vector product where it
    made three (two), measured +10 % batch-1 tokens/s at 10 M; float32 RMSNorm runs as one kernel;
    every linear weight (out, in) is stored as the transpose of a contiguous (in, out) matrix, so
    x @ W.T streams W row by row (measured ~1.3x for batch-1 fp32 decode here); and a quantized
    linear also keeps its codes in the C++ op's packed layout (QuantLinear.pack). For inference
    only (generate, chat, serve, samplers): the trainer keeps the split layout, so its kernels and
    resumed losses never change. Loading a state_dict afterwards with assign=True keeps the values
    but not the transposed storage; apply LoRA before, not after (its targets q/k/v, gate/up are
    fused away)."""
    for name, mod in list(model.named_modules()):
        found = _twin(mod)
        if found is not None:
            _swap(model, name, mod, *found)
    for mod in model.modules():
        if isinstance(mod, nn.Linear) and mod.weight.is_contiguous():
            mod.weight.data = mod.weight.data.t().contiguous().t()
        if isinstance(mod, QuantLinear) and mod.qweight.device.type == "cpu" and kernels.load():
            mod.pack()
    return model
