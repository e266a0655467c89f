"""Tensor-parallel decoding cases run the same way in one process (the reference, inside pytest) and
under torchrun (`python -m torch.distributed.run ... tests/dist/tp_cases.py OUT`: each rank shards
the model with --tp = WORLD_SIZE, rank 0 saves the results to OUT). Tiny seeded models, fp32."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from zerolm.config import ModelConfig
from zerolm.infer.engine import Engine, GenerateRequest
from zerolm.infer.kv_cache import KVCache
from zerolm.infer.sampling import SamplingParams
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
    """The seeded model, its matrices and biases redrawn N(0, 0.1): greedy tokens that vary (GPT-2's
    init with its tied head repeats a token) and non-zero biases, which the plan must add once."""
    cfg = ModelConfig(**MODELS[name], max_seq_len=T)  # type: ignore[arg-type]
    m = build_model(cfg, vocab_size=VOCAB, seed=3).eval()
    g = torch.Generator().manual_seed(4)
    for name, p in m.named_parameters():
        if p.dim() > 1 or name.endswith("bias"):
            p.normal_(0.0, 0.1, generator=g)
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


def sample(m) -> list[list[int]]:
    """Tokens drawn at temperature 0.8 with seed 7 (the engine's own loop)."""
    req = GenerateRequest(max_new_tokens=NEW, sampling=SamplingParams(temperature=0.8), seed=7)
    return Engine(m).generate(PROMPTS, req)


def refused(tp, **overrides) -> str:
    """The ValueError tensor_parallel raises for a model it cannot shard ("" if none)."""
    from zerolm.config import QuantConfig
    from zerolm.dist.tensor import tensor_parallel
    from zerolm.transforms.quantize import quantize_model

    quant = overrides.pop("quant", False)
    m = build_model(ModelConfig(**{**MODELS["llama_gqa"], **overrides}, max_seq_len=T), VOCAB)
    try:
        tensor_parallel(quantize_model(m, QuantConfig()) if quant else m, tp)
    except ValueError as e:
        return str(e)
    return ""


def main(out: Path) -> None:
    from zerolm.dist import group
    from zerolm.dist.tensor import mesh, tensor_parallel

    n = group.env_world_size()
    tp = mesh(n)
    results: dict = {name: decode(tensor_parallel(model(name), tp)) for name in MODELS}
    results["sampled"] = sample(tensor_parallel(model("llama_gqa"), tp))
    results["odd_heads"] = refused(tp, d_model=24, n_heads=3, n_kv_heads=3)
    results["one_kv_head"] = refused(tp, n_kv_heads=1)
    results["quantized"] = refused(tp, quant=True)
    if group.is_main():
        torch.save(results, out / "results.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]))
