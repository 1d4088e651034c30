"""Views of results: plotly figures, circuitsvis attention views, the self-contained report.

Nothing here computes scores. ``figures`` draws :class:`~retrieval_heads.scores.HeadScores`,
trial records and analysis rows; ``attention`` shows single trials (circuitsvis, imported on
first use); ``report`` puts everything that applies to a set of result directories in one HTML
file that needs no network; ``browser`` (not imported here) checks such a file in headless
Chromium.
"""

from __future__ import annotations

from retrieval_heads.views.attention import (
    CircuitsVisView,
    TrialAttention,
    attention_view,
    circuitsvis_js,
    cv_text,
    trial_attention,
)
from retrieval_heads.views.figures import (
    activation_frequency_heatmap,
    answer_class_figure,
    effect_heatmap,
    k_sweep_figure,
    model_scatter,
    niah_grid,
    niah_heatmap,
    score_heatmap,
    score_histogram,
    score_vs_effect,
)
from retrieval_heads.views.report import (
    PatchingSet,
    ResultSet,
    build_report,
    load_patching,
    load_result_set,
    render_report,
)

__all__ = [
    "CircuitsVisView",
    "TrialAttention",
    "attention_view",
    "trial_attention",
    "circuitsvis_js",
    "cv_text",
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
    "ResultSet",
    "PatchingSet",
    "build_report",
    "render_report",
    "load_result_set",
    "load_patching",
]
