"""Sentence embeddings from a bert model, for `zerolm embed` and semantic search.

Each text becomes [CLS] ids [SEP]; the embedding is the mean of the final hidden states over its
real tokens, L2-normalised (sentence-transformers' recipe for all-MiniLM-L6-v2 and its kin), so a
dot product of two embeddings is their cosine similarity. Texts are batched by length (little
padding); a text longer than the window is truncated, keeping its start, with a warning.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from zerolm.data.sources import decode_lines, jsonl_rows
from zerolm.files import atomic_write_text
from zerolm.model.bert import Bert
from zerolm.tokenizer import Tokenizer

log = logging.getLogger("zerolm")


def read_texts(path: str | Path, field: str = "text") -> list[str]:
    """Texts of a .txt file (one per line) or a .jsonl file (`field` of each row); blank lines
    skipped."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--input {str(path)!r} does not exist")
    if p.suffix != ".jsonl":
        lines = (line.rstrip("\r\n") for _, _, line in decode_lines(p))
        texts = [line for line in lines if line.strip()]
    else:
        texts = []
        for where, row in jsonl_rows(p):
            if not isinstance(row, dict) or not isinstance(row.get(field), str):
                raise ValueError(
                    f"{where}: no string field {field!r} (pick the field with --field)"
                )
            texts.append(row[field])
    if not texts:
        raise ValueError(f"{p} holds no texts to embed")
    return texts


def encode_texts(tok: Tokenizer, texts: list[str], max_tokens: int) -> list[list[int]]:
    """[CLS] ids [SEP] per text, each cut to at most max_tokens (a warning counts the cut ones)."""
    cls, sep, room = tok.cls_id, tok.sep_id, max_tokens - 2
    ids = tok.encode_batch(texts)
    if cut := sum(len(x) > room for x in ids):
        log.warning(
            "%d of %d texts are longer than %d tokens: truncated (their ends are not embedded)",
            cut,
            len(texts),
            max_tokens,
        )
    return [[cls, *x[:room], sep] for x in ids]


@torch.inference_mode()
def embed_ids(
    model: Bert, ids: list[list[int]], pad_id: int, batch_size: int = 32, progress: bool = False
) -> np.ndarray:
    """(N, D) float32 normalised mean-pooled embeddings of token-id rows, in input order."""
    from tqdm import tqdm

    device = next(model.parameters()).device
    order = sorted(
        range(len(ids)), key=lambda i: -len(ids[i])
    )  # similar lengths together: little padding
    out = np.empty((len(ids), model.cfg.d_model), dtype=np.float32)
    for start in tqdm(
        range(0, len(order), batch_size), desc="embed", unit="batch", disable=not progress
    ):
        rows = order[start : start + batch_size]
        T = len(ids[rows[0]])
        batch = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros(len(rows), T, dtype=torch.bool)
        for r, i in enumerate(rows):
            batch[r, : len(ids[i])] = torch.tensor(ids[i])
            mask[r, : len(ids[i])] = True
        batch, mask = batch.to(device), mask.to(device)
        out[rows] = (
            model.embed(model.hidden(batch, attention_mask=mask), mask).float().cpu().numpy()
        )
    return out


def embed_texts(
    model: Bert,
    tok: Tokenizer,
    texts: list[str],
    batch_size: int = 32,
    max_tokens: int = 0,
    progress: bool = False,
) -> np.ndarray:
    """(N, D) float32 embeddings of `texts`; max_tokens: the truncation length (0: the model
    window)."""
    if model.cfg.arch != "bert":
        raise ValueError(f"embeddings need a bert model, not a {model.cfg.arch} model")
    window = model.cfg.max_seq_len
    if not 2 < (max_tokens or window) <= window:
        raise ValueError(
            f"--max-tokens must be in 3..{window} (the model window), got {max_tokens}"
        )
    ids = encode_texts(tok, texts, max_tokens or window)
    return embed_ids(model, ids, tok.pad_id, batch_size, progress)


def write_embeddings(path: str | Path | None, texts: list[str], vectors: np.ndarray) -> None:
    """An (N, D) float32 .npy, or JSONL rows {"text", "embedding"} (to stdout when path is None)."""
    if path is not None and Path(path).suffix == ".npy":
        np.save(path, vectors)
        return
    rows = "".join(
        json.dumps({"text": t, "embedding": [round(float(x), 7) for x in v]}, ensure_ascii=False)
        + "\n"
        for t, v in zip(texts, vectors)
    )
    if path is None:
        print(rows, end="")
    else:
        atomic_write_text(path, rows)


def embed_file(
    model_dir: str | Path,
    input_path: str | Path,
    output: str | Path | None = None,
    field: str = "text",
    batch_size: int = 32,
    max_tokens: int = 0,
    progress: bool = True,
) -> np.ndarray:
    """`zerolm embed`: embed every text of input_path with the bert model in model_dir, write them
    to output (.jsonl or .npy; None: JSONL on stdout) and return them."""
    from zerolm.model import load_model, read_model_config

    if output is not None and Path(output).suffix not in (".jsonl", ".npy"):
        raise ValueError(f"--output {str(output)!r}: name a .jsonl or a .npy file")
    if batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    arch = read_model_config(model_dir).arch
    if arch != "bert":
        raise ValueError(
            f"{model_dir} is a {arch} model; `zerolm embed` needs a bert model (e.g. an imported "
            "sentence-transformers checkpoint: `zerolm import --from hf DIR`)"
        )
    texts = read_texts(input_path, field)
    model, tok = load_model(model_dir), Tokenizer.load(model_dir)
    vectors = embed_texts(model, tok, texts, batch_size, max_tokens, progress)
    write_embeddings(output, texts, vectors)
    log.info(
        "embedded %d texts (dimension %d)%s",
        len(texts),
        vectors.shape[1],
        f" into {output}" if output else "",
    )
    return vectors
