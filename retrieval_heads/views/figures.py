"""Plotly figures of results: each function takes values and returns a ``go.Figure``.

Nothing here computes a score: the functions draw whatever :class:`HeadScores`,
:class:`TrialRecord`\\ s or :func:`~retrieval_heads.analysis.k_sweep` rows they are given.
Text that comes from results (model names, conditions, classes) is HTML-escaped before it goes
into a title, a label or a hover (plotly shows ``&lt;`` as ``<``, and never runs markup).

- :func:`score_heatmap` — layer x head retrieval scores (or per kv head, for GQA models);
- :func:`score_histogram` — heads per paper bin ``0``, ``(0, 0.1]``, ``(0.1, 0.5]``, ``> 0.5``;
- :func:`niah_heatmap` — needle-in-a-haystack grid, depth x context length, side by side panels;
- :func:`k_sweep_figure` — accuracy (or recall) against K, top-K vs random-K with bands;
- :func:`score_vs_effect` — retrieval score against a patching effect, per head;
- :func:`model_scatter` — one model's scores against another's, the heads that move labelled;
- :func:`activation_frequency_heatmap` — per head, the share of trials with a copy event;
- :func:`answer_class_figure` — shares of answer classes (hallucination analysis) per condition.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from retrieval_heads import analysis
from retrieval_heads.analysis import RETRIEVAL_THRESHOLD, KSweepRow, KVPoint
from retrieval_heads.heads import Head
from retrieval_heads.records import TrialRecord
from retrieval_heads.scores import HeadScores
from retrieval_heads.views._html import esc, fmt_float, fmt_int
from retrieval_heads.views._layers import LayerWindows, is_mixed, mark_layers, windows_summary

__all__ = [
    "NIAH_COLORSCALE",
    "SCORE_COLORSCALE",
    "ANSWER_CLASS_KEYS",
    "score_heatmap",
    "score_histogram",
    "niah_grid",
    "niah_heatmap",
    "k_sweep_figure",
    "score_vs_effect",
    "effect_heatmap",
    "model_scatter",
    "activation_frequency_heatmap",
    "answer_class_figure",
    "answer_class_key",
]

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

_LAYOUT = dict(template="plotly_white", margin=dict(l=60, r=30, t=70, b=55))


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


# ---------------------------------------------------------------------------------------------
# head scores


def _show_values(n_layers: int, n_cols: int) -> bool:
    """Cell values fit while cells stay at least ~20 px tall and ~35 px wide (up to 48 layers,
    32 columns: SmolLM2's 30 x 9 heads show theirs)."""
    return n_layers <= 48 and n_cols <= 32


def _with_windows(subtitle: str, windows: LayerWindows | None) -> str:
    """The subtitle, plus which layers are global when the layers' windows differ."""
    if not is_mixed(windows):
        return subtitle
    assert windows is not None
    marks = f"{esc(windows_summary(windows))} (global rows outlined)"
    return f"{subtitle}<br>{marks}" if subtitle else marks


def _layout_head_grid(
    fig: go.Figure,
    title: dict[str, Any],
    n_layers: int,
    n_cols: int,
    x_title: str = "head",
    layer_windows: LayerWindows | None = None,
) -> go.Figure:
    """Layers down (layer 0 on top), heads across: the layout every per-head heatmap shares.
    With ``layer_windows`` that differ per layer, each layer row says whether it is global."""
    top = 70 if not is_mixed(layer_windows) else 95  # room for the subtitle's second line
    fig.update_layout(
        **_LAYOUT,
        title=title,
        height=max(320, min(1100, top + 30 + 22 * n_layers)),
        plot_bgcolor=_MISSING_BG,
    )
    fig.update_layout(margin={**_LAYOUT["margin"], "t": top})
    fig.update_xaxes(title_text=x_title, showgrid=False, dtick=1 if n_cols <= 32 else None)
    fig.update_yaxes(
        title_text="layer",
        autorange="reversed",
        showgrid=False,
        dtick=1 if n_layers <= 48 else None,
    )
    return mark_layers(fig, layer_windows, n_cols)


def score_heatmap(
    scores: HeadScores | np.ndarray,
    *,
    title: str | None = None,
    stat: str = "mean",
    kv_heads: int | None = None,
    kv_how: str = "max",
    zmax: float | None = None,
    threshold: float = RETRIEVAL_THRESHOLD,
    show_values: bool | None = None,
    layer_windows: LayerWindows | None = None,
) -> go.Figure:
    """Layer x head heatmap of retrieval scores (layer 0 on top).

    Hover: the head ``"L.H"``, its score, the 95% bootstrap interval, the passing trials behind
    it and in how many of them it copied. ``kv_heads=n_kv_heads`` (GQA models) shows one cell per
    key/value head instead: :meth:`HeadScores.kv_heads` (``kv_how`` ``"max"`` or ``"mean"`` over
    the query heads reading it), the hover naming the query heads and the best one.
    ``zmax`` defaults to 1 (scores are shares), or the maximum where a variant exceeds 1.
    Cells are labelled with their value when ``show_values`` (default: while they fit, up to
    48 layers x 32 heads). ``layer_windows`` (per layer: a sliding window in tokens, or ``None``
    for global attention) marks the global layers when the layers differ.
    """
    table, hs = _table_and_scores(scores, stat)
    n_layers, n_heads = table.shape
    finite = table[np.isfinite(table)]
    if zmax is None:
        zmax = max(1.0, float(finite.max())) if finite.size else 1.0
    zmin = min(0.0, float(finite.min())) if finite.size else 0.0

    if kv_heads is not None and kv_heads != n_heads:
        if hs is None:
            raise ValueError("kv_heads needs a HeadScores (for the per-query-head statistics)")
        z = hs.kv_heads(kv_heads, how=kv_how, stat=stat)
        group = n_heads // kv_heads
        hover = []
        for layer in range(n_layers):
            row = []
            for kv in range(kv_heads):
                q = range(kv * group, (kv + 1) * group)
                vals = table[layer, kv * group : (kv + 1) * group]
                best = kv * group + int(np.nanargmax(np.where(np.isnan(vals), -np.inf, vals)))
                s = hs.stats(Head(layer, best))
                row.append(
                    [
                        f"{layer}.kv{kv}",
                        f"{q.start}-{q.stop - 1}",
                        f"{layer}.{best}",
                        fmt_float(s["mean"]),
                        f"[{fmt_float(s['ci_low'])}, {fmt_float(s['ci_high'])}]",
                        ", ".join(fmt_float(v, 2) for v in vals),
                    ]
                )
            hover.append(row)
        hovertemplate = (
            "kv head %{customdata[0]} (query heads %{customdata[1]})<br>"
            f"{esc(kv_how)} score %{{z:.3f}}<br>"
            "query heads: %{customdata[5]}<br>"
            "best: %{customdata[2]} = %{customdata[3]}, 95% CI %{customdata[4]}<extra></extra>"
        )
        x_title, n_cols = "kv head", kv_heads
        default_title = f"Retrieval score per kv head ({kv_how} over {group} query heads)"
    else:
        z = table
        labels = _head_grid(n_layers, n_heads)
        if hs is not None:
            lo, hi, n = hs.ci_low, hs.ci_high, hs.n
            passing = hs.values[hs.passed]
            nonzero = (np.nan_to_num(passing, nan=0.0) > 0).sum(axis=0)
            hover = [
                [
                    [
                        labels[layer, h],
                        f"[{fmt_float(lo[layer, h])}, {fmt_float(hi[layer, h])}]",
                        fmt_int(n[layer, h]),
                        fmt_int(nonzero[layer, h]),
                    ]
                    for h in range(n_heads)
                ]
                for layer in range(n_layers)
            ]
            hovertemplate = (
                "head %{customdata[0]}<br>score %{z:.3f}<br>95% CI %{customdata[1]}<br>"
                "passing trials %{customdata[2]}<br>copied in %{customdata[3]} of them"
                "<extra></extra>"
            )
        else:
            hover = [[[labels[layer, h]] for h in range(n_heads)] for layer in range(n_layers)]
            hovertemplate = "head %{customdata[0]}<br>score %{z:.3f}<extra></extra>"
        x_title, n_cols = "head", n_heads
        default_title = "Retrieval score per head"
    if show_values is None:
        show_values = _show_values(n_layers, n_cols)
    heatmap = go.Heatmap(
        z=_z(np.asarray(z)),
        x=list(range(n_cols)),
        y=list(range(n_layers)),
        customdata=hover,
        hovertemplate=hovertemplate,
        colorscale=SCORE_COLORSCALE,
        zmin=zmin,
        zmax=zmax,
        xgap=1,
        ygap=1,
        colorbar=dict(title=dict(text="score")),
        text=_cell_text(np.asarray(z), blank_zero=True) if show_values else None,
        texttemplate="%{text}" if show_values else None,
        textfont=dict(size=9),
    )
    fig = go.Figure(heatmap)
    shown = np.asarray(z, dtype=np.float64)
    shown = shown[np.isfinite(shown)]
    unit = "kv heads" if x_title == "kv head" else "heads"
    subtitle = f"{int((shown > threshold).sum())} of {shown.size} {unit} &gt; {threshold:g}"
    if hs is not None:
        subtitle += f"; {hs.n_passed} of {hs.n_total} trials passed"
    return _layout_head_grid(
        fig,
        _title(title or default_title, _with_windows(subtitle, layer_windows)),
        n_layers,
        n_cols,
        x_title=x_title,
        layer_windows=layer_windows,
    )


def score_histogram(
    scores: HeadScores | np.ndarray | Mapping[str, HeadScores | np.ndarray],
    *,
    title: str | None = None,
    log: bool = True,
    edges: tuple[float, float] = (0.1, 0.5),
) -> go.Figure:
    """Heads per paper bin (``0``, ``(0, 0.1]``, ``(0.1, 0.5]``, ``> 0.5``), log count axis.

    A mapping ``{name: scores}`` gives grouped bars, one colour per model. Bars are labelled
    with the count and the share of heads.
    """
    series = dict(scores) if isinstance(scores, Mapping) else {"": scores}
    fig = go.Figure()
    for i, (name, value) in enumerate(series.items()):
        hist = analysis.histogram(value, edges)
        fig.add_bar(
            x=[esc(label) for label in hist.labels],
            y=list(hist.counts),
            name=esc(name) or "heads",
            text=[
                f"{c} ({100 * s:.1f}%)" if c else ""
                for c, s in zip(hist.counts, hist.shares, strict=True)
            ],
            textposition="outside",
            cliponaxis=False,
            marker_color=_PALETTE[i % len(_PALETTE)] if len(series) > 1 else "#4a7fb5",
            hovertemplate="score %{x}<br>%{y} heads<extra>" + (esc(name) or "") + "</extra>",
        )
    total = analysis.histogram(next(iter(series.values())), edges).total
    subtitle = f"{total} heads" if len(series) == 1 else "heads per bin"
    fig.update_layout(
        **_LAYOUT,
        title=_title(title or "Distribution of retrieval scores", subtitle),
        barmode="group",
        height=380,
        showlegend=len(series) > 1,
    )
    fig.update_xaxes(title_text="retrieval score", type="category")
    fig.update_yaxes(title_text="heads" + (" (log scale)" if log else ""))
    if log:
        top = max((max(analysis.histogram(v, edges).counts) for v in series.values()), default=1)
        fig.update_yaxes(type="log", range=[math.log10(0.7), math.log10(max(top, 1) * 2.5)])
    return fig


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
# K sweep


def _hex_rgba(color: str, alpha: float) -> str:
    color = color.lstrip("#")
    r, g, b = (int(color[i : i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def k_sweep_figure(
    rows: Sequence[KSweepRow], *, metric: str = "accuracy", title: str | None = None
) -> go.Figure:
    """Accuracy (or ``metric="recall"``) against the number K of ablated heads.

    One line per selection (``"top"``, ``"random"``, ...) with a band of ±1 std over its draws
    and each draw as a faint dot; rows with K = 0 are the unablated baseline, drawn as a dashed
    line and joined to the start of every selection's line.
    """
    if metric not in ("accuracy", "recall"):
        raise ValueError(f"metric must be 'accuracy' or 'recall', got {metric!r}")
    col = 1 if metric == "accuracy" else 2
    label = "accuracy" if metric == "accuracy" else "ROUGE recall"
    base_rows = [r for r in rows if r.k == 0]
    baseline = None
    if base_rows:
        values = [d[col] for r in base_rows for d in r.per_draw] or [
            getattr(r, metric) for r in base_rows
        ]
        baseline = float(np.mean(values))
    by_sel: dict[str, list[KSweepRow]] = defaultdict(list)
    for r in rows:
        if r.k != 0:
            by_sel[r.selection].append(r)
    fig = go.Figure()
    if baseline is not None:
        fig.add_hline(
            y=baseline,
            line=dict(dash="dash", color="#555"),
            annotation_text=f"no ablation: {baseline:.2f}",
            annotation_position="bottom right",
        )
    extra = iter(_PALETTE)
    for sel in sorted(by_sel, key=lambda s: (s not in _SELECTION_COLORS, s)):
        series = sorted(by_sel[sel], key=lambda r: r.k)
        color = _SELECTION_COLORS.get(sel) or next(extra, "#333333")
        ks = [r.k for r in series]
        mean = [getattr(r, metric) for r in series]
        std = [getattr(r, f"{metric}_std") for r in series]
        draws = [r.n_draws for r in series]
        trials = [r.n_trials for r in series]
        if baseline is not None:
            ks, mean, std = [0, *ks], [baseline, *mean], [0.0, *std]
            draws = [len(base_rows), *draws]
            trials = [sum(r.n_trials for r in base_rows), *trials]
        name = esc(f"{sel}-K")
        if any(d > 1 for d in draws):
            upper = [min(1.0, m + s) for m, s in zip(mean, std, strict=True)]
            lower = [max(0.0, m - s) for m, s in zip(mean, std, strict=True)]
            fig.add_scatter(
                x=ks + ks[::-1],
                y=upper + lower[::-1],
                fill="toself",
                fillcolor=_hex_rgba(color, 0.18),
                line=dict(width=0),
                hoverinfo="skip",
                legendgroup=name,
                showlegend=False,
                name=f"{name} ±1 std",
            )
            px, py = [], []
            for r in series:
                if r.n_draws > 1:
                    px += [r.k] * len(r.per_draw)
                    py += [d[col] for d in r.per_draw]
            if px:
                fig.add_scatter(
                    x=px,
                    y=py,
                    mode="markers",
                    marker=dict(color=color, size=5, opacity=0.35),
                    legendgroup=name,
                    showlegend=False,
                    name=f"{name} draws",
                    hovertemplate=f"{name} draw<br>K %{{x}}<br>{label} %{{y:.3f}}<extra></extra>",
                )
        fig.add_scatter(
            x=ks,
            y=mean,
            mode="lines+markers",
            line=dict(color=color, width=2.5),
            marker=dict(size=7),
            name=name,
            legendgroup=name,
            customdata=[[fmt_float(s), d, t] for s, d, t in zip(std, draws, trials, strict=True)],
            hovertemplate=(
                f"{name}<br>K %{{x}}<br>{label} %{{y:.3f}} ± %{{customdata[0]}}<br>"
                "draws %{customdata[1]}, trials %{customdata[2]}<extra></extra>"
            ),
        )
    fig.update_layout(
        **_LAYOUT,
        title=_title(title or f"{label.capitalize()} when K heads are ablated"),
        height=420,
        legend=dict(title=dict(text="heads ablated")),
    )
    fig.update_xaxes(title_text="K (heads ablated)", rangemode="tozero")
    fig.update_yaxes(title_text=label, range=[-0.02, 1.05])
    return fig


# ---------------------------------------------------------------------------------------------
# scatters


def _labelled(order: Iterable[int], n: int) -> set[int]:
    out: list[int] = []
    for i in order:
        if len(out) >= n:
            break
        out.append(int(i))
    return set(out)


def score_vs_effect(
    scores: HeadScores | np.ndarray,
    effects: np.ndarray,
    *,
    score_label: str = "retrieval score",
    effect_label: str = "patching effect",
    n_labels: int = 8,
    threshold: float = RETRIEVAL_THRESHOLD,
    title: str | None = None,
) -> go.Figure:
    """Per head, its retrieval score (x) against a patching effect (y), two ``[layer, head]``
    arrays of one shape. The ``n_labels`` heads with the largest \\|effect\\| and the
    ``n_labels`` best-scored heads are labelled; retrieval heads (> ``threshold``) in red."""
    x, _ = _table_and_scores(scores, "mean")
    y = np.asarray(effects, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"scores {x.shape} and effects {y.shape} differ in shape")
    labels = _head_grid(*x.shape).ravel()
    xf, yf = x.ravel(), y.ravel()
    keep = np.flatnonzero(np.isfinite(xf) & np.isfinite(yf))
    by_effect = keep[np.argsort(-np.abs(yf[keep]), kind="stable")]
    by_score = keep[np.argsort(-xf[keep], kind="stable")]
    shown = _labelled(by_effect, n_labels) | _labelled(by_score, n_labels)
    is_ret = xf[keep] > threshold
    fig = go.Figure()
    for mask, name, color in (
        (~is_ret, "other heads", "#8aa4c8"),
        (is_ret, "retrieval", "#d62728"),
    ):
        idx = keep[mask]
        fig.add_scatter(
            x=xf[idx],
            y=yf[idx],
            mode="markers+text",
            text=[labels[i] if i in shown else "" for i in idx],
            textposition="top center",
            textfont=dict(size=10),
            customdata=labels[idx],
            marker=dict(color=color, size=8, opacity=0.8),
            name=f"{name} heads" if name == "retrieval" else name,
            hovertemplate=(
                f"head %{{customdata}}<br>{esc(score_label)} %{{x:.3f}}<br>"
                f"{esc(effect_label)} %{{y:.3f}}<extra></extra>"
            ),
        )
    fig.add_vline(x=threshold, line=dict(dash="dot", color="#999"))
    fig.update_layout(
        **_LAYOUT,
        title=_title(title or f"{score_label.capitalize()} vs {effect_label}"),
        height=460,
    )
    fig.update_xaxes(title_text=esc(score_label))
    fig.update_yaxes(title_text=esc(effect_label))
    return fig


def effect_heatmap(
    effects: np.ndarray,
    *,
    title: str | None = None,
    value_label: str = "patching effect",
    show_values: bool | None = None,
    layer_windows: LayerWindows | None = None,
) -> go.Figure:
    """Layer x head heatmap of a signed per-head quantity (e.g. activation patching's recovery
    of the logit difference), on a diverging scale centred at 0."""
    table = np.asarray(effects, dtype=np.float64)
    if table.ndim != 2:
        raise ValueError(f"effects are [layer, head], got shape {table.shape}")
    n_layers, n_heads = table.shape
    finite = table[np.isfinite(table)]
    bound = float(np.abs(finite).max()) if finite.size else 1.0
    labels = _head_grid(n_layers, n_heads)
    if show_values is None:
        show_values = _show_values(n_layers, n_heads)
    fig = go.Figure(
        go.Heatmap(
            z=_z(table),
            x=list(range(n_heads)),
            y=list(range(n_layers)),
            customdata=[[[labels[la, h]] for h in range(n_heads)] for la in range(n_layers)],
            colorscale="RdBu",
            zmid=0.0,
            zmin=-max(bound, 1e-9),
            zmax=max(bound, 1e-9),
            xgap=1,
            ygap=1,
            colorbar=dict(title=dict(text=esc(value_label))),
            text=_cell_text(table, blank_zero=True) if show_values else None,
            texttemplate="%{text}" if show_values else None,
            textfont=dict(size=9),
            hovertemplate=f"head %{{customdata[0]}}<br>{esc(value_label)} %{{z:.3f}}<extra></extra>",
        )
    )
    subtitle = _with_windows("", layer_windows) or None
    return _layout_head_grid(
        fig,
        _title(title or f"{value_label.capitalize()} per head", subtitle),
        n_layers,
        n_heads,
        layer_windows=layer_windows,
    )


def model_scatter(
    a: HeadScores | np.ndarray,
    b: HeadScores | np.ndarray,
    *,
    names: tuple[str, str] = ("model A", "model B"),
    n_labels: int = 8,
    k: int = 20,
    threshold: float = RETRIEVAL_THRESHOLD,
    title: str | None = None,
) -> go.Figure:
    """One model's score (x) against another's (y) per head, for two tables of one shape (e.g.
    a base model and its fine-tune). The ``n_labels`` heads whose score moved most are
    labelled; colour says where each head is a retrieval head; the title gives Pearson,
    Spearman and the top-``k`` Jaccard index (:func:`analysis.agreement`)."""
    xa, _ = _table_and_scores(a, "mean")
    xb, _ = _table_and_scores(b, "mean")
    if xa.shape != xb.shape:
        raise ValueError(f"score tables differ in shape: {xa.shape} vs {xb.shape}")
    agree = analysis.agreement(xa, xb, k=k)
    labels = _head_grid(*xa.shape).ravel()
    fa, fb = xa.ravel(), xb.ravel()
    keep = np.flatnonzero(np.isfinite(fa) & np.isfinite(fb))
    moved = keep[np.argsort(-np.abs(fb[keep] - fa[keep]), kind="stable")]
    shown = _labelled((i for i in moved if fb[i] != fa[i]), n_labels)
    na, nb = esc(names[0]), esc(names[1])
    groups = (
        ("neither", (fa <= threshold) & (fb <= threshold), "#b0b0b0"),
        (f"{na} only", (fa > threshold) & (fb <= threshold), "#1f77b4"),
        (f"{nb} only", (fa <= threshold) & (fb > threshold), "#ff7f0e"),
        ("both", (fa > threshold) & (fb > threshold), "#d62728"),
    )
    fig = go.Figure()
    hi = float(
        max(
            np.nanmax(fa[keep]) if keep.size else 1.0,
            np.nanmax(fb[keep]) if keep.size else 1.0,
            1.0,
        )
    )
    fig.add_scatter(
        x=[0, hi],
        y=[0, hi],
        mode="lines",
        line=dict(dash="dash", color="#999", width=1),
        hoverinfo="skip",
        showlegend=False,
    )
    for name, mask, color in groups:
        idx = keep[mask[keep]]
        if not idx.size:
            continue
        fig.add_scatter(
            x=fa[idx],
            y=fb[idx],
            mode="markers+text",
            text=[labels[i] if i in shown else "" for i in idx],
            textposition="top center",
            textfont=dict(size=10),
            customdata=[[labels[i], f"{fb[i] - fa[i]:+.3f}"] for i in idx],
            marker=dict(color=color, size=8, opacity=0.8),
            name=f"retrieval in {name}" if name != "neither" else "retrieval in neither",
            hovertemplate=(
                f"head %{{customdata[0]}}<br>{na} %{{x:.3f}}<br>{nb} %{{y:.3f}}<br>"
                "change %{customdata[1]}<extra></extra>"
            ),
        )
    stats = (
        f"Pearson {fmt_float(agree.pearson, 2)}, Spearman {fmt_float(agree.spearman, 2)}, "
        f"top-{agree.k} Jaccard {fmt_float(agree.jaccard, 2)} over {agree.n_heads} heads"
    )
    fig.update_layout(
        **_LAYOUT,
        title=_title(title or f"{names[0]} vs {names[1]}: retrieval scores", stats),
        height=500,
    )
    span = [-0.03 * hi, 1.05 * hi]
    fig.update_xaxes(title_text=f"{na} score", range=span, constrain="domain")
    fig.update_yaxes(title_text=f"{nb} score", range=span, scaleanchor="x", constrain="domain")
    return fig


# ---------------------------------------------------------------------------------------------
# activation frequency and answer classes


def activation_frequency_heatmap(
    records: Sequence[TrialRecord] | np.ndarray,
    *,
    passing_only: bool = True,
    title: str | None = None,
    show_values: bool | None = None,
    layer_windows: LayerWindows | None = None,
) -> go.Figure:
    """Per head the share of trials (passing ones by default) in which it made at least one copy
    event (:func:`analysis.activation_frequency`), layer x head; an array is drawn as given."""
    if isinstance(records, np.ndarray):
        freq, n_trials = np.asarray(records, dtype=np.float64), None
    else:
        records = list(records)
        chosen, active = analysis.active_trials(records, passing_only=passing_only)
        freq, n_trials = active.mean(axis=0), len(chosen)
    n_layers, n_heads = freq.shape
    labels = _head_grid(n_layers, n_heads)
    if n_trials is not None:
        counts = np.rint(freq * n_trials).astype(int)
        custom = [
            [[labels[la, h], f"{counts[la, h]} of {n_trials}"] for h in range(n_heads)]
            for la in range(n_layers)
        ]
    else:
        custom = [[[labels[la, h], "—"] for h in range(n_heads)] for la in range(n_layers)]
    if show_values is None:
        show_values = _show_values(n_layers, n_heads)
    always = int((freq == 1.0).sum())
    never = int((freq == 0.0).sum())
    which = "passing " if passing_only else ""
    subtitle = f"{always} heads copy in every {which}trial, {never} never"
    if n_trials is not None:
        subtitle += f" ({n_trials} {which}trials)"
    fig = go.Figure(
        go.Heatmap(
            z=_z(freq),
            x=list(range(n_heads)),
            y=list(range(n_layers)),
            customdata=custom,
            zmin=0.0,
            zmax=1.0,
            colorscale=FREQ_COLORSCALE,
            xgap=1,
            ygap=1,
            colorbar=dict(title=dict(text="share")),
            text=_cell_text(freq, blank_zero=True) if show_values else None,
            texttemplate="%{text}" if show_values else None,
            textfont=dict(size=9),
            hovertemplate=(
                "head %{customdata[0]}<br>copied in %{customdata[1]} trials<br>"
                "share %{z:.3f}<extra></extra>"
            ),
        )
    )
    return _layout_head_grid(
        fig,
        _title(title or "Activation frequency per head", _with_windows(subtitle, layer_windows)),
        n_layers,
        n_heads,
        layer_windows=layer_windows,
    )


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


def kv_curve_figure(points: Sequence[KVPoint], *, title: str | None = None) -> go.Figure:
    """Accuracy against the share of the KV cache kept (:func:`retrieval_heads.analysis.kv_curve`).

    One line per selection: the top-K KV heads by score and K random ones (±1 std over draws as
    error bars) keep the whole context while every other head keeps sink + window; ``uniform``
    windows every head at several windows. The uncompressed model is the dashed line at share 1.
    """
    if not points:
        raise ValueError("no curve points to draw")
    fig = go.Figure()
    base = [p for p in points if p.selection == "none"]
    if base:
        fig.add_hline(
            y=base[0].accuracy,
            line=dict(dash="dash", color="#555"),
            annotation_text=f"full cache: {base[0].accuracy:.2f}",
            annotation_position="bottom right",
        )
    colors = {**_SELECTION_COLORS, "uniform": "#7f7f7f"}
    names = {"top": "top-K KV heads full", "random": "K random KV heads full"}
    for selection in ("top", "random", "uniform"):
        series = sorted((p for p in points if p.selection == selection), key=lambda p: p.kv_share)
        if not series:
            continue
        label = names.get(selection, "every head windowed")
        hover = [
            f"{esc(selection)}: K={p.k}, sink {p.sink} + window {p.window}<br>KV share "
            f"{p.kv_share:.3f}<br>accuracy {p.accuracy:.3f} ± {p.accuracy_std:.3f} "
            f"({p.n_draws} draws, {p.n_trials} trials)"
            for p in series
        ]
        fig.add_scatter(
            x=[p.kv_share for p in series],
            y=[p.accuracy for p in series],
            error_y=dict(type="data", array=[p.accuracy_std for p in series], visible=True)
            if any(p.n_draws > 1 for p in series)
            else None,
            mode="lines+markers",
            name=label,
            line=dict(color=colors.get(selection, "#333")),
            hovertext=hover,
            hoverinfo="text",
        )
    fig.update_layout(
        title=_title(title or "NIAH accuracy against the KV cache kept"),
        xaxis=dict(title="share of the KV cache kept", range=[0, 1.02], tickformat=".0%"),
        yaxis=dict(title="accuracy", range=[-0.02, 1.05]),
        height=430,
        legend=dict(orientation="h", y=-0.2),
    )
    return fig
