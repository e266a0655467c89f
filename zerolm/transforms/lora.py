"""LoRA (Hu et al., 2021) as a transform on a built model: wrap chosen nn.Linear layers, train only
the low-rank adapters, save them alone (with a fingerprint of their base), or merge them back.

QLoRA (Dettmers et al., 2023): the same over a quantized base (zerolm/quant: a model saved by
`zerolm quantize`, or quantized here with LoRAConfig.base_quant). The base's codes stay frozen
buffers; in training its forward is x @ dequantize(W).T, dequantized block by block in both passes
(quant/frozen.py), and without a gradient it is the quantized kernel;
the float32 adapters are the only trainable tensors. merge_lora folds them into the dequantized
weight and keeps that layer float: the merged model then equals the adapted one up to float
rounding, where re-quantizing (requantize=True) would round away every update smaller than half a
quantization step. So a QLoRA model directory holds the quantized base with its adapted layers in
float32; the adapters alone are saved too (adapters.safetensors).

Legend: N any leading dims, I in_features, O out_features, r rank.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import nn

from zerolm.config import LoRAConfig, ModelConfig, QuantConfig
from zerolm.files import atomic_write_bytes
from zerolm.quant.formats import quantize
from zerolm.quant.linear import QuantEmbedding, QuantLinear, quant_layers
from zerolm.transforms.quantize import quantize_model

ADAPTER_KEYS = ("lora_A", "lora_B")


class LoRALinear(nn.Module):
    """y = base(x) + dropout(x) @ A.T @ B.T · alpha/rank around a frozen `base`. A is
    kaiming-uniform (a=sqrt(5), as PEFT), B zeros, so a fresh adapter changes nothing.
    `enabled=False` skips it."""

    def __init__(
        self,
        base: nn.Linear | QuantLinear,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        generator: torch.Generator | None = None,
        config: LoRAConfig | None = None,
        frozen_before: frozenset[str] = frozenset(),
    ):
        super().__init__()
        self.base, self.rank, self.scale, self.enabled = base, rank, alpha / rank, True
        self.config = config or LoRAConfig(rank=rank, alpha=alpha, dropout=dropout)
        self.frozen_before = frozen_before  # the model's frozen parameters before apply_lora
        dtype, device = _float_of(base)  # A (r, I), B (O, r)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)  # U(±1/sqrt(I))
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    @property
    def weight(self) -> torch.Tensor:  # (O, I)
        """The weight this layer applies: base + scale·B·A while enabled (no dropout), else the base
        weight. Transformer.forward reads `lm_head.weight` instead of calling the module, so this is
        what makes an lm_head adapter count. To change the frozen base itself use `base.weight`."""
        if not self.enabled:
            return self.base.weight
        return self.base.weight + (self.lora_B @ self.lora_A) * self.scale

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x):  # (N, I) -> (N, O)
        y = self.base(x)
        if not self.enabled:
            return y
        return y + (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scale  # via (N, r)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}, enabled={self.enabled}"


class QuantLoRALinear(LoRALinear):
    """LoRA around a frozen QuantLinear (QLoRA). `weight` dequantizes the whole base (for code that
    reads weights); as the output head, project() keeps the logits on the quantized kernel."""

    base: QuantLinear

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        return self(hidden)


def _float_of(base: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The adapters' dtype and device: the base weight's, float32 over a quantized base."""
    if isinstance(base, QuantLinear):
        return torch.float32, base.qweight.device
    assert isinstance(base, nn.Linear), f"LoRA wraps linear layers, not {type(base).__name__}"
    return base.weight.dtype, base.weight.device


def _last(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, module)


def apply_lora(model: nn.Module, cfg: LoRAConfig, seed: int = 0) -> nn.Module:
    """Replace every nn.Linear (or QuantLinear) whose last name component is in cfg.targets by a
    LoRALinear (A drawn from a generator seeded with `seed`), freeze all other parameters; with
    cfg.base_quant, quantize the float model first (QLoRA). In place, returns `model`."""
    cfg = dataclasses.replace(cfg, targets=tuple(cfg.targets))
    if cfg.rank < 1 or cfg.alpha <= 0 or not 0 <= cfg.dropout < 1 or not cfg.targets:
        raise ValueError(
            f"invalid LoRA config {cfg}: needs rank >= 1, alpha > 0, 0 <= dropout < 1, some targets"
        )
    if _lora_modules(model):
        raise ValueError(
            "LoRA is already applied to this model (merge_lora it, or start from a fresh base)"
        )
    _quantize_base(model, cfg)
    return _apply(model, cfg, seed)


def _apply(model: nn.Module, cfg: LoRAConfig, seed: int) -> nn.Module:
    """Wrap cfg.targets of a model without adapters (its base quantized already if need be)."""
    linears = [(n, m) for n, m in model.named_modules() if _is_linear(m)]
    chosen = [(n, m) for n, m in linears if _last(n) in cfg.targets]
    unmatched = [t for t in cfg.targets if t not in {_last(n) for n, _ in chosen}]
    if unmatched:
        what = (
            f"target {unmatched[0]!r} matches"
            if len(unmatched) == 1
            else f"targets {', '.join(map(repr, unmatched))} match"
        )
        names = ", ".join(dict.fromkeys(_last(n) for n, _ in linears))
        is_tied = "lm_head" in unmatched and getattr(model, "lm_head", 0) is None
        tied = " (lm_head is tied to tok_emb here)" if is_tied else ""
        raise ValueError(f"LoRA {what} no module; linear modules here: {names}{tied}")
    frozen = frozenset(n for n, p in model.named_parameters() if not p.requires_grad)
    model.requires_grad_(False)
    gen = torch.Generator(device=_float_of(chosen[0][1])[1]).manual_seed(seed)
    for name, lin in chosen:
        kind = QuantLoRALinear if isinstance(lin, QuantLinear) else LoRALinear
        m = kind(lin, cfg.rank, cfg.alpha, cfg.dropout, gen, config=cfg, frozen_before=frozen)
        _replace(model, name, m.train(lin.training))
    return model


def _is_linear(m: nn.Module) -> bool:
    """A layer LoRA can wrap: nn.Linear or a quantized one (not the quantized token embedding,
    which an nn.Embedding would not be either)."""
    return isinstance(m, nn.Linear) or (
        isinstance(m, QuantLinear) and not isinstance(m, QuantEmbedding)
    )


def _quantize_base(model: nn.Module, cfg: LoRAConfig) -> None:
    """QLoRA from a float base: quantize it as `zerolm quantize --method cfg.base_quant` would."""
    if cfg.base_quant == "none":
        return
    if quant_layers(model):
        method = getattr(model, "zerolm_quant", {}).get("method", "quantized")
        raise ValueError(
            f"lora.base_quant={cfg.base_quant} quantizes a float base, but this model is already "
            f"quantized ({method}): drop --lora.base_quant, QLoRA trains over it as it is"
        )
    quantize_model(model, QuantConfig(method=cfg.base_quant))


def lora_config_of(model: nn.Module) -> LoRAConfig | None:
    """The LoRAConfig the model's adapters were applied with, or None for a plain model: read from
    its LoRALinear modules, so there is no tag on the model to fall out of step with them."""
    mods = _lora_modules(model)
    return mods[0][1].config if mods else None


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, e.g. 'blocks.0.attn.q.lora_A' (r, I) and '...lora_B' (O, r)."""
    return {k: v for k, v in model.state_dict().items() if _last(k) in ADAPTER_KEYS}


def base_fingerprint(model: nn.Module) -> str:
    """sha256 over the name, shape and bf16-rounded value of every base (non-adapter) tensor, so an
    fp32 base and its bf16 copy match (a quantized layer's codes and scales: their bytes as
    stored). ~1.6 GB/s on the 2-core CPU: 18 ms for 7 M parameters, 0.33 s for 134 M (hashing only
    the targeted layers would miss a different embedding or FFN)."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        if _last(k) not in ADAPTER_KEYS:
            v = v.detach().to("cpu", torch.bfloat16 if v.is_floating_point() else None)
            v = v.contiguous()
            h.update(f"{k.replace('.base.', '.')}{tuple(v.shape)};".encode())
            h.update(v.view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _config(model: nn.Module) -> LoRAConfig:
    cfg = lora_config_of(model)
    if cfg is None:
        raise ValueError("model has no LoRA adapters (apply_lora or load_adapters first)")
    return cfg


def _base_config(model: nn.Module) -> dict:
    """The base model's config as a dict: every zerolm model keeps its ModelConfig as `.cfg`."""
    cfg = model.cfg
    assert isinstance(cfg, ModelConfig), f"not a zerolm model: {type(model).__name__}"
    return dataclasses.asdict(cfg)


def _file_bytes(model: nn.Module, sha: str, tokenizer_sha256: str = "") -> bytes:
    state = {k: v.detach().to("cpu").contiguous() for k, v in lora_state_dict(model).items()}
    meta = {
        "format": "pt",
        "zerolm_lora": json.dumps(dataclasses.asdict(_config(model))),
        "base_model": json.dumps(_base_config(model)),
        "base_sha256": sha,
        "base_quant": json.dumps(getattr(model, "zerolm_quant", None)),
    }
    if tokenizer_sha256:
        meta["tokenizer_sha256"] = tokenizer_sha256
    return save(state, meta)


def save_adapters(model: nn.Module, path: str | Path, tokenizer_sha256: str = "") -> Path:
    """Write the adapters (+ LoRA config, base config, base fingerprint and the sha256 of the
    tokenizer they were trained with) as one safetensors file."""
    atomic_write_bytes(path, _file_bytes(model, base_fingerprint(model), tokenizer_sha256))
    return Path(path)


def load_adapters(model: nn.Module, path: str | Path, tokenizer_sha256: str = "") -> nn.Module:
    """Apply LoRA from the file's config (unless already applied with that config) and load the
    adapters; the model must be the base they were trained on (same config and weights) and,
    given its tokenizer's sha256, read the same token ids."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    if "zerolm_lora" not in meta:
        raise ValueError(f"{path} is not a zerolm LoRA adapter file (no zerolm_lora metadata)")
    theirs_tok = meta.get("tokenizer_sha256", "")
    if tokenizer_sha256 and theirs_tok and theirs_tok != tokenizer_sha256:
        raise ValueError(
            f"{path}: the adapters were trained with another tokenizer (sha256 {theirs_tok[:12]} "
            f"vs this model's {tokenizer_sha256[:12]}): load them on the base they were trained on"
        )
    raw = json.loads(meta["zerolm_lora"])
    cfg = LoRAConfig(**{**raw, "targets": tuple(raw["targets"])})
    theirs, ours = (
        json.loads(meta["base_model"]),
        json.loads(json.dumps(_base_config(model))),
    )
    if theirs != ours:
        diff = ", ".join(
            f"{k}={theirs.get(k)!r} vs {ours.get(k)!r}"
            for k in sorted(theirs.keys() | ours.keys())
            if theirs.get(k) != ours.get(k)
        )
        raise ValueError(
            f"{path}: the adapters were trained on another base model (theirs vs this one: {diff})"
        )
    _match_quant(model, cfg, json.loads(meta.get("base_quant", "null")), path)
    sha, want = base_fingerprint(model), meta.get("base_sha256", "?")
    if want != sha:
        raise ValueError(
            f"{path}: the adapters were trained on base weights with sha256 {want[:16]}, this "
            f"model's are {sha[:16]} (same config, different weights): load the base they were "
            "trained on"
        )
    have = lora_config_of(model)
    if have is None:
        _apply(model, cfg, 0)  # the base quantized already, if cfg.base_quant asks (_match_quant)
    elif have != cfg:
        raise ValueError(f"{path} holds adapters for {cfg}, but this model already has {have}")
    params = {k: p for k, p in model.named_parameters() if _last(k) in ADAPTER_KEYS}
    bad = sorted(set(params) ^ set(state)) + [
        k for k in params if k in state and params[k].shape != state[k].shape
    ]
    if bad:
        raise ValueError(f"{path}: adapter tensors do not fit this model: {bad[:4]}")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state[k])
    return model


def _match_quant(model: nn.Module, cfg: LoRAConfig, theirs: dict | None, path) -> None:
    """Adapters trained over a quantized base need that base: quantize a float model as they were
    (cfg.base_quant, round-to-nearest gives the same codes), or name the mismatch."""
    if cfg.base_quant != "none" and not quant_layers(model):
        quantize_model(model, QuantConfig(method=cfg.base_quant))
    ours = getattr(model, "zerolm_quant", None)
    if (theirs or {}).get("layers") != (ours or {}).get("layers"):
        raise ValueError(
            f"{path}: the adapters were trained over a {_kind(theirs)} base, this model is "
            f"{_kind(ours)} (or quantized in other layers or groups): load them on the base they "
            "were trained on"
        )


def _kind(quant: dict | None) -> str:
    return "float" if quant is None else f"{quant['method']}-quantized"


@torch.no_grad()
def merge_lora(model: nn.Module, requantize: bool = False) -> nn.Module:
    """Fold scale·B·A into each base weight (in float32, rounded once to the weight's dtype;
    whether or not adapters are enabled), put the plain nn.Linear back and restore every parameter's
    requires_grad to what it was before apply_lora (all trainable for a fresh model). The result has
    the plain model's state_dict: save_model, load_model and export_hf treat it like any other.
    Over a quantized base the merged layer is a float32 nn.Linear (dequantized base + update;
    model.zerolm_quant no longer lists it), or with `requantize` the layer's own format again."""
    _config(model)
    mods = _lora_modules(model)
    frozen = mods[0][1].frozen_before
    floated = set()
    for name, m in mods:
        if isinstance(m, QuantLoRALinear):
            merged = _merge_quantized(m, requantize)
            _replace(model, name, merged)
            if isinstance(merged, nn.Linear):
                floated.add(name)
            continue
        w = m.base.weight  # (O, I), written in place: keeps its layout (decode_layout) and identity
        with torch.autocast(w.device.type, enabled=False):
            w.copy_((w.float() + m.scale * (m.lora_B.float() @ m.lora_A.float())).to(w.dtype))
        _replace(model, name, m.base)
    _drop_quant_layers(model, floated)
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen or n.rpartition(".")[0] in floated)
    return model


def _merge_quantized(m: QuantLoRALinear, requantize: bool) -> nn.Module:
    base, spec = m.base, m.base.spec
    w = base.weight + m.scale * (m.lora_B.float() @ m.lora_A.float())  # (O, I) float32
    if requantize:
        base.set_quantized(quantize(w, spec.bits, spec.group, spec.scheme))
        return base
    with torch.device("meta"):
        lin = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
    lin.weight = nn.Parameter(w)
    if base.bias is not None:
        lin.bias = nn.Parameter(base.bias.detach().float().clone())
    return lin.train(m.training)


def _drop_quant_layers(model: nn.Module, names: set[str]) -> None:
    """Take layers merged into float out of the model's quantization record (save_model writes it;
    load_model builds those layers quantized)."""
    meta = getattr(model, "zerolm_quant", None)
    if not names or meta is None:
        return
    layers = {k: v for k, v in meta["layers"].items() if k not in names}
    if layers:
        model.zerolm_quant = {**meta, "layers": layers}  # type: ignore[assignment]
    else:
        del model.zerolm_quant


def set_adapters_enabled(model: nn.Module, enabled: bool) -> None:
    _config(model)
    for _, m in _lora_modules(model):
        m.enabled = bool(enabled)


@contextmanager
def adapters_disabled(model: nn.Module):
    """Inside the block the model computes exactly its base (e.g. DPO's reference model, without a
    second copy of the weights); each adapter's previous flag is restored on exit."""
    before = [(m, m.enabled) for _, m in _lora_modules(model)]
    set_adapters_enabled(model, False)
    try:
        yield model
    finally:
        for m, enabled in before:
            m.enabled = enabled


def trainable_report(model: nn.Module, optimizer_bytes_per_param: int = 8) -> dict:
    """Parameter counts (total, trainable, base, adapter), AdamW state in bytes (two float32
    moments = 8 per trainable parameter) for the model as it is (LoRA) versus full fine-tuning of
    its base, and the adapter file's exact size."""
    params = list(model.parameters())  # tied parameters once
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    adapter = sum(v.numel() for v in lora_state_dict(model).values())
    return {
        "total": total,
        "trainable": trainable,
        "trainable_share": trainable / total,
        "base": total - adapter,
        "adapter": adapter,
        "optimizer_bytes_lora": trainable * optimizer_bytes_per_param,
        "optimizer_bytes_full": (total - adapter) * optimizer_bytes_per_param,
        "adapter_file_bytes": len(_file_bytes(model, "0" * 64)) if adapter else 0,
    }
