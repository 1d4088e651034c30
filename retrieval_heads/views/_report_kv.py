"""The report's section of a KV-cache simulation: accuracy against the share of the cache kept,
its table, and the NIAH grids of the full cache next to runs of about the smallest sufficient
share.

It simulates nothing (``retrieval_heads.kvcache`` does) and computes no curve
(``analysis.kv_curve`` does).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from retrieval_heads import analysis
from retrieval_heads.conditions import KVWindow
from retrieval_heads.records import TrialRecord
from retrieval_heads.views import figures
from retrieval_heads.views._report_page import _has_grid, _Page, _summary_table
from retrieval_heads.views._report_results import ResultSet

if TYPE_CHECKING:  # pragma: no cover
    pass


def _kv_section(page: _Page, rs: ResultSet) -> str:
    """KV-cache what-if: the accuracy-vs-share curve, its table, and the NIAH grids of the
    full cache, the smallest sufficient top-K and random and uniform runs of about its share."""
    if not rs.records:
        return '<p class="note">This KV-cache simulation holds no trials.</p>'
    points = analysis.kv_curve(rs.records)
    parts = [
        "<h4>Accuracy against the share of the KV cache kept</h4>",
        page.figure(
            lambda: figures.kv_curve_figure(points, title=f"KV-cache what-if: {rs.model}"),
            "kv-curve",
        ),
        _kv_table(points),
    ]
    try:
        chosen = analysis.smallest_sufficient_k(points)
    except ValueError:
        return "\n".join(parts)

    def select(p: analysis.KVPoint) -> list[TrialRecord]:
        return [
            r
            for r in rs.records
            if isinstance(r.condition, KVWindow)
            and (r.condition.selection, r.condition.k, r.condition.window)
            == (p.selection, p.k, p.window)
        ]

    panels = {
        "full cache": [
            r
            for r in rs.records
            if isinstance(r.condition, KVWindow) and r.condition.selection == "none"
        ]
    }
    panels[f"top {chosen.k} KV heads full ({chosen.kv_share:.0%} kept)"] = select(chosen)
    for selection in ("random", "uniform"):
        near = [p for p in points if p.selection == selection]
        if near:
            p = min(near, key=lambda p: (abs(p.kv_share - chosen.kv_share), p.kv_share))
            what = f"{p.k} random KV heads full" if selection == "random" else "all windowed"
            panels[f"{what} ({p.kv_share:.0%} kept)"] = select(p)
    if all(_has_grid(v) for v in panels.values() if v):
        parts.append("<h4>Needle in a haystack at about the same share</h4>")
        parts.append(
            page.figure(
                lambda: figures.niah_heatmap(
                    panels, title=f"NIAH accuracy under KV compression: {rs.model}"
                ),
                "kv NIAH grids",
            )
        )
    return "\n".join(parts)


def _kv_table(points: Sequence[analysis.KVPoint]) -> str:
    return _summary_table(
        "kv-curve",
        "KV-cache what-if: mean ± std over draws",
        ["selection", "full KV heads", "sink + window", "KV share", "draws", "trials", "accuracy"],
        [
            [
                p.selection,
                p.k,
                "-" if p.window is None else f"{p.sink} + {p.window}",
                f"{p.kv_share:.3f}",
                p.n_draws,
                p.n_trials,
                f"{p.accuracy:.3f} ± {p.accuracy_std:.3f}",
            ]
            for p in points
        ],
        text=0,
    )
