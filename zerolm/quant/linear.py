"""Linear layers and tied embeddings whose weights are stored quantized (formats.py).

Codes are int8 / uint8 buffers; scales and mins are float16 values kept in int16 buffers, so a
model-wide `.to(dtype)` moves them between devices but never rounds them. A layer's `weight` is the
dequantized float matrix, for code that reads weights (exports, fused losses); its forward runs
the quantized kernel (kernels.py) instead. In the decode layout (`pack`) a layer also holds its
codes repacked for the op's small-batch kernel: non-persistent buffers, so the state_dict is the
same, at the cost of a second copy of the codes in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from zerolm.quant import kernels
from zerolm.quant.formats import Quantized, Scheme, check_group, dequantize, quantized_bytes
from zerolm.quant.frozen import frozen_linear


@dataclass(frozen=True)
class QuantSpec:
    """How one layer is stored: bits, weights per scale (0: one per row), sym or asym."""

    bits: int
    group: int
    scheme: Scheme

    def as_dict(self) -> dict:
        return {"bits": self.bits, "group": self.group, "scheme": self.scheme}


class QuantLinear(nn.Module):
    """y = x @ W.T + b with W (N, K) quantized; built empty (then loaded) or `from_float`."""

    qweight: torch.Tensor  # int8 (N, K) for 8 bits, uint8 (N, K/2) for 4
    scales: torch.Tensor  # int16 (N, G): float16 bits
    mins: torch.Tensor | None  # int16 (N, G): float16 bits, int4 asym only
    packed_codes: torch.Tensor | None  # kernels.Packed's three parts, after pack()
    packed_scales: torch.Tensor | None
    packed_mins: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        g = check_group(in_features, spec.group)
        n, groups = out_features, in_features // g
        width = in_features if spec.bits == 8 else in_features // 2
        code = torch.int8 if spec.bits == 8 else torch.uint8
        self.register_buffer("qweight", torch.empty(n, width, dtype=code))
        self.register_buffer("scales", torch.empty(n, groups, dtype=torch.int16))
        asym = spec.bits == 4 and spec.scheme == "asym"
        self.register_buffer("mins", torch.empty(n, groups, dtype=torch.int16) if asym else None)
        self.bias = nn.Parameter(torch.empty(n), requires_grad=False) if bias else None
        self.unpack()

    @classmethod
    def from_quantized(
        cls, qw: Quantized, spec: QuantSpec, in_features: int, bias: torch.Tensor | None = None
    ) -> QuantLinear:
        with torch.device("meta"):
            mod = cls(in_features, qw.qweight.shape[0], spec, bias is not None)
        mod.set_quantized(qw, bias)
        return mod

    def set_quantized(self, qw: Quantized, bias: torch.Tensor | None = None) -> None:
        self.unpack()
        self.qweight = qw.qweight.contiguous()
        self.scales = qw.scales.half().view(torch.int16).contiguous()
        self.mins = None if qw.mins is None else qw.mins.half().view(torch.int16).contiguous()
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    def quantized(self) -> Quantized:
        mins = None if self.mins is None else self.mins.view(torch.float16)
        return Quantized(self.qweight, self.scales.view(torch.float16), mins)

    def pack(self) -> None:
        """Also keep the codes in the op's decode layout (kernels.pack), which its packed
        kernel streams front to back (decode_layout does this where the op is loaded)."""
        p = kernels.pack(self.quantized(), self.spec.bits)
        for name, t in zip(("packed_codes", "packed_scales", "packed_mins"), p):
            self.register_buffer(name, t, persistent=False)

    def unpack(self) -> None:
        """Drop the packed copy (new codes make it stale)."""
        for name in ("packed_codes", "packed_scales", "packed_mins"):
            self.register_buffer(name, None, persistent=False)

    def _load_from_state_dict(self, *args, **kwargs):  # new codes: the packed copy is stale
        self.unpack()
        super()._load_from_state_dict(*args, **kwargs)

    def _packed(self) -> kernels.Packed | None:
        if self.packed_codes is None or self.packed_scales is None:
            return None
        return kernels.Packed(self.packed_codes, self.packed_scales, self.packed_mins)

    @property
    def weight(self) -> torch.Tensor:  # (N, K) float32, dequantized
        return dequantize(self.quantized(), self.spec.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N)
        q = self.quantized()
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if torch.is_grad_enabled():  # training over a frozen base (QLoRA): the float product,
            return frozen_linear(x, q, self.spec.bits, bias)  # the same in every layer
        return kernels.linear(x, q.qweight, q.scales, q.mins, self.spec.bits, bias, self._packed())

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output head's logits (B, T, V) from hidden states (B, T, D)."""
        return self(hidden)

    def nbytes(self) -> int:
        s = self.spec
        extra = 0 if self.bias is None else self.bias.numel() * 4
        n, k = self.out_features, self.in_features
        return quantized_bytes(n, k, s.bits, s.group, s.scheme) + extra

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"in={self.in_features}, out={self.out_features}, int{s.bits}, "
            f"group={s.group or self.in_features}, {s.scheme}, bias={self.bias is not None}"
        )


class QuantEmbedding(QuantLinear):
    """A token embedding (V, D) stored quantized, which is also the tied output head: forward
    looks rows up (dequantizing only those), project() runs the quantized head product."""

    def __init__(self, num_embeddings: int, embedding_dim: int, spec: QuantSpec):
        super().__init__(embedding_dim, num_embeddings, spec, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, D) float32
        q = self.quantized()
        flat = ids.reshape(-1)
        rows = Quantized(q.qweight[flat], q.scales[flat], None if q.mins is None else q.mins[flat])
        return dequantize(rows, self.spec.bits).reshape(*ids.shape, self.in_features)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        return QuantLinear.forward(self, hidden)


def quant_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """The quantized layers of a model, by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def replace_layer(model: nn.Module, name: str, spec: QuantSpec, qw: Quantized | None) -> None:
    """Swap the float layer `name` (nn.Linear, or the nn.Embedding tok_emb) for its quantized
    twin: filled with `qw` (and the layer's own bias), or empty on the meta device for loading."""
    old = model.get_submodule(name)
    parent, _, attr = name.rpartition(".")
    with torch.device("meta"):
        if isinstance(old, nn.Embedding):
            new: QuantLinear = QuantEmbedding(old.num_embeddings, old.embedding_dim, spec)
        else:
            assert isinstance(old, nn.Linear), f"{name} is a {type(old).__name__}"
            new = QuantLinear(old.in_features, old.out_features, spec, old.bias is not None)
    if qw is not None:
        new.set_quantized(qw, getattr(old, "bias", None))
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def apply_quant_layout(model: nn.Module, meta: dict) -> None:
    """Give a freshly built (meta-device) model the quantized layers `meta["layers"]` names, so a
    saved quantized state_dict loads into it (model/io.py)."""
    for name, spec in meta["layers"].items():
        replace_layer(model, name, QuantSpec(**spec), None)
    model.zerolm_quant = meta  # type: ignore[assignment]
