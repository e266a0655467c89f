"""LanguageModel: what a zerolm decoder model (model/transformer.py's Transformer, as built,
loaded or transformed) offers the code that runs it: infer/, train/, serve/, transforms/."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from zerolm.config import ModelConfig
from zerolm.model.presets import ResolvedModelConfig

Rope = tuple[torch.Tensor, torch.Tensor] | None  # (cos, sin), each (B|1, 1, T, Dh); None: no RoPE


class SavableModel(Protocol):
    """Any zerolm model (decoder, bert, encdec; as built, loaded or transformed) as a model
    directory holds it: its config and its tensors."""

    @property
    def cfg(self) -> ModelConfig: ...
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]: ...


@runtime_checkable
class LanguageModel(Protocol):
    """A decoder-only LM over token ids: logits = logits(hidden(ids)). Legend: B batch, T tokens
    in the call, D d_model, V vocabulary. Transforms (LoRA, decode_layout) keep this surface."""

    cfg: ResolvedModelConfig  # resolved (model.presets.resolve)
    training: bool
    blocks: nn.ModuleList  # the layers, in order; each maps (B, T, D) -> (B, T, D)

    def __call__(self, ids: torch.Tensor, **kw: Any) -> Any:
        """ids (B, T) -> logits (B, T, V); keyword arguments as for `hidden`."""
        ...

    def hidden(
        self,
        ids: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        cache: Any = None,
        rows: torch.Tensor | slice | None = None,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ids (B, T) -> final hidden states (B, T, D); cache: a KVCache filled in place."""
        ...

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, D) -> logits (B, T, V)."""
        ...

    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, Rope]:
        """ids (B, T) -> the first block's input (B, T, D) and the RoPE tables the blocks take."""
        ...

    def reset_buffers(self) -> None:
        """(Re)compute the non-learned tables, e.g. after moving off the meta device."""
        ...

    # the nn.Module surface the callers use
    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...
    def named_parameters(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, nn.Parameter]]: ...
    def modules(self) -> Iterator[nn.Module]: ...
    def named_modules(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, nn.Module]]: ...
    def get_submodule(self, target: str) -> nn.Module: ...
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]: ...
    def load_state_dict(
        self, state_dict: Any, strict: bool = True, assign: bool = False
    ) -> Any: ...
    def train(self, mode: bool = True) -> Any: ...
    def eval(self) -> Any: ...
    def requires_grad_(self, requires_grad: bool = True) -> Any: ...
    def to(self, *args: Any, **kwargs: Any) -> Any: ...
