"""Output-level evidence: how inference-mode predictions compare with training-mode ones and labels."""

from __future__ import annotations

import numpy as np


def as_scores(outputs) -> np.ndarray:
    """(N, classes) scores from a model's output (the first one when there are several)."""
    if isinstance(outputs, dict):
        outputs = next(iter(outputs.values()))
    if isinstance(outputs, (list, tuple)):
        outputs = outputs[0]
    scores = np.asarray(outputs, np.float64)
    return scores.reshape(len(scores), -1)


def predicted(scores: np.ndarray) -> np.ndarray:
    if scores.shape[1] == 1:  # one logit or probability: its sign / side of 0.5 decides
        cut = 0.5 if scores.min() >= 0 and scores.max() <= 1 else 0.0
        return (scores[:, 0] > cut).astype(int)
    return scores.argmax(axis=1)


def accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(predicted(scores) == labels))


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(predicted(a) == predicted(b)))


def relative_change(reference: np.ndarray, other: np.ndarray) -> float:
    return float(np.linalg.norm(other - reference) / max(np.linalg.norm(reference), 1e-12))


def ranking_quality(scores: np.ndarray, labels: np.ndarray) -> tuple[str, float] | None:
    """AUC for one output or two classes, top-5 accuracy for more than five classes; None otherwise."""
    classes = scores.shape[1]
    if classes <= 2:
        margin = scores[:, 1] - scores[:, 0] if classes == 2 else scores[:, 0]
        return "AUC", auc(margin, labels == 1)
    if classes > 5:
        top5 = np.argsort(-scores, axis=1)[:, :5]
        return "top-5 accuracy", float(np.mean((top5 == labels[:, None]).any(axis=1)))
    return None


def auc(score: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a random positive outranks a random negative (ties count half)."""
    pos, neg = score[positive], score[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order))
    values = np.concatenate([pos, neg])[order]
    ranks[order] = _average_ranks(values)
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def _average_ranks(sorted_values: np.ndarray) -> np.ndarray:
    ranks = np.arange(1, len(sorted_values) + 1, dtype=np.float64)
    _, start, counts = np.unique(sorted_values, return_index=True, return_counts=True)
    for s, c in zip(start, counts):
        if c > 1:
            ranks[s:s + c] = ranks[s:s + c].mean()
    return ranks
