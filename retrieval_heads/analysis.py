"""Analyses of head scores and trial records: pure functions, no model (numpy only).

Here, per-head statistics of score tables:

- sparsity: the share of heads above the retrieval threshold (0.1) and the paper's histogram
  bins ``0``, ``(0, 0.1]``, ``(0.1, 0.5]``, ``> 0.5``;
- agreement of two score tables of one shape: Pearson, Spearman (average ranks for ties), and
  the Jaccard index of the top-k head sets;
- tables across models ("universal" table, a paper-style fixed-width summary).

Beside it, and importable from here as before (``analysis.X`` for every name below):
:mod:`~retrieval_heads.frequency` (activation frequency from copy events: the share of trials in
which each head copied, the always-on heads, the contexts activating the rest),
:mod:`~retrieval_heads.summaries` (K-sweep summaries of ablation runs and the KV-cache curve)
and :mod:`~retrieval_heads.tables` (``format_table``). The deprecated ``k_sweep`` alias of
``summarise_k_sweep`` lives here.

Inputs are :class:`~retrieval_heads.scores.HeadScores` or plain ``[layer, head]`` arrays;
heads without a score (NaN) are left out of every count and statistic.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from jaxtyping import Float

from retrieval_heads.frequency import (
    CONTEXT_KEYS,
    ContextRow,
    activating_contexts,
    activation_frequency,
    active_trials,
    always_on_heads,
)
from retrieval_heads.heads import Head
from retrieval_heads.records import TrialRecord
from retrieval_heads.scores import HeadScores
from retrieval_heads.summaries import (
    KSweepRow,
    KVPoint,
    baseline_accuracy,
    format_k_sweep,
    format_kv_curve,
    is_sufficient,
    k_sweep_cells,
    kv_curve,
    smallest_sufficient_k,
    summarise_k_sweep,
)
from retrieval_heads.tables import format_table

__all__ = [
    "RETRIEVAL_THRESHOLD",
    "PAPER_BINS",
    "CONTEXT_KEYS",
    "score_table",
    "sparsity",
    "Histogram",
    "histogram",
    "rank_with_ties",
    "pearson",
    "spearman",
    "jaccard_top_k",
    "Agreement",
    "agreement",
    "active_trials",
    "activation_frequency",
    "always_on_heads",
    "ContextRow",
    "activating_contexts",
    "UniversalRow",
    "universal_table",
    "format_table",
    "summary_table",
    "KSweepRow",
    "summarise_k_sweep",
    "k_sweep",
    "k_sweep_cells",
    "format_k_sweep",
    "KVPoint",
    "kv_curve",
    "format_kv_curve",
    "smallest_sufficient_k",
    "baseline_accuracy",
    "is_sufficient",
]

RETRIEVAL_THRESHOLD = 0.1
"""A head is a retrieval head when its score (mean over passing trials) is above this."""

PAPER_BINS = ("0", "(0, 0.1]", "(0.1, 0.5]", "> 0.5")
"""The score bins of the paper's histogram: exactly 0, then (0, 0.1], (0.1, 0.5], above 0.5."""


# ---------------------------------------------------------------------------------------------
# tables and sparsity


def score_table(
    scores: HeadScores | np.ndarray | Sequence, stat: str = "mean"
) -> Float[np.ndarray, "layer head"]:
    """A ``[layer, head]`` float array: ``stat`` of a :class:`HeadScores`, or the array itself."""
    if isinstance(scores, HeadScores):
        return scores.as_array(stat)
    table = np.asarray(scores, dtype=np.float64)
    if table.ndim != 2:
        raise ValueError(f"a score table is [layer, head], got shape {table.shape}")
    return table


def _valid(table: np.ndarray) -> np.ndarray:
    return table[~np.isnan(table)]


def sparsity(scores: HeadScores | np.ndarray, threshold: float = RETRIEVAL_THRESHOLD) -> float:
    """Share of heads (with a score) whose score is strictly above ``threshold``."""
    values = _valid(score_table(scores))
    if values.size == 0:
        return float("nan")
    return float((values > threshold).mean())


@dataclass(frozen=True)
class Histogram:
    """Counts and shares of heads in the paper's bins (``labels``)."""

    labels: tuple[str, ...]
    counts: tuple[int, ...]
    shares: tuple[float, ...]
    total: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "labels": list(self.labels),
            "counts": list(self.counts),
            "shares": list(self.shares),
            "total": self.total,
        }


def histogram(
    scores: HeadScores | np.ndarray, edges: tuple[float, float] = (0.1, 0.5)
) -> Histogram:
    """Heads per bin: ``== 0``, ``(0, e0]``, ``(e0, e1]``, ``> e1`` (the paper: e = 0.1, 0.5).

    Heads without a score are not counted. Negative scores (possible for some score variants)
    raise ``ValueError``: the paper's bins do not cover them.
    """
    low, high = edges
    values = _valid(score_table(scores))
    if (values < 0).any():
        raise ValueError("the paper's bins cover scores >= 0; this table has negative scores")
    counts = (
        int((values == 0).sum()),
        int(((values > 0) & (values <= low)).sum()),
        int(((values > low) & (values <= high)).sum()),
        int((values > high).sum()),
    )
    total = int(values.size)
    shares = tuple(c / total if total else float("nan") for c in counts)
    labels = ("0", f"(0, {low:g}]", f"({low:g}, {high:g}]", f"> {high:g}")
    return Histogram(labels, counts, shares, total)


# ---------------------------------------------------------------------------------------------
# agreement


def rank_with_ties(x: np.ndarray | Sequence[float]) -> np.ndarray:
    """Ranks 1..n, tied values sharing the average of their ranks (as ``scipy.stats.rankdata``)."""
    x = np.asarray(x, dtype=np.float64).ravel()
    n = x.size
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    # start of each run of equal values
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], n]
    average = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.repeat(average, ends - starts)
    return ranks


def _paired(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    ta, tb = score_table(a), score_table(b)
    if ta.shape != tb.shape:
        raise ValueError(f"score tables differ in shape: {ta.shape} vs {tb.shape}")
    keep = ~(np.isnan(ta) | np.isnan(tb))
    return ta[keep], tb[keep]


def _corr(x: np.ndarray, y: np.ndarray) -> float:
    if x.size < 2:
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(dx @ dx) * float(dy @ dy))
    if denom == 0:
        return float("nan")  # a constant table: correlation undefined
    return float(np.clip((dx @ dy) / denom, -1.0, 1.0))


def pearson(a: HeadScores | np.ndarray, b: HeadScores | np.ndarray) -> float:
    """Pearson correlation over heads scored in both (NaN if either table is constant)."""
    return _corr(*_paired(a, b))


def spearman(a: HeadScores | np.ndarray, b: HeadScores | np.ndarray) -> float:
    """Spearman correlation: Pearson of average ranks (ties share ranks)."""
    x, y = _paired(a, b)
    return _corr(rank_with_ties(x), rank_with_ties(y))


def _top_k_heads(scores: HeadScores | np.ndarray, k: int) -> list[Head]:
    """The ``k`` best-scored heads, best first; ties broken by (layer, head), NaN never chosen."""
    if k < 0:
        raise ValueError("k must be >= 0")
    table = score_table(scores)
    flat = np.where(np.isnan(table), -np.inf, table).ravel()
    order = np.argsort(-flat, kind="stable")
    n_valid = int((~np.isnan(table)).sum())
    n_heads = table.shape[1]
    return [Head(int(i // n_heads), int(i % n_heads)) for i in order[: min(k, n_valid)]]


def jaccard_top_k(a: HeadScores | np.ndarray, b: HeadScores | np.ndarray, k: int = 20) -> float:
    """|A ∩ B| / |A ∪ B| of the two top-k head sets (tables of one shape)."""
    if score_table(a).shape != score_table(b).shape:
        raise ValueError("score tables differ in shape")
    sa, sb = set(_top_k_heads(a, k)), set(_top_k_heads(b, k))
    union = sa | sb
    return len(sa & sb) / len(union) if union else float("nan")


@dataclass(frozen=True)
class Agreement:
    pearson: float
    spearman: float
    jaccard: float
    k: int
    n_heads: int
    shared_top: tuple[Head, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "pearson": self.pearson,
            "spearman": self.spearman,
            "jaccard": self.jaccard,
            "k": self.k,
            "n_heads": self.n_heads,
            "shared_top": [h.dotted for h in self.shared_top],
        }


def agreement(a: HeadScores | np.ndarray, b: HeadScores | np.ndarray, k: int = 20) -> Agreement:
    """Pearson, Spearman and top-k Jaccard between two score tables of the same shape."""
    x, _ = _paired(a, b)
    top_a, top_b = _top_k_heads(a, k), set(_top_k_heads(b, k))
    return Agreement(
        pearson=pearson(a, b),
        spearman=spearman(a, b),
        jaccard=jaccard_top_k(a, b, k),
        k=k,
        n_heads=int(x.size),
        shared_top=tuple(h for h in top_a if h in top_b),
    )


# ---------------------------------------------------------------------------------------------
# tables across models


@dataclass(frozen=True)
class UniversalRow:
    model: str
    n_layers: int
    n_heads: int
    n_scored: int  # heads with a score
    n_retrieval: int  # heads above the threshold
    share: float
    max_score: float
    n_trials: int  # passing trials behind the scores
    top: tuple[tuple[Head, float], ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_scored": self.n_scored,
            "n_retrieval": self.n_retrieval,
            "share": self.share,
            "max_score": self.max_score,
            "n_trials": self.n_trials,
            "top": [[h.dotted, s] for h, s in self.top],
        }


def universal_table(
    models: Mapping[str, HeadScores],
    threshold: float = RETRIEVAL_THRESHOLD,
    top: int = 5,
) -> list[UniversalRow]:
    """One row per model: heads scored, retrieval heads (> threshold), their share, top heads."""
    rows = []
    for name, scores in models.items():
        values = _valid(scores.mean)
        ranking = scores.ranking()
        rows.append(
            UniversalRow(
                model=name,
                n_layers=scores.n_layers,
                n_heads=scores.n_heads,
                n_scored=int(values.size),
                n_retrieval=int((values > threshold).sum()),
                share=float((values > threshold).mean()) if values.size else float("nan"),
                max_score=float(values.max()) if values.size else float("nan"),
                n_trials=scores.n_passed,
                top=tuple(ranking[:top]),
            )
        )
    return rows


def summary_table(
    models: Mapping[str, HeadScores],
    threshold: float = RETRIEVAL_THRESHOLD,
    top: int = 3,
) -> str:
    """The paper-style summary: per model its shape, trials, retrieval heads, bins, top heads."""
    headers = [
        "model",
        "layers x heads",
        "trials",
        f"> {threshold:g}",
        "share",
        "max",
        *PAPER_BINS,
        f"top {top}",
    ]
    rows = []
    for row in universal_table(models, threshold, top):
        hist = histogram(models[row.model])
        rows.append(
            [
                row.model,
                f"{row.n_layers} x {row.n_heads}",
                row.n_trials,
                row.n_retrieval,
                f"{100 * row.share:.1f}%",
                row.max_score,
                *hist.counts,
                ", ".join(f"{h.dotted} ({s:.2f})" for h, s in row.top),
            ]
        )
    return format_table(rows, headers, precision=2)


# ---------------------------------------------------------------------------------------------
# deprecated


def k_sweep(records: Iterable[TrialRecord]) -> list[KSweepRow]:
    """Deprecated alias of :func:`summarise_k_sweep` (``causal.k_sweep`` runs a sweep)."""
    warnings.warn(
        "retrieval_heads.analysis.k_sweep is deprecated: use analysis.summarise_k_sweep "
        "(rh.summarise_k_sweep); rh.k_sweep / causal.k_sweep runs a sweep",
        DeprecationWarning,
        stacklevel=2,
    )
    return summarise_k_sweep(records)
