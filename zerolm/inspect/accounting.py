"""Parameter counts by component, FLOPs per token and memory, next to the textbook estimates."""

from __future__ import annotations

from collections import defaultdict

from zerolm.model.presets import head_size
from zerolm.quant.linear import quant_layers


def component(name: str) -> str:
    if name.startswith("tok_emb"):
        return "embedding"
    if name.startswith(("pos_emb", "seg_emb")):  # seg_emb: bert's sentence A/B embeddings
        return "positions"
    if name.startswith(("lm_head", "mlm.", "pooler.", "nsp.", "classifier.")):  # bert's heads too
        return "head"
    if ".attn." in name or ".cross_attn." in name:  # cross_attn: an encoder-decoder's decoder
        return "attention"
    if ".ffn." in name:
        return "ffn"
    return "norms"


def tensors(model) -> dict[str, tuple[int, int, int]]:
    """Weight name -> (parameters, bytes as stored, dims): a quantized layer (zerolm/quant) is its
    N·K weights, stored as codes + scales (+ mins), under `NAME.weight`."""
    quant = quant_layers(model)
    out = {
        n: (p.numel(), p.numel() * p.element_size(), p.dim()) for n, p in model.named_parameters()
    }
    for name, layer in quant.items():
        bias = 0 if layer.bias is None else layer.bias.numel() * layer.bias.element_size()
        out[f"{name}.weight"] = (layer.in_features * layer.out_features, layer.nbytes() - bias, 2)
    return out


def quant_record(model) -> dict | None:
    """The quantization record by component: method, and bits/group/scheme of each kind of layer
    ("int4 g32 sym"); None for a float model."""
    meta = getattr(model, "zerolm_quant", None)
    if not meta:
        return None
    kinds: dict[str, set[str]] = defaultdict(set)
    for name, layer in quant_layers(model).items():
        s = layer.spec
        group = f"g{s.group}" if s.group else "per row"
        kinds[component(name)].add(f"int{s.bits} {group} {s.scheme}")
    return {"method": meta["method"], "layers": {k: ", ".join(sorted(v)) for k, v in kinds.items()}}


def account(
    model, context: int | None = None, batch: int = 1, bytes_per_param: int | None = None
) -> dict:
    """Counts, the 12·d²·N estimate of non-embedding parameters, FLOPs per token (forward and
    training) at `context`, and memory for weights and a KV cache of `batch` x `context`."""
    cfg = model.cfg
    context = context or cfg.max_seq_len
    weights = tensors(model)
    counts: dict[str, int] = defaultdict(int)
    stored: dict[str, int] = defaultdict(int)
    for name, (numel, nbytes, _) in weights.items():
        counts[component(name)] += numel
        stored[component(name)] += nbytes
    total = sum(counts.values())
    non_embedding = counts["attention"] + counts["ffn"] + counts["norms"]
    # matrices multiplied once per token; an untied input embedding is only a row lookup (bert's
    # pooler and NSP/classifier heads read one token per sequence: left out)
    lookup = (
        "pos_emb",
        "seg_emb",
        "pooler.",
        "nsp.",
        "classifier.",
        *(() if cfg.tie_embeddings else ("tok_emb",)),
    )
    matmul = sum(n for k, (n, _, dim) in weights.items() if dim >= 2 and not k.startswith(lookup))
    # encdec (a source as long as the target): per target token, the encoder's share, the decoder's
    # self-attention and its cross-attention over the source each cost one attention pass
    dec = cfg.n_decoder_layers if cfg.arch == "encdec" else 0
    # QK^T and AV, forward (PaLM, appendix B), over the H·Dh query width (d_model unless head_dim
    # says otherwise)
    head_dim = head_size(cfg)
    attn_flops = 4 * (cfg.n_layers + 2 * dec) * cfg.n_heads * head_dim * context
    bpp = bytes_per_param or next(model.parameters()).element_size()  # of the float tensors
    # keys and values per cached layer; encdec caches its decoder's self-attention and
    # cross-attention
    kv_layers = 2 * dec if cfg.arch == "encdec" else cfg.n_layers
    kv_bytes = 2 * kv_layers * batch * cfg.n_kv_heads * context * head_dim * bpp
    if cfg.arch == "bert":  # an encoder reads its input in one pass: no KV cache
        kv_bytes = 0
    return {
        "parameters": dict(counts),
        "total": total,
        "non_embedding": non_embedding,
        "estimate_12_d2_N": 12 * cfg.d_model**2 * cfg.n_layers
        + 16 * cfg.d_model**2 * dec,  # + cross-attention
        "forward_flops_per_token": 2 * matmul + attn_flops,
        "train_flops_per_token": 6 * matmul + 3 * attn_flops,
        "weights_bytes": total * bytes_per_param if bytes_per_param else sum(stored.values()),
        "bytes": dict(stored),  # as stored: a quantized layer's codes, scales and mins
        "float_bytes": {k: v * bpp for k, v in counts.items()},  # the same at the float width
        "quantization": quant_record(model),
        "kv_cache_bytes": kv_bytes,
        "context": context,
        "batch": batch,
        "head_dim": head_dim,
    }


def format_account(a: dict, cfg) -> str:
    mb = 1 / 2**20
    arch = "" if cfg.arch in ("", "decoder") else f"{cfg.arch} "
    lines = [
        f"{arch}preset {cfg.preset}: d_model={cfg.d_model} n_layers={cfg.n_layers} "
        f"n_heads={cfg.n_heads} n_kv_heads={cfg.n_kv_heads} head_dim={a['head_dim']} "
        f"d_ff={cfg.d_ff} vocab={cfg.vocab_size} max_seq_len={cfg.max_seq_len} "
        f"tie_embeddings={cfg.tie_embeddings}"
        + (f" n_decoder_layers={cfg.n_decoder_layers}" if cfg.arch == "encdec" else ""),
        "parameters by component:",
    ]
    for k, v in sorted(a["parameters"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  {k:<10} {v:>12,}  {100 * v / a['total']:5.1f}%")
    lines.append(f"  {'total':<10} {a['total']:>12,}")
    lines += _quant_lines(a)
    lines += [
        f"non-embedding {a['non_embedding']:,} vs 12·d²·N = {a['estimate_12_d2_N']:,} (ratio "
        f"{a['non_embedding'] / a['estimate_12_d2_N']:.3f}; the estimate assumes a 4·d two-matrix "
        "FFN, MHA"
        + ("; 16·d² per decoder block: + cross-attention)" if cfg.arch == "encdec" else ")"),
        f"FLOPs per token at context {a['context']}: forward "
        f"{a['forward_flops_per_token'] / 1e6:,.1f} M, training "
        f"{a['train_flops_per_token'] / 1e6:,.1f} M",
        f"memory: weights {a['weights_bytes'] * mb:,.1f} MiB, "
        + (
            f"KV cache {a['kv_cache_bytes'] * mb:,.2f} MiB (batch {a['batch']} x {a['context']} "
            "tokens)"
            if cfg.arch != "bert"
            else "no KV cache (an encoder)"
        ),
    ]
    return "\n".join(lines)


def _quant_lines(a: dict) -> list[str]:
    """A quantized model's bytes per component, as stored against the same at the float width,
    and how each kind of layer is stored."""
    q = a["quantization"]
    if q is None:
        return []
    stored, full = a["bytes"], a["float_bytes"]
    lines = [f"bytes by component (as stored vs float, quantized with {q['method']}):"]
    for k in sorted(stored, key=lambda k: -stored[k]):
        ratio = full[k] / stored[k] if stored[k] else 1.0
        how = q["layers"].get(k, "float")
        lines.append(f"  {k:<10} {stored[k]:>12,} vs {full[k]:>12,}  {ratio:5.2f}x  {how}")
    total, total_full = sum(stored.values()), sum(full.values())
    lines.append(f"  {'total':<10} {total:>12,} vs {total_full:>12,}  {total_full / total:5.2f}x")
    return lines
