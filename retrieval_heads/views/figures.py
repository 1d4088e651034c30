"""Plotly figures of results: each function takes values and returns a ``go.Figure``.

Nothing here computes a score: the functions draw whatever :class:`HeadScores`,
:class:`TrialRecord`\\ s or :func:`~retrieval_heads.analysis.summarise_k_sweep` rows they are given.
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

This module is where they are imported from; the code lives in ``_fig_heads`` (per-head
heatmaps, histogram), ``_fig_trials`` (NIAH grid, answer classes), ``_fig_curves`` (K-sweep, KV
cache), ``_fig_scatter`` (score vs effect, model vs model) on top of ``_fig_base`` (colours,
layout, cells).
"""

from __future__ import annotations

from retrieval_heads.views._fig_base import ANSWER_CLASS_KEYS, NIAH_COLORSCALE, SCORE_COLORSCALE
from retrieval_heads.views._fig_base import FREQ_COLORSCALE as FREQ_COLORSCALE
from retrieval_heads.views._fig_curves import k_sweep_figure
from retrieval_heads.views._fig_curves import kv_curve_figure as kv_curve_figure
from retrieval_heads.views._fig_heads import (
    activation_frequency_heatmap,
    effect_heatmap,
    score_heatmap,
    score_histogram,
)
from retrieval_heads.views._fig_scatter import agreement_heatmap, model_scatter, score_vs_effect
from retrieval_heads.views._fig_trials import (
    answer_class_figure,
    answer_class_key,
    niah_grid,
    niah_heatmap,
)

__all__ = [
    "NIAH_COLORSCALE",
    "SCORE_COLORSCALE",
    "ANSWER_CLASS_KEYS",
    "agreement_heatmap",
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
