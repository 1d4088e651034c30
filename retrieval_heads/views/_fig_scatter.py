"""Per-head scatters of one table against another: the retrieval score against a patching
effect, and one model's scores against another's with their agreement.

It computes no score; the agreement statistics come from :func:`analysis.agreement`.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import plotly.graph_objects as go

from retrieval_heads import analysis
from retrieval_heads.analysis import RETRIEVAL_THRESHOLD
from retrieval_heads.scores import HeadScores
from retrieval_heads.views._fig_base import _LAYOUT, _head_grid, _table_and_scores, _title
from retrieval_heads.views._html import esc, fmt_float

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


def agreement_heatmap(
    agreement: dict, *, k: int | None = None, title: str | None = None
) -> go.Figure:
    """How alike detectors rank heads: Spearman above the diagonal, the Jaccard index of their
    top-``k`` sets below it (``agreement`` as ``detector_comparison.agreement`` gives it; ``k``
    defaults to its largest k), 1 on the diagonal."""
    names = list(agreement["detectors"])
    ks = [int(x) for x in agreement.get("ks", [])]
    jaccard = agreement.get("jaccard", {})
    k = k if k is not None else (max(ks) if ks else None)
    n = len(names)
    z = np.full((n, n), np.nan)
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            if i == j:
                z[i, j] = 1.0
            elif j > i:
                value = agreement["spearman"][a][b]
                z[i, j] = np.nan if value is None else float(value)
            elif k is not None and str(k) in jaccard:
                z[i, j] = float(jaccard[str(k)][a][b])
    text = [["" if np.isnan(v) else f"{v:.2f}" for v in row] for row in z]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=names,
            y=names,
            text=text,
            texttemplate="%{text}",
            zmin=-1,
            zmax=1,
            colorscale="RdBu",
            colorbar=dict(title="agreement"),
            hovertemplate="%{y} vs %{x}: %{z:.3f}<extra></extra>",
        )
    )
    lower = f"Jaccard of top-{k} (below)" if k is not None else "no Jaccard"
    fig.update_layout(
        **_LAYOUT,
        title=_title(title or f"Agreement between detectors: Spearman (above), {lower}"),
        yaxis=dict(autorange="reversed"),
        height=max(320, 40 * n + 160),
    )
    return fig
