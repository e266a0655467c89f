"""Calibrated int4 (gptq, awq): calibration windows of held-out text, and the codes of every linear
layer of the blocks chosen against the activations those windows produce.

Sequential, block by block (as GPTQ's reference and AutoGPTQ): the calibration batch runs through
the blocks already quantized, forward hooks collect each linear layer's input statistics (X^T X,
mean |x|), the block's layers are quantized (quant/gptq.py, quant/awq.py), and the block's
quantized outputs become the next block's inputs. Activations are kept per chunk of sequences, so
memory is a few copies of (seqs, seq_len, D) plus one K x K matrix per layer input.

Legend: N calibration sequences, T tokens each, D d_model, K a layer's inputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from zerolm.config import CalibConfig, DataConfig, QuantConfig
from zerolm.data.clean import clean_text
from zerolm.data.prepare import document_start
from zerolm.data.sources import iter_docs, read_corpus
from zerolm.data.split import split_key
from zerolm.model.attention import attention_mask
from zerolm.model.transformer import Transformer
from zerolm.quant.formats import Quantized, dequantize
from zerolm.quant.gptq import gptq_quantize
from zerolm.quant.linear import QuantSpec
from zerolm.tokenizer import Tokenizer
from zerolm.transforms.awq_blocks import awq_block, linear

CHUNK_TOKENS = 4096  # tokens per forward call: bounds the activations of one call
READ_FACTOR = 16  # calibration windows are drawn from the first 16 x seqs x seq_len tokens


def _held_out_texts(cfg: CalibConfig) -> Iterator[str]:
    """The given files' documents, or the bundled corpora's held-out documents: those `zerolm
    prepare` puts in its validation split (the same hash of the cleaned text, the same share)."""
    if cfg.data:
        for doc in iter_docs(DataConfig(inputs=cfg.data, corpus=())):
            yield doc.text
        return
    share = DataConfig().val_fraction
    for name in cfg.corpus:
        for doc in read_corpus(name):
            text = clean_text(doc.text)
            if split_key(text) < share:
                yield text


def calibration_ids(
    tok: Tokenizer, cfg: CalibConfig, max_seq_len: int | None = None
) -> torch.Tensor:
    """(cfg.seqs, seq_len) token ids: disjoint windows of the held-out text (documents joined as in
    training shards: the tokenizer's document start, the text, eos), drawn with cfg.seed.
    seq_len = cfg.seq_len, or the model's max_seq_len where that is shorter. Text beyond
    READ_FACTOR times the tokens needed is not read (a large file costs no more than that)."""
    seq_len = min(cfg.seq_len, max_seq_len or cfg.seq_len)
    lead, stream = document_start(tok), []
    for _, doc in tok.encode_stream(_held_out_texts(cfg)):
        stream.extend([*lead, *doc.tolist(), tok.eos_id])
        if len(stream) >= READ_FACTOR * cfg.seqs * seq_len:
            break
    windows = len(stream) // seq_len
    if windows < cfg.seqs:
        where = (
            ", ".join(cfg.data) if cfg.data else f"the held-out split of {', '.join(cfg.corpus)}"
        )
        raise ValueError(
            f"calibration text too short: {where} has {len(stream)} tokens, {windows} windows of "
            f"{seq_len}, and {cfg.seqs} are needed; give more held-out text (--calib.data FILE) or "
            "lower --calib.seqs / --calib.seq_len"
        )
    ids = torch.tensor(stream[: windows * seq_len]).view(windows, seq_len)
    pick = torch.randperm(windows, generator=torch.Generator().manual_seed(cfg.seed))
    return ids[pick[: cfg.seqs]].clone()


class InputStats:
    """Statistics of one linear layer's inputs over the calibration tokens: X^T X / n (float64
    sums) and mean |x| per channel. Layers fed the same tensor (q, k, v) share one."""

    def __init__(self, k: int):
        self.xtx = torch.zeros(k, k, dtype=torch.float64)
        self.abs = torch.zeros(k, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.xtx += (x.T @ x).double()
        self.abs += x.abs().sum(0).double()
        self.n += x.shape[0]

    def hessian(self) -> torch.Tensor:
        """GPTQ's H = 2 X^T X / n (float32)."""
        return (2 * self.xtx / max(self.n, 1)).float()

    def mean_abs(self) -> torch.Tensor:
        return (self.abs / max(self.n, 1)).float()

    def scale_inputs(self, s: torch.Tensor) -> None:
        """The statistics of x / s: the inputs after AWQ folds 1/s into the op that feeds them."""
        sd = s.double()
        self.xtx /= sd[:, None] * sd[None, :]
        self.abs /= sd


def collect_stats(
    block: nn.Module, chunks: list[torch.Tensor], kw: dict, names: list[str]
) -> dict[str, InputStats]:
    """Run the block over every chunk with forward hooks on the named linear layers."""
    stats: dict[str, InputStats] = {}
    last: list[Any] = [None, None]  # the last input tensor seen and its stats: q, k, v share it

    def hook(name: str):
        def pre(_mod: nn.Module, args: tuple) -> None:
            x = args[0]
            if last[0] is x:
                stats.setdefault(name, last[1])
                return
            st = stats.setdefault(name, InputStats(x.shape[-1]))
            st.add(x)
            last[0], last[1] = x, st

        return pre

    handles = [block.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        for x in chunks:
            block(x, **kw)
    finally:
        for h in handles:
            h.remove()
    return stats


def set_weight(lin: nn.Module, qw: Quantized, bits: int) -> None:
    """Give a float layer the values its codes stand for, so later blocks see quantized outputs."""
    assert isinstance(lin, nn.Linear)
    lin.weight.data = dequantize(qw, bits, lin.weight.dtype)


def split_rows(qw: Quantized, sizes: list[int]) -> list[Quantized]:
    """The codes of a row-concatenation of matrices, cut back into each matrix's rows."""
    out, r = [], 0
    for n in sizes:
        mins = None if qw.mins is None else qw.mins[r : r + n]
        out.append(Quantized(qw.qweight[r : r + n], qw.scales[r : r + n], mins))
        r += n
    return out


def gptq_block(
    block: nn.Module, specs: dict[str, QuantSpec], stats: dict[str, InputStats], cfg: QuantConfig
) -> dict[str, Quantized]:
    """GPTQ codes of the block's named layers. Rows are independent under one H, so layers sharing
    an input and a spec (q, k, v; gate, up) are quantized as one row-concatenated matrix."""
    groups: dict[tuple[int, QuantSpec], list[str]] = {}
    for name, spec in specs.items():
        groups.setdefault((id(stats[name]), spec), []).append(name)
    out: dict[str, Quantized] = {}
    for (_, spec), names in groups.items():
        lins = [linear(block, n) for n in names]
        w = torch.cat([lin.weight.detach().float() for lin in lins])
        h = stats[names[0]].hessian()
        qw = gptq_quantize(w, h, spec.bits, spec.group, spec.scheme, cfg.gptq_damp)
        for name, lin, part in zip(names, lins, split_rows(qw, [m.out_features for m in lins])):
            set_weight(lin, part, spec.bits)
            out[name] = part
    return out


def _check_calib(model: Transformer, calib: torch.Tensor) -> None:
    if calib.dim() != 2 or calib.numel() == 0:
        raise ValueError(f"calibration ids must be (seqs, seq_len); got shape {tuple(calib.shape)}")
    if calib.shape[1] > model.cfg.max_seq_len:
        raise ValueError(
            f"calibration windows of {calib.shape[1]} tokens exceed the model's max_seq_len="
            f"{model.cfg.max_seq_len}; lower --calib.seq_len"
        )
    if int(calib.max()) >= model.cfg.vocab_size or int(calib.min()) < 0:
        raise ValueError(
            "calibration ids fall outside the model's vocabulary: draw them with the model's "
            "own tokenizer"
        )


@torch.no_grad()
def calibrated_codes(
    model: nn.Module, targets: dict[str, QuantSpec], cfg: QuantConfig, calib: torch.Tensor
) -> dict[str, Quantized]:
    """{name: codes} of the targets inside model.blocks, by cfg.method (gptq or awq), calibrated on
    `calib` (N, T) ids. The model's float weights end up holding the dequantized codes (and, for
    awq, its norms the folded 1/s): quantize_model swaps the layers right after. Targets outside
    the blocks (the head, the embedding) are left to round-to-nearest at their spec."""
    assert isinstance(model, Transformer)
    _check_calib(model, calib)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = calib.to(device)
    T = ids.shape[1]
    per = max(1, CHUNK_TOKENS // T)
    positions = torch.arange(T, device=device)
    chunks, rope = [], None
    for b in range(0, ids.shape[0], per):
        x, rope = model.embed(ids[b : b + per], positions)
        chunks.append(x)
    kw = {"rope": rope, "mask": attention_mask(T, device, model.cfg.sliding_window)}
    out: dict[str, Quantized] = {}
    try:
        for i, block in enumerate(model.blocks):
            prefix = f"blocks.{i}."
            specs = {n[len(prefix) :]: s for n, s in targets.items() if n.startswith(prefix)}
            stats = collect_stats(block, chunks, kw, list(specs))
            if cfg.method == "gptq":
                codes = gptq_block(block, specs, stats, cfg)
            else:
                codes = awq_block(block, specs, stats, chunks, kw, cfg)
            out.update({prefix + n: q for n, q in codes.items()})
            chunks = [block(x, **kw) for x in chunks]
    finally:
        model.train(was_training)
    return out
