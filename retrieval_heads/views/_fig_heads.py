"""Per-head figures: the layer x head heatmaps (retrieval score, or per kv head for GQA models;
a signed effect such as activation patching; activation frequency), their shared layout with
global layers marked, and the histogram of scores in the paper's bins.

It computes no score: it draws the tables and records it is given.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go

from retrieval_heads import analysis
from retrieval_heads.analysis import RETRIEVAL_THRESHOLD
from retrieval_heads.heads import Head
from retrieval_heads.records import TrialRecord
from retrieval_heads.scores import HeadScores
from retrieval_heads.views._fig_base import (
    _LAYOUT,
    _MISSING_BG,
    _PALETTE,
    FREQ_COLORSCALE,
    SCORE_COLORSCALE,
    _cell_text,
    _head_grid,
    _table_and_scores,
    _title,
    _z,
)
from retrieval_heads.views._html import esc, fmt_float, fmt_int
from retrieval_heads.views._layers import LayerWindows, is_mixed, mark_layers, windows_summary

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


# ---------------------------------------------------------------------------------------------
# activation frequency


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
