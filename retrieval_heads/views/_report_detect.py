"""The report's section of a detection run: score heatmaps (per kv head for GQA), histogram,
top-heads table, NIAH grid, other scorers, activation frequency and the attention views of
single trials.

It computes no score and loads no model; the figures come from ``figures``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval_heads import analysis
from retrieval_heads.analysis import RETRIEVAL_THRESHOLD
from retrieval_heads.scores import HeadScores
from retrieval_heads.views import figures
from retrieval_heads.views._html import esc, fmt_float, fmt_int
from retrieval_heads.views._layers import is_mixed, layer_kind
from retrieval_heads.views._report_page import _has_grid, _Page
from retrieval_heads.views._report_results import ResultSet, _layer_windows, _n_kv_heads

if TYPE_CHECKING:  # pragma: no cover
    from retrieval_heads.model import HookedModel


def _top_table(rs: ResultSet, top_n: int, windows: Sequence[int | None] | None = None) -> str:
    s = rs.scores
    ranking = s.ranking()[:top_n]
    if not ranking:
        return '<p class="note">No head has a score.</p>'
    freq = None
    passing = [r for r in rs.records if r.passed]
    if passing:
        freq = analysis.activation_frequency(passing)
    values = s.values[s.passed]
    nonzero = (np.nan_to_num(values, nan=0.0) > 0).sum(axis=0)
    with_kind = is_mixed(windows)
    head = (
        "<tr><th>rank</th><th>head</th>"
        + ("<th>layer attention</th>" if with_kind else "")
        + "<th>score</th><th>95% CI</th><th>passing trials</th>"
        "<th>copied in</th><th>mean over all trials</th>"
        + ("<th>activation frequency</th>" if freq is not None else "")
        + "</tr>"
    )
    body = []
    for rank, (h, score) in enumerate(ranking, 1):
        st = s.stats(h)
        cls = ' class="retrieval"' if score > RETRIEVAL_THRESHOLD else ""
        cells = [
            str(rank),
            h.dotted,
            fmt_float(score),
            f"[{fmt_float(st['ci_low'])}, {fmt_float(st['ci_high'])}]",
            fmt_int(st["n"]),
            fmt_int(nonzero[h.layer, h.head]),
            fmt_float(st["mean_all"]),
        ]
        if freq is not None:
            cells.append(fmt_float(freq[h.layer, h.head]))
        text_columns = {1}
        if with_kind:
            assert windows is not None
            cells.insert(2, layer_kind(windows[h.layer]))
            text_columns.add(2)
        tds = "".join(
            f"<td>{esc(c)}</td>" if i in text_columns else f'<td class="num">{esc(c)}</td>'
            for i, c in enumerate(cells)
        )
        body.append(f"<tr{cls}>{tds}</tr>")
    n_ret = len(s.above(RETRIEVAL_THRESHOLD))
    sparsity = analysis.sparsity(s)
    caption = (
        f"Top {len(ranking)} of {fmt_int(s.n_layers * s.n_heads)} heads by retrieval score (mean "
        f"over passing trials); {n_ret} heads score above {RETRIEVAL_THRESHOLD:g} "
        f"({fmt_float(100 * sparsity, 1)}% of heads), shaded."
    )
    if with_kind:
        assert windows is not None
        in_global = sum(windows[h.layer] is None for h, _ in ranking)
        caption += f" {in_global} of these {len(ranking)} sit in global layers."
    return (
        f'<table class="top-heads"><caption>{esc(caption)}</caption><thead>{head}</thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def _detection_section(
    page: _Page,
    rs: ResultSet,
    *,
    model: HookedModel | None,
    trials: Mapping[str, Any] | None,
    trial_views: int,
    heads_per_view: int,
    window: int,
    top_n: int,
) -> str:
    s, records, name = rs.scores, rs.records, rs.model
    windows = _layer_windows(rs, model)
    parts = ["<h3>Retrieval scores</h3>"]
    parts.append(
        page.figure(
            lambda: figures.score_heatmap(
                s, title=f"Retrieval score per head: {name}", layer_windows=windows
            ),
            "score heatmap",
        )
    )
    n_kv = _n_kv_heads(rs, model)
    if n_kv is not None:
        parts.append(
            page.figure(
                lambda: figures.score_heatmap(
                    s,
                    kv_heads=n_kv,
                    title=f"Retrieval score per kv head: {name}",
                    layer_windows=windows,
                ),
                "kv-head heatmap",
            )
        )
    parts.append(
        page.figure(
            lambda: figures.score_histogram(s, title=f"Distribution of retrieval scores: {name}"),
            "score histogram",
        )
    )
    parts.append(_top_table(rs, top_n, windows))
    if records and _has_grid(records):
        parts.append("<h3>Needle in a haystack</h3>")
        parts.append(
            page.figure(
                lambda: figures.niah_heatmap(
                    records, title=f"Needle in a haystack: accuracy of {name}"
                ),
                "NIAH grid",
            )
        )
    others = sorted({k for r in records for k in r.scores} - {s.scorer})[:4]
    if others and any(r.passed for r in records):
        parts.append("<h3>Other scorers</h3>")
        for other in others:
            parts.append(
                page.figure(
                    lambda other=other: figures.score_vs_effect(  # type: ignore[misc]  # mypy cannot infer lambdas with default arguments
                        s,
                        HeadScores.from_records(records, other, n_resamples=1).mean,
                        effect_label=f"{other} score",
                        title=f"Retrieval score vs {other}: {name}",
                    ),
                    f"scorer {other}",
                )
            )
    if any(r.passed for r in records):
        parts.append("<h3>Activation frequency</h3>")
        parts.append(
            page.figure(
                lambda: figures.activation_frequency_heatmap(
                    records, title=f"Activation frequency per head: {name}", layer_windows=windows
                ),
                "activation frequency",
            )
        )
    if records:
        parts.append("<h3>Attention in single trials</h3>")
        parts.append(
            _attention_views(
                page,
                rs,
                model=model,
                trials=trials,
                trial_views=trial_views,
                heads_per_view=heads_per_view,
                window=window,
            )
        )
    return "\n".join(parts)


def _attention_views(
    page: _Page,
    rs: ResultSet,
    *,
    model: HookedModel | None,
    trials: Mapping[str, Any] | None,
    trial_views: int,
    heads_per_view: int,
    window: int,
) -> str:
    if trial_views <= 0:
        return '<p class="note">Attention views are turned off (trial_views=0).</p>'
    if model is None:
        return (
            '<p class="note">Attention views need the model: pass <code>model=</code> and '
            "<code>trials={trial_id: Trial or input ids}</code> to <code>build_report</code>.</p>"
        )
    if (model.n_layers, model.n_heads) != (rs.scores.n_layers, rs.scores.n_heads):
        return (
            f'<p class="note">No attention views: the model given has {model.n_layers}x'
            f"{model.n_heads} heads, these results {rs.scores.n_layers}x{rs.scores.n_heads}.</p>"
        )
    from retrieval_heads.views._trials import pick_trials, rebuild_trials

    notes: list[str] = []
    if not trials:
        # The CLI has only the results folder: rebuild the trials shown from their records.
        chosen = pick_trials(rs.records, trial_views)
        trials, notes = rebuild_trials(chosen, model.tokenizer)
        chosen = [r for r in chosen if r.trial_id in trials]
        if not chosen:
            why = "; ".join(notes) or "no passing trials"
            return (
                '<p class="note">No attention views: the trials\' input ids were not given and '
                f"could not be rebuilt from the records ({esc(why)}); pass "
                "<code>trials={trial_id: Trial or input ids}</code> to "
                "<code>build_report</code>.</p>"
            )
    else:
        passing = [r for r in rs.records if r.passed and r.trial_id in trials]
        chosen = pick_trials(passing, trial_views)
        if not chosen:
            n_passing = sum(r.passed for r in rs.records)
            return (
                f'<p class="note">No attention views: none of the {n_passing} passing trials '
                "has its input ids in <code>trials</code>.</p>"
            )
    heads = [h for h, _ in rs.scores.ranking()[:heads_per_view]]
    labels = [f"{h.dotted} ({rs.scores.score(h):.2f})" for h in heads]
    from retrieval_heads.views.attention import trial_attention

    out = []
    for record in chosen:
        try:
            view = trial_attention(
                model, record, trials[record.trial_id], heads, window=window, head_labels=labels
            )
        except Exception as exc:  # noqa: BLE001 - report the failure in the page
            message = (
                f"attention view of trial {record.trial_id} failed: {type(exc).__name__}: {exc}"
            )
            page.errors.append(message)
            warnings.warn(message, stacklevel=2)
            out.append(f'<p class="error">{esc(message)}</p>')
            continue
        out.append(page.trial_view(view))
    out += [f'<p class="note">{esc(n)}</p>' for n in notes]
    return "\n".join(out)
