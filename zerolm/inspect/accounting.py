"""Parameter counts by component, FLOPs per token and memory, next to the textbook estimates."""

from __future__ import annotations

from collections import defaultdict

from zerolm.model.presets import head_size


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


def account(
    model, context: int | None = None, batch: int = 1, bytes_per_param: int | None = None
) -> dict:
    """Counts, the 12·d²·N estimate of non-embedding parameters, FLOPs per token (forward and
    training) at `context`, and memory for weights and a KV cache of `batch` x `context`."""
    cfg = model.cfg
    context = context or cfg.max_seq_len
    counts: dict[str, int] = defaultdict(int)
    for name, p in model.named_parameters():
        counts[component(name)] += p.numel()
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
    matmul = sum(
        p.numel() for n, p in model.named_parameters() if p.dim() >= 2 and not n.startswith(lookup)
    )
    # encdec (a source as long as the target): per target token, the encoder's share, the decoder's
    # self-attention and its cross-attention over the source each cost one attention pass
    dec = cfg.n_decoder_layers if cfg.arch == "encdec" else 0
    # QK^T and AV, forward (PaLM, appendix B), over the H·Dh query width (d_model unless head_dim
    # says otherwise)
    head_dim = head_size(cfg)
    attn_flops = 4 * (cfg.n_layers + 2 * dec) * cfg.n_heads * head_dim * context
    bpp = bytes_per_param or next(model.parameters()).element_size()
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
        "weights_bytes": total * bpp,
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
    lines += [
        f"  {'total':<10} {a['total']:>12,}",
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
