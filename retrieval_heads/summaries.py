"""Summaries of sweep records, as rows and as the tables the command prints.

- K-sweeps (head ablations: records carrying a
  :class:`~retrieval_heads.conditions.HeadAblation`): accuracy and recall per K and selection,
  mean ± std over draws (``summarise_k_sweep`` -> ``KSweepRow``; ``k_sweep_cells``,
  ``format_k_sweep``);
- KV-cache curves (records of :func:`retrieval_heads.kvcache.simulate`, carrying a
  :class:`~retrieval_heads.conditions.KVWindow`): accuracy against the share of the cache kept
  (``kv_curve`` -> ``KVPoint``; ``format_kv_curve``), the uncompressed baseline and the
  smallest sufficient top-K (``baseline_accuracy``, ``is_sufficient``,
  ``smallest_sufficient_k``).

Pure functions, numpy only; every name is importable as before from
:mod:`retrieval_heads.analysis` (where the deprecated ``k_sweep`` alias stays).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from retrieval_heads.conditions import HeadAblation, KVWindow
from retrieval_heads.grading import FAILURE_KINDS, classify_failure
from retrieval_heads.records import TrialRecord
from retrieval_heads.tables import format_table, sort_key

__all__ = [
    "KSweepRow",
    "summarise_k_sweep",
    "k_sweep_cells",
    "format_k_sweep",
    "KVPoint",
    "kv_curve",
    "format_kv_curve",
    "smallest_sufficient_k",
    "baseline_accuracy",
    "is_sufficient",
    "answer_classes",
]


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
        for draw in sorted(draws, key=sort_key):
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


def answer_classes(
    records: Iterable[TrialRecord], *, by_draw: bool = False
) -> dict[str, dict[str, float]]:
    """Share of each answer class per condition: ``{"top k=6": {"correct": 0.1, ...}}``.

    Conditions are ``"<selection> k=<K>"`` (draws pooled; ``by_draw`` adds ``" draw=<d>"``),
    prefixed by ``"<task>: "`` when the records hold more than one task. Every class of
    :data:`~retrieval_heads.grading.FAILURE_KINDS` is listed (0.0 when absent); a record without
    ``answer_class`` is classified from its text.
    """
    records = list(records)
    tasks = {r.params.get("task", "niah") for r in records}
    counts: dict[str, dict[str, int]] = {}
    order: list[tuple] = []
    for r in records:
        p = r.params
        c = r.condition if isinstance(r.condition, HeadAblation) else None
        selection, k, draw = (c.selection, c.k, c.draw) if c else ("none", 0, 0)
        label = f"{selection} k={k}"
        if by_draw:
            label += f" draw={draw}"
        if len(tasks) > 1:
            label = f"{p.get('task', 'niah')}: {label}"
        cls = p.get("answer_class") or (
            "correct"
            if r.passed
            else classify_failure(
                r.generated_text, r.expected, stopped_by=r.params.get("stopped_by")
            )
        )
        if label not in counts:
            counts[label] = dict.fromkeys(FAILURE_KINDS, 0)
            order.append(
                (
                    p.get("task", "niah"),
                    k,
                    selection,
                    draw if by_draw else 0,
                    label,
                )
            )
        counts[label][cls] = counts[label].get(cls, 0) + 1
    out = {}
    for *_, label in sorted(order):
        total = sum(counts[label].values())
        out[label] = {c: n / total for c, n in counts[label].items()}
    return out
