"""What every figure shares: the colours, the plotly layout, the title, and turning a score
table into heatmap cells (NaN as a gap, value labels, ``"L.H"`` names).

It draws no figure and computes no score; the figure modules build on it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from retrieval_heads.scores import HeadScores
from retrieval_heads.views._html import esc

NIAH_COLORSCALE = [[0.0, "#F0496E"], [0.5, "#EBB839"], [1.0, "#0CD79F"]]
"""Red (0) - yellow - green (1), the colours of the needle-in-a-haystack plots."""

SCORE_COLORSCALE = "Blues"
FREQ_COLORSCALE = "Purples"
_MISSING_BG = "#e4e4e4"  # cells without a value show the plot background
_SELECTION_COLORS = {"top": "#d62728", "random": "#1f77b4", "bottom": "#2ca02c"}
_PALETTE = ("#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#ff7f0e")
_CLASS_COLORS = {
    "correct": "#0CD79F",
    "partial": "#EBB839",
    "distractor": "#9467bd",
    "in_context": "#1f77b4",
    "not_in_context": "#F0496E",
    "empty": "#7f7f7f",
}
ANSWER_CLASS_KEYS = ("answer_class", "failure_class", "failure", "outcome", "hallucination")
"""``TrialRecord.params`` keys that may hold an answer class (the first present is used)."""

_LAYOUT: dict[str, Any] = dict(template="plotly_white", margin=dict(l=60, r=30, t=70, b=55))


def _title(text: str, subtitle: str | None = None) -> dict[str, Any]:
    """A left-aligned title; ``text`` is plain (escaped here), ``subtitle`` already markup."""
    markup = esc(text) + (f"<br><sup>{subtitle}</sup>" if subtitle else "")
    return dict(text=markup, x=0.01, xanchor="left")


def _table_and_scores(scores: HeadScores | np.ndarray, stat: str) -> tuple[np.ndarray, Any]:
    if isinstance(scores, HeadScores):
        return scores.as_array(stat), scores
    table = np.asarray(scores, dtype=np.float64)
    if table.ndim != 2:
        raise ValueError(f"a score table is [layer, head], got shape {table.shape}")
    return table, None


def _head_grid(n_layers: int, n_heads: int) -> np.ndarray:
    return np.array([[f"{layer}.{h}" for h in range(n_heads)] for layer in range(n_layers)])


def _z(table: np.ndarray) -> list:
    """A 2-D array for plotly with NaN as None (a gap)."""
    return [[None if not math.isfinite(x) else float(x) for x in row] for row in table]


def _cell_text(table: np.ndarray, digits: int = 2, blank_zero: bool = False) -> list:
    def one(x: float) -> str:
        if not math.isfinite(x) or (blank_zero and x == 0):
            return ""
        return f"{x:.{digits}f}"

    return [[one(x) for x in row] for row in table]
