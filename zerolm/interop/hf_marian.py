"""Import and export HF transformers MarianMTModel checkpoints as zerolm encoder-decoders.

Marian (the OPUS-MT translation models) is the original Transformer: post-LN LayerNorm (eps 1e-5),
sinusoidal positions from 0 in the concatenated [sin | cos] layout, embeddings optionally scaled by
sqrt(d_model) and shared by encoder, decoder and (tied) output head, a `final_logits_bias`, and an
activation of relu / gelu / swish. zerolm's preset transformer with the matching options is the
same network. HF names live only here (one key map, one pair of config functions); weights are
read from safetensors only (hf.py's helpers), and what zerolm cannot express is refused by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from zerolm.config import ModelConfig
from zerolm.interop.hf_checkpoint import _read_weights, _refuse, build_imported, write_hf_dir
from zerolm.model import resolve
from zerolm.model.encdec import EncoderDecoder
from zerolm.model.layers import sinusoidal_table

# zerolm module -> HF module, each with .weight and .bias; {e} an encoder layer, {d} a decoder layer
KEYS = {
    "tok_emb": "model.shared",
    "lm_head": "lm_head",
    **{
        f"encoder.blocks.{{e}}.attn.{p}": f"model.encoder.layers.{{e}}.self_attn.{h}_proj"
        for p, h in zip("qkvo", ("q", "k", "v", "out"))
    },
    "encoder.blocks.{e}.norm1": "model.encoder.layers.{e}.self_attn_layer_norm",
    "encoder.blocks.{e}.ffn.up": "model.encoder.layers.{e}.fc1",
    "encoder.blocks.{e}.ffn.down": "model.encoder.layers.{e}.fc2",
    "encoder.blocks.{e}.norm2": "model.encoder.layers.{e}.final_layer_norm",
    **{
        f"decoder.blocks.{{d}}.attn.{p}": f"model.decoder.layers.{{d}}.self_attn.{h}_proj"
        for p, h in zip("qkvo", ("q", "k", "v", "out"))
    },
    "decoder.blocks.{d}.norm1": "model.decoder.layers.{d}.self_attn_layer_norm",
    **{
        f"decoder.blocks.{{d}}.cross_attn.{p}": f"model.decoder.layers.{{d}}.encoder_attn.{h}_proj"
        for p, h in zip("qkvo", ("q", "k", "v", "out"))
    },
    "decoder.blocks.{d}.norm_cross": "model.decoder.layers.{d}.encoder_attn_layer_norm",
    "decoder.blocks.{d}.ffn.up": "model.decoder.layers.{d}.fc1",
    "decoder.blocks.{d}.ffn.down": "model.decoder.layers.{d}.fc2",
    "decoder.blocks.{d}.norm2": "model.decoder.layers.{d}.final_layer_norm",
}
EMBED_COPIES = (
    "model.encoder.embed_tokens.weight",
    "model.decoder.embed_tokens.weight",
)  # tied to shared
POSITIONS = (
    "model.encoder.embed_positions.weight",
    "model.decoder.embed_positions.weight",
)  # fixed tables

DEFAULTS = dict(
    vocab_size=58101,
    decoder_vocab_size=None,
    max_position_embeddings=1024,
    encoder_layers=12,
    encoder_ffn_dim=4096,
    encoder_attention_heads=16,
    decoder_layers=12,
    decoder_ffn_dim=4096,
    decoder_attention_heads=16,
    activation_function="gelu",
    d_model=1024,
    dropout=0.1,
    scale_embedding=False,
    share_encoder_decoder_embeddings=True,
    tie_word_embeddings=True,
    normalize_before=False,
    normalize_embedding=False,
    add_final_layer_norm=False,
)
ACT: dict[str, Literal["relu", "gelu", "gelu_erf"]] = {
    "relu": "relu",
    "gelu": "gelu_erf",
    "gelu_new": "gelu",
    "gelu_pytorch_tanh": "gelu",
}  # HF -> zerolm
ACT_OUT = {"relu": "relu", "gelu_erf": "gelu", "gelu": "gelu_new"}  # zerolm -> HF
# zerolm options Marian fixes: an exported model must take these values
REQUIRED = dict(
    norm=("layernorm",),
    norm_placement=("post",),
    position=("sinusoidal",),
    ffn=tuple(ACT_OUT),
    bias=(True,),
    embed_norm=(False,),
    norm_eps=(1e-5,),
)


# ------------------------------------------------------------------ configs


def config_from_hf(raw: dict) -> ModelConfig:
    c = {**DEFAULTS, **{k: v for k, v in raw.items() if v is not None}}
    act = c["activation_function"]
    _refuse(
        "marian",
        [
            (
                act in ACT,
                f"activation_function={act!r} (zerolm's FFN has {', '.join(ACT)}; swish exists "
                "only gated, as swiglu)",
            ),
            (
                c["encoder_ffn_dim"] == c["decoder_ffn_dim"],
                f"encoder_ffn_dim={c['encoder_ffn_dim']} != decoder_ffn_dim={c['decoder_ffn_dim']} "
                "(zerolm has one d_ff)",
            ),
            (
                c["encoder_attention_heads"] == c["decoder_attention_heads"],
                f"encoder_attention_heads={c['encoder_attention_heads']} != "
                f"decoder_attention_heads={c['decoder_attention_heads']} (zerolm has one n_heads)",
            ),
            (
                c["decoder_vocab_size"] in (None, c["vocab_size"])
                and c["share_encoder_decoder_embeddings"],
                "separate source and target vocabularies (zerolm shares one embedding)",
            ),
            (
                not c["normalize_before"] and not c["add_final_layer_norm"],
                "pre-LN layers (Marian is post-LN)",
            ),
            (not c["normalize_embedding"], "normalize_embedding=true"),
            (c["encoder_layers"] >= 1 and c["decoder_layers"] >= 1, "an empty encoder or decoder"),
        ],
    )
    return ModelConfig(
        arch="encdec",
        preset="transformer",
        vocab_size=c["vocab_size"],
        d_model=c["d_model"],
        n_layers=c["encoder_layers"],
        n_decoder_layers=c["decoder_layers"],
        n_heads=c["encoder_attention_heads"],
        d_ff=c["encoder_ffn_dim"],
        max_seq_len=c["max_position_embeddings"],
        ffn=ACT[act],
        norm="layernorm",
        norm_placement="post",
        position="sinusoidal",
        bias=True,
        norm_eps=1e-5,
        embed_norm=False,
        embed_scale=bool(c["scale_embedding"]),
        tie_embeddings=bool(c["tie_word_embeddings"]),
        dropout=float(c["dropout"]),
    )


def config_to_hf(cfg: ModelConfig) -> dict:
    return dict(
        architectures=["MarianMTModel"],
        model_type="marian",
        is_encoder_decoder=True,
        vocab_size=cfg.vocab_size,
        decoder_vocab_size=cfg.vocab_size,
        d_model=cfg.d_model,
        encoder_layers=cfg.n_layers,
        decoder_layers=cfg.n_decoder_layers,
        encoder_attention_heads=cfg.n_heads,
        decoder_attention_heads=cfg.n_heads,
        encoder_ffn_dim=cfg.d_ff,
        decoder_ffn_dim=cfg.d_ff,
        max_position_embeddings=cfg.max_seq_len,
        activation_function=ACT_OUT[cfg.ffn],
        scale_embedding=cfg.embed_scale,
        share_encoder_decoder_embeddings=True,
        tie_word_embeddings=cfg.tie_embeddings,
        dropout=cfg.dropout,
        attention_dropout=0.0,
        activation_dropout=0.0,
        forced_eos_token_id=None,
    )


# ------------------------------------------------------------------ weights


def _names(cfg: ModelConfig) -> dict[str, str]:
    """Every zerolm parameter name -> its HF name."""
    out = {"final_logits_bias": "final_logits_bias"}
    for z, h in KEYS.items():
        layers = (
            range(cfg.n_layers)
            if "{e}" in z
            else range(cfg.n_decoder_layers)
            if "{d}" in z
            else [0]
        )
        for i in layers:
            for s in ("weight", "bias"):
                out[f"{z.format(e=i, d=i)}.{s}"] = f"{h.format(e=i, d=i)}.{s}"
    return out


def _from_hf_state(hf_state: dict, cfg: ModelConfig) -> dict:
    hf_state = {
        (k if k.startswith(("model.", "lm_head.", "final_logits_bias")) else f"model.{k}"): v
        for k, v in hf_state.items()
    }  # a headless MarianModel lacks the `model.` prefix
    for name in POSITIONS:  # recomputed by zerolm; refuse tables that are not the sinusoid
        table = hf_state.pop(name, None)
        if table is not None:
            ref = sinusoidal_table(table.shape[0], table.shape[1])
            if (table.float() - ref).abs().max() > 1e-3:
                raise ValueError(
                    f"unsupported HF marian checkpoint: {name} is not the sinusoidal table"
                )
    shared = hf_state.get("model.shared.weight")
    for name in EMBED_COPIES:
        emb = hf_state.pop(name, None)
        if emb is None:
            continue
        if shared is None:
            hf_state["model.shared.weight"] = shared = emb
        elif not torch.equal(emb, shared):
            raise ValueError(
                f"unsupported HF marian checkpoint: {name} differs from model.shared.weight "
                "(zerolm shares one embedding)"
            )
    if cfg.tie_embeddings:
        hf_state.pop("lm_head.weight", None)  # the tied head is the embedding
    inverse = {h: z for z, h in _names(cfg).items()}
    unknown = sorted(k for k in hf_state if k not in inverse)
    if unknown:
        raise ValueError(f"HF marian checkpoint has tensors zerolm cannot place: {unknown[:6]}")
    state = {inverse[k]: v for k, v in hf_state.items()}
    bias = state.get("final_logits_bias")
    state["final_logits_bias"] = torch.zeros(cfg.vocab_size) if bias is None else bias.reshape(-1)
    return state


def _to_hf_state(model: EncoderDecoder) -> dict:
    names = _names(model.cfg)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if stray := sorted(set(state) - set(names)):
        raise ValueError(
            f"model has tensors outside the plain Marian architecture ({stray[:4]}): "
            "merge adapters / dequantize it before exporting"
        )
    out = {names[k]: t.contiguous().cpu() for k, t in state.items()}
    out["final_logits_bias"] = out["final_logits_bias"].reshape(1, -1)
    if (
        not model.cfg.tie_embeddings
    ):  # transformers 5 unties encoder/decoder embeddings with the head
        out.update({name: out["model.shared.weight"].clone() for name in EMBED_COPIES})
    return out


# ------------------------------------------------------------------ public API


def import_hf(src: Path, raw: dict, out_dir=None, dtype: torch.dtype | None = torch.float32):
    """A MarianMTModel checkpoint directory (config.json `raw` + safetensors) as a zerolm
    EncoderDecoder; with out_dir, also written there as a zerolm model directory (with the source's
    tokenizer files)."""
    cfg = resolve(config_from_hf(raw))
    return build_imported(
        EncoderDecoder, cfg, _from_hf_state(_read_weights(Path(src)), cfg), src, out_dir, dtype
    )


def export_hf(model: EncoderDecoder, out_dir, tokenizer=None) -> Path:
    """Write an encdec `model` as an HF MarianMTModel directory (config.json + model.safetensors
    + tokenizer); its special ids are the tokenizer's roles (bos is also the decoder start, as in
    zerolm's seq2seq), so the tokenizer is required.
    Choices Marian cannot express (pre-LN, learned or rotary positions, RMSNorm, SwiGLU, ...) raise
    ValueError."""
    cfg = model.cfg
    bad = [
        f"{k}={getattr(cfg, k)!r} (needs {' or '.join(map(repr, ok))})"
        for k, ok in REQUIRED.items()
        if getattr(cfg, k) not in ok
    ]
    if cfg.n_kv_heads != cfg.n_heads:
        bad.append(
            f"n_kv_heads={cfg.n_kv_heads} (Marian has no grouped-query attention: needs "
            f"{cfg.n_heads})"
        )
    if bad:
        raise ValueError(
            f"cannot export this encdec {cfg.preset!r} model as HF Marian: {'; '.join(bad)}"
        )
    t = tokenizer
    if t is None or t.bos_id is None:
        raise ValueError(
            "HF Marian's config names the decoder's start token: export an encdec model with its "
            "tokenizer (tokenizer=Tokenizer.load(MODEL_DIR)), one that has a bos token"
        )
    state = _to_hf_state(model)
    ids = dict(
        pad_token_id=t.pad_id,
        bos_token_id=t.bos_id,
        eos_token_id=t.eos_id,
        decoder_start_token_id=t.bos_id,
    )
    return write_hf_dir(out_dir, state, {**config_to_hf(cfg), **ids}, tokenizer)
