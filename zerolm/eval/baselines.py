"""Baselines a text classifier has to beat, measured on the same split: the majority class, and a
bag-of-characters logistic regression (softmax regression with L2 on TF-IDF-weighted log counts
of characters, fitted to convergence with L-BFGS; no scikit-learn).

Legend: N texts, F features (characters), C classes.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def majority_baseline(train_y: Sequence[int], val_y: Sequence[int]) -> dict:
    """Always answer the most frequent training label."""
    label, _ = Counter(train_y).most_common(1)[0]
    return {"label": label, "accuracy": sum(y == label for y in val_y) / max(len(val_y), 1)}


class CharFeatures:
    """Characters seen in training (whitespace excluded) -> (1 + log count) * idf, rows
    L2-normalised."""

    def __init__(self, texts: Sequence[str], min_df: int = 1):
        df = Counter(c for t in texts for c in set(t) if not c.isspace())
        self.vocab = {c: i for i, c in enumerate(sorted(c for c, n in df.items() if n >= min_df))}
        n = len(texts)
        self.idf = torch.tensor([math.log((1 + n) / (1 + df[c])) + 1 for c in self.vocab])  # (F,)

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, F) sparse COO matrix; characters unseen in training are ignored."""
        rows, cols, vals = [], [], []
        for r, t in enumerate(texts):
            for c, k in Counter(t).items():
                if (j := self.vocab.get(c)) is not None:
                    rows.append(r)
                    cols.append(j)
                    vals.append(1 + math.log(k))
        v = (
            torch.tensor(vals) * self.idf[torch.tensor(cols, dtype=torch.long)]
            if cols
            else torch.zeros(0)
        )
        norms = (
            torch.zeros(len(texts))
            .index_add_(0, torch.tensor(rows, dtype=torch.long), v * v)
            .sqrt()
        )
        v = v / norms[torch.tensor(rows, dtype=torch.long)].clamp(min=1e-12)
        idx = torch.tensor([rows, cols], dtype=torch.long).reshape(2, -1)
        return torch.sparse_coo_tensor(
            idx, v, (len(texts), len(self.vocab)), check_invariants=False
        ).coalesce()


def fit_logreg(
    X: torch.Tensor,
    y: torch.Tensor,
    n_classes: int,
    l2: float,
    max_iter: int = 300,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax regression: minimise mean cross entropy + l2 * ||W||^2 (bias not penalised) with
    full-batch L-BFGS (strong Wolfe line search) until the gradient or the loss stops changing.
    X (N, F) sparse; the gradient is written out (X^T (P - Y) / N + 2 l2 W) so each evaluation is
    two sparse products. init: a starting (W, b), e.g. the fit at a neighbouring l2."""
    W = (init[0].clone() if init else torch.zeros(X.shape[1], n_classes)).requires_grad_()  # (F, C)
    b = (init[1].clone() if init else torch.zeros(n_classes)).requires_grad_()  # (C,)
    Xt = X.t().coalesce()  # (F, N)
    onehot = F.one_hot(y, n_classes).float()  # (N, C)
    opt = torch.optim.LBFGS(
        [W, b],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
    )

    @torch.no_grad()
    def closure():
        logits = torch.sparse.mm(X, W) + b  # (N, C)
        loss = F.cross_entropy(logits, y) + l2 * W.pow(2).sum()
        err = (logits.softmax(-1) - onehot) / len(y)  # (N, C): d loss / d logits
        W.grad = torch.sparse.mm(Xt, err) + 2 * l2 * W
        b.grad = err.sum(0)
        return loss

    opt.step(closure)
    return W.detach(), b.detach()


def predict_logreg(X: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (torch.sparse.mm(X, W) + b).argmax(-1)


def bag_of_chars_baseline(
    train_x: Sequence[str],
    train_y: Sequence[int],
    val_x: Sequence[str],
    val_y: Sequence[int],
    n_classes: int,
    l2_grid: Sequence[float] = (1e-4, 3e-5, 1e-5, 3e-6, 1e-6),
) -> dict:
    """Bag-of-characters logistic regression. The L2 strength is chosen on a tenth of the
    training rows held out from the rest (every 10th row; the validation split is never looked
    at; the grid is walked from strong to weak, each fit starting from the previous one), then
    the model is refitted on all training rows and scored on the validation split."""
    y = torch.tensor(list(train_y))
    dev = torch.zeros(len(y), dtype=torch.bool)
    dev[::10] = True
    scores = {}
    if len(y) >= 20 and len(l2_grid) > 1:
        fit_x = [t for t, d in zip(train_x, dev.tolist()) if not d]
        feats = CharFeatures(fit_x)
        X_fit, X_dev = feats(fit_x), feats([t for t, d in zip(train_x, dev.tolist()) if d])
        init = None
        for l2 in sorted(l2_grid, reverse=True):
            init = fit_logreg(X_fit, y[~dev], n_classes, l2, init=init)
            scores[l2] = float((predict_logreg(X_dev, *init) == y[dev]).float().mean())
    best = (
        max(scores, key=lambda k: (scores[k], k)) if scores else l2_grid[0]
    )  # ties: the stronger penalty
    feats = CharFeatures(train_x)
    W, b = fit_logreg(feats(train_x), y, n_classes, best)
    pred = predict_logreg(feats(val_x), W, b)
    acc = float((pred == torch.tensor(list(val_y))).float().mean()) if len(val_y) else 0.0
    return {
        "accuracy": acc,
        "l2": best,
        "dev_accuracy_by_l2": scores,
        "features": len(feats.vocab),
        "predictions": pred.tolist(),
    }
