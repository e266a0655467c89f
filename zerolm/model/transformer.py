"""The decoder-only Transformer that every preset assembles (simple, gpt2, llama).

Legend: B batch, T tokens in this call, S cached + new positions, D d_model, V vocabulary.
Internal parameter names (the only names zerolm uses; HF names live in interop/hf.py):
  tok_emb, pos_emb, blocks.{i}.{norm1,attn.{q,k,v,o},norm2,ffn.{up,gate,down}}, norm_f, lm_head
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from zerolm.model.attention import Attention, attention_mask
from zerolm.model.layers import FFN, make_norm, position_buffers
from zerolm.model.presets import ResolvedModelConfig
from zerolm.model.protocol import Rope


class Block(nn.Module):
    """Pre-norm: x + f(norm(x)). Post-norm (the original Transformer): norm(x + f(x))."""

    def __init__(self, cfg: ResolvedModelConfig):
        super().__init__()
        self.pre = cfg.norm_placement == "pre"
        self.norm1 = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias, feeds_matmul=self.pre)
        self.attn = Attention(
            cfg.d_model,
            cfg.n_heads,
            cfg.n_kv_heads,
            cfg.bias,
            cfg.dropout,
            head_dim=cfg.head_dim,
            qkv_bias=cfg.qkv_bias,
            qk_norm_eps=cfg.norm_eps if cfg.qk_norm else None,
        )
        self.norm2 = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias, feeds_matmul=self.pre)
        self.ffn = FFN(cfg.d_model, cfg.d_ff, cfg.ffn, cfg.bias, cfg.dropout)

    def forward(self, x: torch.Tensor, **attn_kw: Any) -> torch.Tensor:  # (B, T, D)
        if self.pre:
            x = x + self.attn(self.norm1(x), **attn_kw)
            return x + self.ffn(self.norm2(x))
        x = self.norm1(x + self.attn(x, **attn_kw))
        return self.norm2(x + self.ffn(x))


class Transformer(nn.Module):
    # the non-learned position tables position_buffers registers (per cfg.position)
    pos_table: torch.Tensor  # (max_seq_len, D), sinusoidal
    rope_cos: torch.Tensor  # (max_seq_len, Dh), rope; likewise rope_sin
    rope_sin: torch.Tensor

    def __init__(self, cfg: ResolvedModelConfig):
        """`cfg` must be resolved (zerolm.model.presets.resolve)."""
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = (
            nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.position == "learned" else None
        )
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm_f = (
            make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias, True)
            if cfg.norm_placement == "pre"
            else None
        )
        self.lm_head = (
            None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        )
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """(Re)compute the non-learned tables; call after moving off the meta device."""
        position_buffers(self, self.cfg)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """GPT-2 initialisation: N(0, 0.02), output projections of residual branches scaled by
        1/sqrt(2·n_layers), zero biases, unit norms."""
        std = 0.02
        for name, p in self.named_parameters():
            if p.dim() == 1:
                (p.fill_(1.0) if name.endswith("weight") else p.zero_())
            else:
                s = (
                    std / math.sqrt(2 * self.cfg.n_layers)
                    if name.endswith(("attn.o.weight", "ffn.down.weight"))
                    else std
                )
                p.normal_(0.0, s, generator=generator)

    def forward(self, ids: torch.Tensor, **kw) -> torch.Tensor:
        """ids (B, T) -> logits (B, T, V); keyword arguments as for `hidden`."""
        return self.logits(self.hidden(ids, **kw))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states (B, T, D) -> logits (B, T, V)."""
        head: nn.Module = self.tok_emb if self.lm_head is None else self.lm_head
        project = getattr(head, "project", None)  # a quantized head runs its own kernel (quant/)
        if project is not None:
            return project(hidden)
        weight: torch.Tensor = head.weight  # type: ignore[assignment]
        return hidden @ weight.T

    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, Rope]:
        """ids (B, T) at positions (B, T) or (T,) -> the first block's input (B, T, D) and the RoPE
        (cos, sin) tables the blocks take (None without RoPE)."""
        cfg = self.cfg
        x = self.tok_emb(ids)  # (B, T, D)
        if self.pos_emb is not None:  # learned positions
            x = x + self.pos_emb(positions)
        elif cfg.position == "sinusoidal":
            x = x + self.pos_table[positions]
        rope = None
        if cfg.position == "rope":
            pos = positions if positions.dim() == 2 else positions[None]  # (B|1, T)
            rope = (
                self.rope_cos[pos][:, None].to(x.dtype),
                self.rope_sin[pos][:, None].to(x.dtype),
            )
        return self.drop(x), rope

    def hidden(
        self,
        ids: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        cache=None,
        rows: torch.Tensor | slice | None = None,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ids (B, T) -> the final hidden states (B, T, D) that the LM head (or a reward head)
        reads.

        positions: (B, T) or (T,) position of each token (default: arange(T), or each row's cache
        length onwards); cache: a KVCache filled in place, rows: (B,) its slots that ids continue
        (default all, in order; see infer/kv_cache.py); segments: (B, T) ids of packed sequences
        (no cache): attention stays within a segment."""
        cfg = self.cfg
        T = ids.shape[1]
        if cache is not None:
            if segments is not None:
                raise ValueError(
                    "segments (packed training rows) cannot be combined with a KV cache"
                )
            cache_positions, mask = cache.begin(rows, T, cfg.sliding_window)
            if positions is None:
                positions = cache_positions
        else:
            if ids.shape[1] > cfg.max_seq_len:
                raise ValueError(
                    f"sequence of {T} tokens exceeds the model's max_seq_len={cfg.max_seq_len}"
                )
            if positions is None:
                positions = torch.arange(T, device=ids.device)
            mask = attention_mask(T, ids.device, cfg.sliding_window, segments)
        x, rope = self.embed(ids, positions)
        for i, block in enumerate(self.blocks):
            x = block(x, rope=rope, mask=mask, cache=cache, layer=i)
        if cache is not None:
            cache.end()
        return x if self.norm_f is None else self.norm_f(x)
