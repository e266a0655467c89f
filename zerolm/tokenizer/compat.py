"""Whether two model directories read the same token ids (a reference or reward model must read
the policy's)."""

from __future__ import annotations

from pathlib import Path

from zerolm.tokenizer import Tokenizer


def check_tokenizers(policy_dir: str | Path, other_dir: str | Path, role: str) -> None:
    """A reference or reward model must read the same token ids as the policy."""
    a, b = Tokenizer.load(policy_dir), Tokenizer.load(other_dir)
    if a.sha256 != b.sha256:
        raise ValueError(
            f"the {role} {other_dir} has a different tokenizer than the policy {policy_dir} "
            f"(vocab {b.vocab_size} vs {a.vocab_size}; sha256 {b.sha256[:12]} vs {a.sha256[:12]}): "
            f"use a {role} fine-tuned from the same base model"
        )
