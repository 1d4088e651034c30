"""Curves of interventions: accuracy against K ablated heads (top-K vs random-K, with bands) and
against the share of the KV cache kept.

It computes no summary: it draws :func:`~retrieval_heads.analysis.summarise_k_sweep` rows and
:func:`~retrieval_heads.analysis.kv_curve` points.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go

from retrieval_heads.analysis import KSweepRow, KVPoint
from retrieval_heads.views._fig_base import _LAYOUT, _PALETTE, _SELECTION_COLORS, _title
from retrieval_heads.views._html import esc, fmt_float

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
# KV cache


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
