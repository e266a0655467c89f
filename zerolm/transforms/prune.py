"""Unstructured weight pruning, a transform on a built decoder model: chosen weights of every
linear layer in the blocks are set to zero in place (embeddings and the head are kept).

  magnitude  score |W|; the lowest `sparsity` share of each layer's weights (Han et al., 2015)
  wanda      score |W_ij| · ||X_j||_2, X_j input column j over the calibration tokens, compared
             within each output row (Sun et al., 2023: "Wanda"); blocks are calibrated in order,
             each on the output of the already pruned blocks before it
  2:4        in every 4 consecutive input weights of a row keep the 2 highest-scoring (either score)

The result is an ordinary float model whose pruned weights are zeros: it saves and loads
everywhere, at the same bytes and the same speed, since a dense CPU kernel multiplies zeros like
any other weight. Unstructured sparsity buys quality-for-sparsity figures only; for a model that
is really smaller and faster use structured pruning (transforms/structured.py).

Legend: N out_features, K in_features, B calibration sequences, T tokens, D d_model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from zerolm.config import PruneConfig
from zerolm.model.attention import attention_mask
from zerolm.model.transformer import Transformer
from zerolm.quant.linear import quant_layers

CALIB_CHUNK = 8  # calibration sequences per forward (bounds the activation memory)


def prune_targets(model: nn.Module, prefix: str = "blocks.") -> dict[str, nn.Linear]:
    """Module name -> layer, for every plain nn.Linear under `prefix` (the blocks' q k v o, up gate
    down; not the embeddings or the head)."""
    return {
        name: mod
        for name, mod in model.named_modules()
        if name.startswith(prefix) and type(mod) is nn.Linear
    }


def check_prunable(model: nn.Module, cfg: PruneConfig) -> None:
    """A one-line ValueError for a model or config this transform cannot take."""
    if not isinstance(model, Transformer):
        raise ValueError(
            f"pruning supports decoder models (gpt2, llama, qwen...); this is a "
            f"{type(model).__name__}: export it and prune elsewhere"
        )
    if quant_layers(model):
        raise ValueError(
            "this model is quantized: prune its float source model first, then quantize the "
            "pruned model"
        )
    if cfg.method == "structured":
        return
    if not 0.0 < cfg.sparsity < 1.0:
        raise ValueError(f"--sparsity {cfg.sparsity} must be in (0, 1): the share of zeros")
    if cfg.pattern == "2:4":
        if cfg.sparsity != 0.5:
            raise ValueError(f"2:4 is 50 % sparsity by definition; drop --sparsity {cfg.sparsity}")
        for name, mod in prune_targets(model).items():
            if mod.in_features % 4:
                raise ValueError(
                    f"2:4 needs in_features divisible by 4; {name} has {mod.in_features}: "
                    "use --pattern unstructured"
                )


def keep_mask(score: torch.Tensor, sparsity: float, pattern: str, per_row: bool) -> torch.Tensor:
    """Boolean (N, K) mask of the weights kept. 2:4: the top 2 of every 4 consecutive scores of a
    row. Otherwise the round(sparsity·N·K) lowest scores go, compared over the whole layer, or
    within each row (per_row: every row loses floor or ceil of sparsity·K, so the layer's share is
    the request to one weight). Ties break by position."""
    n, k = score.shape
    if pattern == "2:4":
        groups = score.reshape(n, k // 4, 4)
        top = groups.topk(2, dim=-1).indices
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
        return keep.reshape(n, k)
    flat = score if per_row else score.reshape(1, -1)
    rows, cols = flat.shape
    total = round(sparsity * rows * cols)
    counts = torch.full((rows, 1), total // rows, device=score.device)
    counts[: total % rows] += 1  # (rows, 1) weights dropped per row
    order = flat.argsort(dim=1, stable=True)  # lowest first
    ranked_keep = torch.arange(cols, device=score.device)[None, :] >= counts  # (rows, cols)
    keep = torch.empty_like(flat, dtype=torch.bool).scatter_(1, order, ranked_keep)
    return keep.reshape(n, k)


def block_inputs(model: Transformer, calib: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The first block's input (B, T, D) for calibration ids (B, T), and the keyword arguments
    every block takes (RoPE tables, causal mask)."""
    if calib.dim() != 2 or calib.shape[1] > model.cfg.max_seq_len:
        raise ValueError(
            f"calibration ids must be (sequences, tokens) with at most the model's "
            f"{model.cfg.max_seq_len} tokens; got {tuple(calib.shape)}: lower --calib.seq_len"
        )
    device = next(model.parameters()).device
    ids = calib.to(device)
    x, rope = model.embed(ids, torch.arange(ids.shape[1], device=device))
    mask = attention_mask(ids.shape[1], device, model.cfg.sliding_window)
    return x, {"rope": rope, "mask": mask}


@torch.no_grad()
def run_block(block: nn.Module, x: torch.Tensor, kw: dict) -> torch.Tensor:
    """block(x) in chunks of CALIB_CHUNK sequences: (B, T, D) -> (B, T, D)."""
    return torch.cat([block(c, **kw) for c in x.split(CALIB_CHUNK)])


@torch.no_grad()
def input_stats(
    block: nn.Module, x: torch.Tensor, kw: dict, stats: dict[str, Callable]
) -> dict[str, torch.Tensor]:
    """Name -> sum over the calibration tokens of stats[name](input rows (M, K)) of the block's
    submodule `name`, captured by forward hooks in one run of the block on x."""
    sums: dict[str, torch.Tensor] = {}

    def hook(name: str, stat: Callable):
        def record(_mod, args, _out):
            s = stat(args[0].reshape(-1, args[0].shape[-1]).float())
            sums[name] = sums[name] + s if name in sums else s

        return record

    handles = [
        block.get_submodule(name).register_forward_hook(hook(name, stat))
        for name, stat in stats.items()
    ]
    try:
        run_block(block, x, kw)
    finally:
        for h in handles:
            h.remove()
    return sums


def calibrated_blocks(
    model: Transformer, calib: torch.Tensor
) -> Iterator[tuple[int, nn.Module, torch.Tensor, dict]]:
    """(index, block, its input (B, T, D), block kwargs) for each block in order. The next block's
    input is computed after the caller has changed (or replaced) model.blocks[index], so each
    block is calibrated on the output of the transformed blocks before it."""
    x, kw = block_inputs(model, calib)
    for i, block in enumerate(model.blocks):
        yield i, block, x, kw
        x = run_block(model.blocks[i], x, kw)  # the block as the caller left it (or replaced)


@torch.no_grad()
def prune_model(model: nn.Module, cfg: PruneConfig, calib: torch.Tensor | None = None) -> nn.Module:
    """Zero weights of every linear layer in the blocks in place (magnitude or wanda, unstructured
    or 2:4) and return the model. calib: (B, T) token ids of calibration text, needed by wanda."""
    check_prunable(model, cfg)
    if cfg.method == "structured":
        raise ValueError("structured pruning changes the model's shape: use prune_structured")
    assert isinstance(model, Transformer)
    if cfg.method == "magnitude":
        for mod in prune_targets(model).values():
            w = mod.weight
            w.mul_(keep_mask(w.abs(), cfg.sparsity, cfg.pattern, per_row=False))
        return model
    if calib is None:
        raise ValueError("wanda needs calibration text (token ids); see [calib]")
    was_training = model.training
    model.eval()
    for _, block, x, kw in calibrated_blocks(model, calib):
        layers = prune_targets(block, prefix="")
        sq = input_stats(block, x, kw, {name: sum_sq for name in layers})  # (K,) per layer
        for name, mod in layers.items():
            w = mod.weight
            score = w.abs() * sq[name].sqrt().to(w.dtype)[None, :]  # (N, K)
            w.mul_(keep_mask(score, cfg.sparsity, cfg.pattern, per_row=True))
    model.train(was_training)
    return model


def sum_sq(a: torch.Tensor) -> torch.Tensor:  # (M, K) -> (K,)
    return a.pow(2).sum(0)


def sparsity_report(model: nn.Module) -> list[dict]:
    """One row per weight matrix (the blocks' linears, the embeddings, an untied head): name,
    shape, zeros, size and sparsity (the share of exact zeros)."""
    rows = []
    for name, p in model.named_parameters():
        if p.dim() != 2:
            continue
        zeros = int((p == 0).sum())
        rows.append(
            {
                "name": name.removesuffix(".weight"),
                "shape": list(p.shape),
                "zeros": zeros,
                "size": p.numel(),
                "sparsity": zeros / p.numel(),
            }
        )
    return rows


def format_sparsity(rows: list[dict]) -> str:
    """The sparsity report as a text table, with a total over the blocks' linears."""
    width = max([len(r["name"]) for r in rows] + [5])
    lines = [f"{'layer':<{width}}  {'shape':>13}  {'zeros':>11}  sparsity"]
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        lines.append(f"{r['name']:<{width}}  {shape:>13}  {r['zeros']:>11,}  {r['sparsity']:7.2%}")
    body = [r for r in rows if r["name"].startswith("blocks.")]
    zeros, size = sum(r["zeros"] for r in body), sum(r["size"] for r in body)
    lines.append(f"{'blocks total':<{width}}  {'':>13}  {zeros:>11,}  {zeros / max(size, 1):7.2%}")
    return "\n".join(lines)
