"""Tensor-parallel decoding cases run the same way in one process (the reference, inside pytest) and
under torchrun (`python -m torch.distributed.run ... tests/dist/tp_cases.py OUT`: each rank shards
the model with --tp = WORLD_SIZE, rank 0 saves the results to OUT). Tiny seeded models, fp32."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from zerolm.config import ModelConfig
from zerolm.infer.engine import Engine
from zerolm.infer.kv_cache import KVCache
from zerolm.model import build_model

VOCAB, T, NEW = 61, 32, 8
PROMPTS = [[1, 5, 9, 2, 7], [3, 3, 8, 1, 4]]  # equal lengths: one prefill call
MODELS = {
    # GQA: 4 query heads, 2 kv heads (2 per rank at TP-2: one kv head and its 2 query heads)
    "llama_gqa": dict(preset="llama", d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64),
    "gpt2": dict(preset="gpt2", d_model=32, n_layers=2, n_heads=4, d_ff=64),
}


@torch.no_grad()
def model(name: str):
    """The seeded model, its weights redrawn N(0, 0.3) so greedy tokens vary (GPT-2's init with a
    tied head would repeat the input token)."""
    cfg = ModelConfig(**MODELS[name], max_seq_len=T)  # type: ignore[arg-type]
    m = build_model(cfg, vocab_size=VOCAB, seed=3).eval()
    g = torch.Generator().manual_seed(4)
    for p in m.parameters():
        p.normal_(0.0, 0.3, generator=g)
    return m


@torch.inference_mode()
def decode(m) -> dict:
    """Greedy tokens through the KV cache, each step's (B, V) logits, and the cache's shape."""
    engine = Engine(m)
    cache = KVCache.for_model(m, len(PROMPTS), len(PROMPTS[0]) + NEW)
    logits = engine.prefill(PROMPTS, cache)
    steps, tokens = [logits], []
    for _ in range(NEW - 1):
        ids = logits.argmax(-1)  # (B,)
        tokens.append(ids.tolist())
        logits = engine.decode(ids[:, None], cache)
        steps.append(logits)
    tokens.append(logits.argmax(-1).tolist())
    return {
        "tokens": torch.tensor(tokens).T.tolist(),  # (B, NEW)
        "logits": torch.stack(steps),  # (NEW, B, V)
        "cache": tuple(cache.k[0].shape),
    }


def main(out: Path) -> None:
    from zerolm.dist import group
    from zerolm.dist.tensor import mesh, tensor_parallel

    n = group.env_world_size()
    tp = mesh(n)
    results = {name: decode(tensor_parallel(model(name), tp)) for name in MODELS}
    if group.is_main():
        torch.save(results, out / "results.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]))
