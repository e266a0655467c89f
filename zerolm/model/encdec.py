"""The encoder-decoder Transformer (arch encdec): the original Transformer by default (preset
transformer: post-LN, ReLU, sinusoidal positions, scaled shared embeddings), any preset's blocks
otherwise (`--model.arch=encdec --model.preset=gpt2`: pre-LN, GELU, learned positions, final norms).

Legend: B batch, S source positions, T target tokens in this call, D d_model, V vocabulary.
Sources are padded on the right; `src_mask` (B, S) is 1/True for real tokens (None: all real).
Internal parameter names (HF Marian names live in interop/hf_marian.py):
  tok_emb (shared by encoder, decoder and a tied output head), lm_head (untied only),
  encoder.{pos_emb,emb_norm,norm_f},
  encoder.blocks.{i}.{norm1,attn.{q,k,v,o},norm2,ffn.{up,gate,down}},
  decoder.{pos_emb,emb_norm,norm_f},
  decoder.blocks.{i}.{norm1,attn,norm_cross,cross_attn,norm2,ffn},
  final_logits_bias (a (V,) buffer, zeros unless imported: Marian checkpoints carry one)
pos_emb exists for learned positions, emb_norm with embed_norm, norm_f with pre-norm.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from zerolm.model.attention import Attention
from zerolm.model.layers import make_norm, position_buffers
from zerolm.model.presets import ResolvedModelConfig
from zerolm.model.transformer import Block


class DecoderBlock(Block):
    """Block with cross-attention to the encoder memory between self-attention and the FFN."""

    def __init__(self, cfg: ResolvedModelConfig):
        super().__init__(cfg)
        self.norm_cross = make_norm(
            cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias, feeds_matmul=self.pre
        )
        self.cross_attn = Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.bias, cfg.dropout)

    def forward(self, x, *, cross_kv, cross_mask, **attn_kw):  # (B, T, D)
        if self.pre:
            x = x + self.attn(self.norm1(x), **attn_kw)
            x = x + self.cross_attn(self.norm_cross(x), kv=cross_kv, mask=cross_mask)
            return x + self.ffn(self.norm2(x))
        x = self.norm1(x + self.attn(x, **attn_kw))
        x = self.norm_cross(x + self.cross_attn(x, kv=cross_kv, mask=cross_mask))
        return self.norm2(x + self.ffn(x))


class Stack(nn.Module):
    """One side's own parts: learned positions, embedding norm, blocks, final norm (pre-norm)."""

    def __init__(self, cfg: ResolvedModelConfig, n_blocks: int, block: type[Block]):
        super().__init__()
        self.pos_emb = (
            nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.position == "learned" else None
        )
        self.emb_norm = (
            make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias) if cfg.embed_norm else None
        )
        self.blocks = nn.ModuleList(block(cfg) for _ in range(n_blocks))
        pre = cfg.norm_placement == "pre"
        self.norm_f = (
            make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias, True) if pre else None
        )


class EncoderDecoder(nn.Module):
    final_logits_bias: torch.Tensor  # (V,) buffer
    # the non-learned position tables position_buffers registers (per cfg.position)
    pos_table: torch.Tensor  # (max_seq_len, D), sinusoidal
    rope_cos: torch.Tensor  # (max_seq_len, Dh), rope; likewise rope_sin
    rope_sin: torch.Tensor

    def __init__(self, cfg: ResolvedModelConfig):
        """`cfg` must be resolved (zerolm.model.presets.resolve) with arch encdec."""
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder = Stack(cfg, cfg.n_layers, Block)
        self.decoder = Stack(cfg, cfg.n_decoder_layers or cfg.n_layers, DecoderBlock)
        self.lm_head = (
            None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        )
        self.register_buffer("final_logits_bias", torch.zeros(cfg.vocab_size))
        self.reset_buffers()

    def reset_buffers(self):
        """(Re)compute the non-learned tables; call after moving off the meta device."""
        position_buffers(self, self.cfg)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None):
        """Zero biases, unit norms; token embeddings N(0, 1/d) when scaled by sqrt(d) (the original
        Transformer: unit-scale inputs and tied logits), else N(0, 0.02) like positions. Pre-norm
        matrices: the Transformer's GPT-2 scheme (N(0, 0.02), residual output projections scaled by
        1/sqrt(sublayers)). Post-norm matrices: Xavier-uniform, as the original Transformer, fairseq
        and Marian: with N(0, 0.02) each post-LN sublayer starts ~50x below the normalised residual
        and a 1+1-layer model did not learn to reverse 5 tokens in 300 Adam steps (loss stuck at the
        unigram entropy; Xavier: 0.01)."""
        cfg, std = self.cfg, 0.02
        for name, p in self.named_parameters():
            if p.dim() == 1:
                (p.fill_(1.0) if name.endswith("weight") else p.zero_())
            elif name == "tok_emb.weight":
                p.normal_(0.0, cfg.d_model**-0.5 if cfg.embed_scale else std, generator=generator)
            elif name.endswith("pos_emb.weight"):
                p.normal_(0.0, std, generator=generator)
            elif cfg.norm_placement == "post":
                bound = math.sqrt(6.0 / (p.shape[0] + p.shape[1]))
                p.uniform_(-bound, bound, generator=generator)
            elif name.endswith(("attn.o.weight", "ffn.down.weight")):  # incl. cross_attn.o
                n = (
                    2 * cfg.n_layers
                    if name.startswith("encoder.")
                    else 3 * len(self.decoder.blocks)
                )
                p.normal_(0.0, std / math.sqrt(n), generator=generator)
            else:
                p.normal_(0.0, std, generator=generator)
        self.final_logits_bias.zero_()

    # ------------------------------------------------------------------ pieces

    def _embed(self, ids, side: Stack, positions):
        """ids (B, T), positions (T,) or (B, T) -> (B, T, D): tokens (x sqrt(d)) + positions, norm,
        dropout."""
        x = self.tok_emb(ids)  # (B, T, D)
        if self.cfg.embed_scale:
            x = x * math.sqrt(self.cfg.d_model)
        if side.pos_emb is not None:
            x = x + side.pos_emb(positions)
        elif self.cfg.position == "sinusoidal":
            x = x + self.pos_table[positions]
        if side.emb_norm is not None:
            x = side.emb_norm(x)
        return self.drop(x)

    def _rope(self, positions, dtype):
        if self.cfg.position != "rope":
            return None
        pos = positions if positions.dim() == 2 else positions[None]  # (B|1, T)
        return self.rope_cos[pos][:, None].to(dtype), self.rope_sin[pos][:, None].to(dtype)

    def _check_len(self, n: int, what: str) -> None:
        if n > self.cfg.max_seq_len:
            raise ValueError(
                f"{what} of {n} tokens exceeds the model's max_seq_len={self.cfg.max_seq_len}: "
                "shorten it (or train a model with a larger --model.max_seq_len)"
            )

    @staticmethod
    def key_mask(src_mask, S: int, device):
        """(B, S) real-token flags -> (B|1, 1, 1, S) boolean mask of attendable source positions."""
        if src_mask is None:
            return torch.ones(1, 1, 1, S, dtype=torch.bool, device=device)
        if src_mask.shape[-1] != S or src_mask.dim() != 2:
            raise ValueError(
                f"src_mask must be (batch, {S}) like the source, got {tuple(src_mask.shape)}"
            )
        m = src_mask.bool()
        if not bool(m.any(1).all()):
            raise ValueError(
                "a source row has no real token (src_mask all 0): give each source at least one"
            )
        return m[:, None, None, :]

    # ------------------------------------------------------------------ API

    def encode(self, src, src_mask=None):
        """src (B, S) ids, src_mask (B, S) 1/True = real token -> memory (B, S, D)."""
        S = src.shape[1]
        self._check_len(S, "source")
        mask = self.key_mask(src_mask, S, src.device)  # (B|1, 1, 1, S)
        positions = torch.arange(S, device=src.device)
        x = self._embed(src, self.encoder, positions)
        rope = self._rope(positions, x.dtype)
        for block in self.encoder.blocks:
            x = block(x, rope=rope, mask=mask)
        return x if self.encoder.norm_f is None else self.encoder.norm_f(x)

    def cross_kv(self, memory):
        """The cross-attention keys/values of each decoder block, [(B, H, S, Dh) x 2] per block."""
        return [block.cross_attn.project_kv(memory) for block in self.decoder.blocks]

    def decode(self, tgt, memory, src_mask=None, *, cache=None):
        """tgt (B, T) ids (starting with the decoder start token) -> final hidden states (B, T, D).

        Without cache: the whole target at once (teacher forcing), causal. With cache (an
        infer.seq2seq.Seq2SeqCache): tgt continues the cached rows; the first call projects the
        memory into cross-attention keys/values and keeps them (later calls may pass
        memory=None)."""
        T = tgt.shape[1]
        if cache is None:
            self._check_len(T, "target")
            positions, self_mask = torch.arange(T, device=tgt.device), None  # None: causal
            cross = self.cross_kv(memory)
            cross_mask = self.key_mask(src_mask, memory.shape[1], tgt.device)
        else:
            if cache.cross is None:
                cache.cross = self.cross_kv(memory)
                if src_mask is not None and bool(src_mask.bool().all()):
                    src_mask = None  # no padding: no mask to apply at each step
                cache.cross_mask = (
                    None
                    if src_mask is None
                    else self.key_mask(src_mask, memory.shape[1], tgt.device)
                )
            positions, self_mask = cache.self_attn.begin(None, T)
            cross, cross_mask = cache.cross, cache.cross_mask
            if cross_mask is None and T > 1:  # attend() reads mask None as causal for T > 1
                cross_mask = torch.ones(
                    1, 1, 1, cross[0][0].shape[2], dtype=torch.bool, device=tgt.device
                )
        x = self._embed(tgt, self.decoder, positions)
        rope = self._rope(positions, x.dtype)
        kv_cache = None if cache is None else cache.self_attn
        for i, block in enumerate(self.decoder.blocks):
            x = block(
                x,
                rope=rope,
                mask=self_mask,
                cache=kv_cache,
                layer=i,
                cross_kv=cross[i],
                cross_mask=cross_mask,
            )
        if cache is not None:
            cache.self_attn.end()
        return x if self.decoder.norm_f is None else self.decoder.norm_f(x)

    @property
    def head_weight(self):
        """(V, D): the output projection (the shared embedding when tied)."""
        return self.tok_emb.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, hidden):
        """Final decoder hidden states (..., D) -> logits (..., V)."""
        return F.linear(hidden, self.head_weight, self.final_logits_bias)  # one fused matmul + bias

    def forward(self, src, tgt, src_mask=None):
        """Teacher forcing: src (B, S), tgt (B, T) starting with the decoder start token -> logits
        (B, T, V)."""
        return self.logits(self.decode(tgt, self.encode(src, src_mask), src_mask))
