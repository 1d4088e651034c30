"""Figures of trial records grouped by condition: the needle-in-a-haystack grid (depth x context
length, side by side panels) and the shares of answer classes per condition.

It computes no score and reads no file: it counts the records it is given.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from retrieval_heads import analysis
from retrieval_heads.records import TrialRecord
from retrieval_heads.views._fig_base import (
    _CLASS_COLORS,
    _LAYOUT,
    _MISSING_BG,
    _PALETTE,
    ANSWER_CLASS_KEYS,
    NIAH_COLORSCALE,
    _cell_text,
    _title,
    _z,
)
from retrieval_heads.views._html import esc, fmt_int

# ---------------------------------------------------------------------------------------------
# needle in a haystack


def _resolve(records: Sequence[TrialRecord], aliases: Sequence[str], given: str | None) -> str:
    candidates = (given,) if given else tuple(aliases)
    for key in candidates:
        if any(key in r.params for r in records):
            return key
    raise ValueError(f"no record has any of the params {list(candidates)}")


def _sort_values(values: Iterable[Any]) -> list[Any]:
    def key(v: Any) -> tuple:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return (0, float(v), "")
        return (1, 0.0, str(v))

    return sorted(set(values), key=key)


def _fmt_value(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, int) and not isinstance(v, bool):
        return fmt_int(v)
    return esc(v)


def niah_grid(
    records: Sequence[TrialRecord],
    *,
    metric: str = "accuracy",
    lengths: Sequence[Any] | None = None,
    depths: Sequence[Any] | None = None,
    length_key: str | None = None,
    depth_key: str | None = None,
) -> tuple[list[Any], list[Any], np.ndarray, np.ndarray]:
    """``(lengths, depths, values[depth, length], counts[depth, length])`` of one set of trials.

    ``metric`` ``"accuracy"`` (share of passing trials) or ``"recall"`` (mean ROUGE recall);
    the keys default to :data:`analysis.CONTEXT_KEYS` (``context_length``/``length``,
    ``depth_percent``/``depth``). Empty cells are NaN with count 0.
    """
    if metric not in ("accuracy", "recall"):
        raise ValueError(f"metric must be 'accuracy' or 'recall', got {metric!r}")
    lkey = _resolve(records, analysis.CONTEXT_KEYS["length"], length_key)
    dkey = _resolve(records, analysis.CONTEXT_KEYS["depth"], depth_key)
    usable = [r for r in records if lkey in r.params and dkey in r.params]
    xs = list(lengths) if lengths is not None else _sort_values(r.params[lkey] for r in usable)
    ys = list(depths) if depths is not None else _sort_values(r.params[dkey] for r in usable)
    xi, yi = {v: i for i, v in enumerate(xs)}, {v: i for i, v in enumerate(ys)}
    sums = np.zeros((len(ys), len(xs)))
    counts = np.zeros((len(ys), len(xs)), dtype=np.int64)
    for r in usable:
        x, y = r.params[lkey], r.params[dkey]
        if x in xi and y in yi:
            sums[yi[y], xi[x]] += float(r.passed) if metric == "accuracy" else float(r.recall)
            counts[yi[y], xi[x]] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        values = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return xs, ys, values, counts


def niah_heatmap(
    records: Sequence[TrialRecord] | Mapping[str, Sequence[TrialRecord]],
    *,
    metric: str = "accuracy",
    title: str | None = None,
    length_key: str | None = None,
    depth_key: str | None = None,
) -> go.Figure:
    """Needle-in-a-haystack grid: depth (rows, 0% on top) x context length, red-yellow-green.

    ``records`` is one set of trials, or ``{panel: trials}`` (e.g. ``{"baseline": ...,
    "top-20 ablated": ...}``) drawn side by side on one shared axis grid and colour scale.
    Each cell shows the accuracy (``metric="accuracy"``) or the mean ROUGE recall
    (``"recall"``) of its trials; hover adds the trial count.
    """
    panels = dict(records) if isinstance(records, Mapping) else {"": list(records)}
    panels = {k: list(v) for k, v in panels.items() if len(v)}
    if not panels:
        raise ValueError("no trials to draw")
    everything = [r for v in panels.values() for r in v]
    lkey = _resolve(everything, analysis.CONTEXT_KEYS["length"], length_key)
    dkey = _resolve(everything, analysis.CONTEXT_KEYS["depth"], depth_key)
    xs = _sort_values(r.params[lkey] for r in everything if lkey in r.params)
    ys = _sort_values(r.params[dkey] for r in everything if dkey in r.params)
    n = len(panels)
    names = [esc(k) for k in panels]
    fig = make_subplots(
        rows=1,
        cols=n,
        shared_yaxes=True,
        horizontal_spacing=0.04 if n > 1 else 0.0,
        subplot_titles=names if any(names) else None,
    )
    label = "accuracy" if metric == "accuracy" else "ROUGE recall"
    x_labels = [_fmt_value(v) for v in xs]
    y_labels = [f"{_fmt_value(v)}%" for v in ys]
    for col, (name, trials) in enumerate(panels.items(), start=1):
        _, _, values, counts = niah_grid(
            trials, metric=metric, lengths=xs, depths=ys, length_key=lkey, depth_key=dkey
        )
        custom = [[[fmt_int(c)] for c in row] for row in counts]
        fig.add_trace(
            go.Heatmap(
                z=_z(values),
                x=x_labels,
                y=y_labels,
                customdata=custom,
                zmin=0.0,
                zmax=1.0,
                colorscale=NIAH_COLORSCALE,
                showscale=col == n,
                colorbar=dict(title=dict(text=label)),
                xgap=1,
                ygap=1,
                text=_cell_text(values),
                texttemplate="%{text}",
                textfont=dict(size=10),
                name=esc(name),
                hovertemplate=(
                    f"{esc(name) + '<br>' if name else ''}context length %{{x}}<br>"
                    f"depth %{{y}}<br>{label} %{{z:.3f}}<br>trials %{{customdata[0]}}"
                    "<extra></extra>"
                ),
            ),
            row=1,
            col=col,
        )
        fig.update_xaxes(title_text="context length (tokens)", type="category", row=1, col=col)
    fig.update_yaxes(title_text="needle depth", type="category", autorange="reversed", col=1)
    fig.update_yaxes(type="category", autorange="reversed")
    default = f"Needle in a haystack: {label}"
    fig.update_layout(
        **_LAYOUT,
        title=_title(title or default),
        height=max(340, min(800, 140 + 28 * len(ys))),
        plot_bgcolor=_MISSING_BG,
    )
    return fig


# ---------------------------------------------------------------------------------------------
# answer classes


def answer_class_key(records: Iterable[TrialRecord]) -> str | None:
    """The first of :data:`ANSWER_CLASS_KEYS` that some record's ``params`` carries."""
    records = list(records)
    for key in ANSWER_CLASS_KEYS:
        if any(key in r.params for r in records):
            return key
    return None


def answer_class_figure(
    groups: Mapping[str, Sequence[TrialRecord]],
    *,
    key: str | None = None,
    title: str | None = None,
) -> go.Figure:
    """Stacked shares of answer classes (``params[key]``: ``"correct"``, ``"partial"``,
    ``"distractor"``, ``"in_context"``, ``"not_in_context"``, ``"empty"``, or any other label)
    per condition, e.g. ``{"baseline": ..., "top K=20": ..., "random K=20": ...}``. Records
    without the key count as ``"correct"`` when they passed, else ``"unclassified"``."""
    groups = {k: list(v) for k, v in groups.items() if len(v)}
    if not groups:
        raise ValueError("no trials to draw")
    key = key or answer_class_key(r for v in groups.values() for r in v)
    if key is None:
        raise ValueError(f"no record carries an answer class (params {list(ANSWER_CLASS_KEYS)})")

    def cls(r: TrialRecord) -> str:
        if key in r.params and r.params[key] is not None:
            return str(r.params[key])
        return "correct" if r.passed else "unclassified"

    classes = _sort_values(cls(r) for v in groups.values() for r in v)
    order = [c for c in _CLASS_COLORS if c in classes] + [
        c for c in classes if c not in _CLASS_COLORS
    ]
    conditions = list(groups)
    fig = go.Figure()
    extra = iter(_PALETTE)
    for c in order:
        counts = [sum(cls(r) == c for r in groups[g]) for g in conditions]
        shares = [n / len(groups[g]) for n, g in zip(counts, conditions, strict=True)]
        fig.add_bar(
            x=[esc(g) for g in conditions],
            y=shares,
            name=esc(c),
            marker_color=_CLASS_COLORS.get(c) or next(extra, "#333333"),
            customdata=[[n, len(groups[g])] for n, g in zip(counts, conditions, strict=True)],
            hovertemplate=(
                f"{esc(c)}<br>%{{x}}<br>share %{{y:.3f}} "
                "(%{customdata[0]} of %{customdata[1]})<extra></extra>"
            ),
        )
    fig.update_layout(
        **_LAYOUT,
        barmode="stack",
        title=_title(title or "Answer classes per condition"),
        height=420,
        legend=dict(title=dict(text=esc(key))),
    )
    fig.update_xaxes(title_text="condition", type="category")
    fig.update_yaxes(title_text="share of trials", range=[0, 1])
    return fig
