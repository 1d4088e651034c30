"""Analyses of head scores and trial records: pure functions, no model (numpy only).

- sparsity: the share of heads above the retrieval threshold (0.1) and the paper's histogram
  bins ``0``, ``(0, 0.1]``, ``(0.1, 0.5]``, ``> 0.5``;
- agreement of two score tables of one shape: Pearson, Spearman (average ranks for ties), and
  the Jaccard index of the top-k head sets;
- activation frequency from copy events: per head the share of trials in which it copied at
  least once, the always-on heads, and the contexts (length, depth, needle) activating the rest;
- tables across models ("universal" table, a paper-style fixed-width summary);
- K-sweep summaries of ablation runs: accuracy and recall per K and selection, over draws.

Inputs are :class:`~retrieval_heads.scores.HeadScores` or plain ``[layer, head]`` arrays;
heads without a score (NaN) are left out of every count and statistic.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from retrieval_heads.conditions import HeadAblation, KVWindow
from retrieval_heads.heads import Head
from retrieval_heads.records import TrialRecord
from retrieval_heads.scores import HeadScores

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

CONTEXT_KEYS: dict[str, tuple[str, ...]] = {
    "length": ("context_length", "length"),
    "depth": ("depth_percent", "depth"),
    "needle": ("needle_id", "needle"),
}
"""For each context dimension, the trial ``params`` keys that may hold it (first found wins)."""


# ---------------------------------------------------------------------------------------------
# tables and sparsity


def score_table(scores: HeadScores | np.ndarray | Sequence, stat: str = "mean") -> np.ndarray:
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
# activation frequency


def _shape_of(records: Sequence[TrialRecord]) -> tuple[int, int]:
    shapes = {(r.n_layers, r.n_heads) for r in records}
    if len(shapes) != 1:
        raise ValueError(f"records disagree on the model's shape: {sorted(shapes)}")
    return shapes.pop()


def _select(records: Iterable[TrialRecord], passing_only: bool) -> list[TrialRecord]:
    chosen = [r for r in records if r.passed or not passing_only]
    if not chosen:
        raise ValueError("no trials to analyse" + (" (none passed)" if passing_only else ""))
    return chosen


def active_trials(
    records: Iterable[TrialRecord], *, passing_only: bool = True, from_scores: bool = False
) -> tuple[list[TrialRecord], np.ndarray]:
    """``(trials, active)``: ``active[t, layer, head]`` is True when the head made at least one
    copy event in trial ``t`` (with ``from_scores``: when its retrieval score is above 0)."""
    chosen = _select(records, passing_only)
    n_layers, n_heads = _shape_of(chosen)
    active = np.zeros((len(chosen), n_layers, n_heads), dtype=bool)
    for t, record in enumerate(chosen):
        if from_scores:
            active[t] = record.score_array("retrieval") > 0
        elif record.copy_events:
            events = np.asarray(record.copy_events, dtype=np.int64)
            active[t, events[:, 1], events[:, 2]] = True
    return chosen, active


def activation_frequency(
    records: Iterable[TrialRecord], *, passing_only: bool = True, from_scores: bool = False
) -> np.ndarray:
    """Per head, the share of trials (passing ones by default) with at least one copy event."""
    _, active = active_trials(records, passing_only=passing_only, from_scores=from_scores)
    return active.mean(axis=0)


def always_on_heads(records: Iterable[TrialRecord], *, from_scores: bool = False) -> list[Head]:
    """Heads that copied in every passing trial, in (layer, head) order."""
    freq = activation_frequency(records, passing_only=True, from_scores=from_scores)
    return [Head(int(layer), int(head)) for layer, head in np.argwhere(freq == 1.0)]


def _context_value(value: Any) -> Any:
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return value


def _sort_key(value: Any) -> tuple:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def _resolve_keys(
    records: Sequence[TrialRecord], keys: Mapping[str, str | Sequence[str]] | None
) -> dict[str, str]:
    wanted = CONTEXT_KEYS if keys is None else keys
    resolved: dict[str, str] = {}
    for name, aliases in wanted.items():
        candidates = (aliases,) if isinstance(aliases, str) else tuple(aliases)
        for alias in candidates:
            if any(alias in r.params for r in records):
                resolved[name] = alias
                break
    return resolved


@dataclass(frozen=True)
class ContextRow:
    """How often ``head`` copied in the trials whose ``params[key] == value``."""

    head: Head
    context: str  # the dimension: "length", "depth", "needle"
    key: str  # the params key it was read from
    value: Any
    n_active: int
    n_trials: int
    frequency: float  # of the head over all the trials analysed

    @property
    def share(self) -> float:
        return self.n_active / self.n_trials if self.n_trials else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "head": self.head.dotted,
            "context": self.context,
            "key": self.key,
            "value": self.value,
            "n_active": self.n_active,
            "n_trials": self.n_trials,
            "share": self.share,
            "frequency": self.frequency,
        }


def activating_contexts(
    records: Iterable[TrialRecord],
    heads: Iterable[Head | str] | None = None,
    *,
    keys: Mapping[str, str | Sequence[str]] | None = None,
    passing_only: bool = True,
    from_scores: bool = False,
) -> list[ContextRow]:
    """Which contexts activate each head that is neither silent nor always on.

    One row per (head, context dimension, value): in how many of the trials with that value
    the head copied. ``keys`` maps a dimension name to the ``params`` key(s) holding it (default
    :data:`CONTEXT_KEYS`; dimensions no record has are skipped). ``heads`` defaults to every head
    active in some but not all trials, most frequent first.
    """
    chosen, active = active_trials(records, passing_only=passing_only, from_scores=from_scores)
    freq = active.mean(axis=0)
    if heads is None:
        flat = freq.ravel()
        order = np.argsort(-flat, kind="stable")
        n_heads = freq.shape[1]
        selected = [Head(int(i // n_heads), int(i % n_heads)) for i in order if 0 < flat[i] < 1.0]
    else:
        selected = [Head.parse(h).check(*freq.shape) for h in heads]
    resolved = _resolve_keys(chosen, keys)
    rows: list[ContextRow] = []
    for name, key in resolved.items():
        groups: dict[Any, list[int]] = defaultdict(list)
        for t, record in enumerate(chosen):
            if key in record.params:
                groups[_context_value(record.params[key])].append(t)
        for value in sorted(groups, key=_sort_key):
            idx = np.asarray(groups[value])
            sub = active[idx]
            for h in selected:
                rows.append(
                    ContextRow(
                        head=h,
                        context=name,
                        key=key,
                        value=value,
                        n_active=int(sub[:, h.layer, h.head].sum()),
                        n_trials=len(idx),
                        frequency=float(freq[h.layer, h.head]),
                    )
                )
    head_rank = {h: i for i, h in enumerate(selected)}
    dim_rank = {name: i for i, name in enumerate(resolved)}
    rows.sort(key=lambda r: (head_rank[r.head], dim_rank[r.context]))  # stable: values stay sorted
    return rows


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


def _cell(value: Any, precision: int) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{precision}f}"
    return str(value)


def format_table(
    rows: Sequence[Sequence[Any]], headers: Sequence[str], *, precision: int = 3
) -> str:
    """A fixed-width text table: numbers right-aligned, text left-aligned, floats rounded."""
    cells = [[_cell(v, precision) for v in row] for row in rows]
    for row in cells:
        if len(row) != len(headers):
            raise ValueError(f"row {row} has {len(row)} cells for {len(headers)} headers")
    numeric = [
        all(
            isinstance(row[i], (int, float, np.integer, np.floating))
            and not isinstance(row[i], bool)
            for row in rows
        )
        and bool(rows)
        for i in range(len(headers))
    ]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    out = [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(row) for row in cells]
    return "\n".join(out) + "\n"


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
# K sweeps


@dataclass(frozen=True)
class KSweepRow:
    """Ablating ``k`` heads chosen by ``selection``: accuracy and recall, mean ± std over draws.

    ``std`` is the sample standard deviation over draws (ddof=1), 0.0 for a single draw.
    """

    k: int
    selection: str
    n_draws: int
    n_trials: int
    accuracy: float
    accuracy_std: float
    recall: float
    recall_std: float
    per_draw: tuple[tuple[Any, float, float], ...] = field(default=())  # (draw, acc, recall)

    def to_dict(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "selection": self.selection,
            "n_draws": self.n_draws,
            "n_trials": self.n_trials,
            "accuracy": self.accuracy,
            "accuracy_std": self.accuracy_std,
            "recall": self.recall,
            "recall_std": self.recall_std,
            "per_draw": [list(d) for d in self.per_draw],
        }


def _std(values: Sequence[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def summarise_k_sweep(records: Iterable[TrialRecord]) -> list[KSweepRow]:
    """Summarise ablation records by their condition's ``(k, selection, draw)``.

    The records of a K-sweep (:func:`retrieval_heads.causal.k_sweep` runs one), of the
    embedded model's controls or of the chain-of-thought run: each carries a
    :class:`~retrieval_heads.conditions.HeadAblation`. Accuracy is the share of passing trials,
    recall the mean recall, first per draw, then mean ± std over draws. A record without a
    condition (a detection of the unchanged model) counts as the baseline (``k=0``, selection
    ``"none"``, draw 0). Rows are sorted by ``k``, then selection.
    """
    groups: dict[tuple[int, str], dict[Any, list[TrialRecord]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for record in records:
        c = record.condition
        if isinstance(c, HeadAblation):
            groups[(c.k, c.selection)][c.draw].append(record)
        elif c is None:
            groups[(0, "none")][0].append(record)
        else:
            raise ValueError(
                f"record {record.trial_id} ran under a {c.TYPE} condition, not a head ablation: "
                "summarise KV-cache records with kv_curve"
            )
    rows = []
    for (k, selection), draws in sorted(groups.items()):
        per_draw = []
        for draw in sorted(draws, key=_sort_key):
            batch = draws[draw]
            per_draw.append(
                (
                    draw,
                    float(np.mean([r.passed for r in batch])),
                    float(np.mean([r.recall for r in batch])),
                )
            )
        acc = [d[1] for d in per_draw]
        rec = [d[2] for d in per_draw]
        rows.append(
            KSweepRow(
                k=k,
                selection=selection,
                n_draws=len(per_draw),
                n_trials=sum(len(b) for b in draws.values()),
                accuracy=float(np.mean(acc)),
                accuracy_std=_std(acc),
                recall=float(np.mean(rec)),
                recall_std=_std(rec),
                per_draw=tuple(per_draw),
            )
        )
    return rows


def k_sweep(records: Iterable[TrialRecord]) -> list[KSweepRow]:
    """Deprecated alias of :func:`summarise_k_sweep` (``causal.k_sweep`` runs a sweep)."""
    warnings.warn(
        "retrieval_heads.analysis.summarise_k_sweep is deprecated: use analysis.summarise_k_sweep "
        "(rh.summarise_k_sweep); rh.k_sweep / causal.k_sweep runs a sweep",
        DeprecationWarning,
        stacklevel=2,
    )
    return summarise_k_sweep(records)


def k_sweep_cells(row: KSweepRow) -> list[Any]:
    """A K-sweep row's cells, as every K-sweep table shows them: K, selection, draws, trials,
    then accuracy and recall as ``"mean ± std"`` over draws (3 decimals). Tables that group
    rows (per task, per kind of question) put their own columns in front."""
    return [
        row.k,
        row.selection,
        row.n_draws,
        row.n_trials,
        f"{row.accuracy:.3f} ± {row.accuracy_std:.3f}",
        f"{row.recall:.3f} ± {row.recall_std:.3f}",
    ]


def format_k_sweep(rows: Sequence[KSweepRow]) -> str:
    """The K-sweep as a fixed-width table: K, selection, draws, trials, accuracy, recall."""
    body = [k_sweep_cells(r) for r in rows]
    return format_table(body, ["K", "selection", "draws", "trials", "accuracy", "recall"])


# ---------------------------------------------------------------------------------------------
# KV-cache what-if (records of retrieval_heads.kvcache.simulate)


@dataclass(frozen=True)
class KVPoint:
    """One point of an accuracy-vs-KV-share curve: ``selection`` with ``k`` full KV heads and
    a ``window``-token window (``None`` for the uncompressed baseline).

    ``kv_share`` is the mean over the trials of the share of the cache kept; accuracy is the
    share of passing trials, per draw, then mean ± std over draws (ddof=1; 0.0 for one draw).
    """

    selection: str
    k: int
    sink: int | None
    window: int | None
    kv_share: float
    n_draws: int
    n_trials: int
    accuracy: float
    accuracy_std: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def kv_curve(records: Iterable[TrialRecord]) -> list[KVPoint]:
    """Summarise KV-cache simulation records (their :class:`~retrieval_heads.conditions.KVWindow`
    and ``params["kv_share"]``) into curve points, sorted by selection (baseline, top, random,
    uniform) and share."""
    groups: dict[tuple, dict[Any, list[TrialRecord]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        c = record.condition
        if not isinstance(c, KVWindow) or "kv_share" not in record.params:
            raise ValueError(
                f"record {record.trial_id} has no KV-window condition: not a kv-sim record "
                "(retrieval_heads.kvcache.simulate writes them)"
            )
        groups[(c.selection, c.k, c.sink, c.window)][c.draw].append(record)
    order = {"none": 0, "top": 1, "random": 2, "uniform": 3}
    points = []
    for (selection, k, sink, window), draws in groups.items():
        batches = [draws[d] for d in sorted(draws)]
        accuracy = [float(np.mean([r.passed for r in b])) for b in batches]
        every = [r for b in batches for r in b]
        points.append(
            KVPoint(
                selection=selection,
                k=k,
                sink=sink,
                window=window,
                kv_share=float(np.mean([r.params["kv_share"] for r in every])),
                n_draws=len(batches),
                n_trials=len(every),
                accuracy=float(np.mean(accuracy)),
                accuracy_std=_std(accuracy),
            )
        )
    return sorted(points, key=lambda p: (order.get(p.selection, 9), p.kv_share, p.k))


def format_kv_curve(points: Sequence[KVPoint]) -> str:
    """The curve as a fixed-width table."""
    body = [
        [
            p.selection,
            p.k,
            "-" if p.window is None else f"{p.sink}+{p.window}",
            f"{p.kv_share:.3f}",
            p.n_draws,
            p.n_trials,
            f"{p.accuracy:.3f} ± {p.accuracy_std:.3f}",
        ]
        for p in points
    ]
    headers = [
        "selection",
        "full KV heads",
        "sink+window",
        "KV share",
        "draws",
        "trials",
        "accuracy",
    ]
    return format_table(body, headers)


def baseline_accuracy(points: Sequence[KVPoint]) -> float:
    """The uncompressed cache's accuracy (the curve's ``selection == "none"`` point)."""
    base = [p for p in points if p.selection == "none"]
    if not base:
        raise ValueError("the curve needs the uncompressed baseline")
    return base[0].accuracy


def is_sufficient(point: KVPoint, points: Sequence[KVPoint], tolerance: float = 0.05) -> bool:
    """Whether ``point`` keeps accuracy within ``tolerance`` of the uncompressed baseline's."""
    return point.accuracy >= baseline_accuracy(points) - tolerance


def smallest_sufficient_k(points: Sequence[KVPoint], tolerance: float = 0.05) -> KVPoint:
    """The top-K point with the fewest full KV heads that :func:`is_sufficient` (the largest K
    measured when none is: check it with :func:`is_sufficient`)."""
    tops = sorted((p for p in points if p.selection == "top"), key=lambda p: p.k)
    if not tops or not any(p.selection == "none" for p in points):
        raise ValueError("the curve needs the uncompressed baseline and top-K points")
    good = [p for p in tops if is_sufficient(p, points, tolerance)]
    return good[0] if good else tops[-1]
