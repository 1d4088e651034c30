"""The report's section of an ablation run: per task, NIAH grids of the baseline and the
ablated runs side by side, the K-sweep (figure and table) and the answer classes per condition.

It runs no ablation and computes no summary (``analysis.summarise_k_sweep`` does).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from retrieval_heads import analysis
from retrieval_heads.conditions import HeadAblation
from retrieval_heads.records import TrialRecord
from retrieval_heads.views import figures
from retrieval_heads.views._html import esc
from retrieval_heads.views._report_page import _has_grid, _Page, _summary_table
from retrieval_heads.views._report_results import ResultSet


def _k(record: TrialRecord) -> int:
    c = record.condition
    return c.k if isinstance(c, HeadAblation) else 0


def _selection(record: TrialRecord) -> str:
    c = record.condition
    return c.selection if isinstance(c, HeadAblation) else "none"


def _conditions(records: Sequence[TrialRecord]) -> dict[str, list[TrialRecord]]:
    """Ablation records by condition: ``"baseline"`` (K = 0), then ``"<selection> K=<k>"``."""
    groups: dict[tuple[int, str], list[TrialRecord]] = {}
    for r in records:
        k = _k(r)
        sel = "baseline" if k == 0 else _selection(r)
        groups.setdefault((k, sel), []).append(r)
    order = sorted(groups, key=lambda ks: (ks[0], ks[1] != "top", ks[1]))
    return {("baseline" if k == 0 else f"{sel} K={k}"): groups[(k, sel)] for k, sel in order}


def _niah_panels(records: Sequence[TrialRecord]) -> dict[str, list[TrialRecord]]:
    """Baseline, the largest top-K ablation and the random-K one of that K, side by side.

    The top-K is the K-sweep's ``top``, or in a detector comparison (``top:<detector>``) the
    copy score's (``top:retrieval``) when it is there."""
    base = [r for r in records if _k(r) == 0]
    ablated = [r for r in records if _k(r) > 0]
    panels: dict[str, list[TrialRecord]] = {}
    if base:
        panels["baseline (no ablation)"] = base
    if ablated:
        tops = sorted(
            {_selection(r) for r in ablated if _selection(r).startswith("top")},
            key=lambda s: (s != "top", s != "top:retrieval", s),
        )
        top = [r for r in ablated if tops and _selection(r) == tops[0]]
        pool = top or ablated
        k_max = max(_k(r) for r in pool)
        sel = tops[0] if top else _selection(pool[0])
        panels[f"{sel} K={k_max} ablated"] = [r for r in pool if _k(r) == k_max]
        if top:
            rand = [r for r in ablated if _selection(r) == "random" and _k(r) == k_max]
            if rand:
                panels[f"random K={k_max} ablated"] = rand
    return panels


def _k_sweep_table(rows: Sequence[analysis.KSweepRow]) -> str:
    return _summary_table(
        "k-sweep",
        "K-sweep: mean ± std over draws",
        ["K", "selection", "draws", "trials", "accuracy", "ROUGE recall"],
        [analysis.k_sweep_cells(r) for r in rows],
    )


def _ablation_section(page: _Page, rs: ResultSet) -> str:
    """Per task (``params["task"]``, when records hold several): NIAH grids of the baseline
    and the ablated runs, the K-sweep, the answer classes."""
    if not rs.records:
        return '<p class="note">This ablation run holds no trials.</p>'
    by_task: dict[str, list[TrialRecord]] = {}
    for r in rs.records:
        by_task.setdefault(str(r.params.get("task", "")), []).append(r)
    parts = _agreement(page, rs)
    for task in sorted(by_task):
        if len(by_task) > 1:
            parts.append(f"<h3>Task: {esc(task or 'unnamed')}</h3>")
        name = f"{rs.model} ({task})" if task and len(by_task) > 1 else rs.model
        parts.append(_ablation_task(page, by_task[task], name))
    return "\n".join(parts)


def _ablation_task(page: _Page, records: list[TrialRecord], name: str) -> str:
    parts: list[str] = []
    grid = [r for r in records if _has_grid([r])]
    panels = _niah_panels(grid)
    if panels:
        parts.append("<h4>Needle in a haystack: baseline vs ablated</h4>")
        for metric, label in (("accuracy", "accuracy"), ("recall", "ROUGE recall")):
            parts.append(
                page.figure(
                    lambda metric=metric, label=label: figures.niah_heatmap(  # type: ignore[misc]  # mypy cannot infer lambdas with default arguments
                        panels, metric=metric, title=f"Needle in a haystack ({label}): {name}"
                    ),
                    f"NIAH {metric} baseline vs ablated",
                )
            )
    rows = analysis.summarise_k_sweep(records)
    if len({r.k for r in rows}) > 1:
        parts.append("<h4>K-sweep</h4>")
        parts.append(
            page.figure(
                lambda: figures.k_sweep_figure(
                    rows, title=f"Accuracy when K heads are ablated: {name}"
                ),
                "K-sweep",
            )
        )
        parts.append(_k_sweep_table(rows))
    key = figures.answer_class_key(records)
    if key is not None:
        groups = _conditions(records)
        parts.append("<h4>Answer classes</h4>")
        parts.append(
            page.figure(
                lambda: figures.answer_class_figure(
                    groups, key=key, title=f"Answer classes per condition: {name}"
                ),
                "answer classes",
            )
        )
    if not parts:
        parts.append(
            '<p class="note">These records carry neither a context grid, nor several K, nor '
            "answer classes; nothing to draw.</p>"
        )
    return "\n".join(parts)


def _agreement(page: _Page, rs: ResultSet) -> list[str]:
    """A detector comparison's agreement (its ``agreement.json``): the matrix, and which
    detector's heads break retrieval with the fewest (each curve is in the K-sweep below)."""
    path = rs.path / "agreement.json" if rs.path.is_dir() else None
    if rs.kind != "compare-detectors" or path is None or not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        matrix = data["agreement"]
    except (OSError, ValueError, KeyError, TypeError):
        return ['<p class="note">agreement.json could not be read: no agreement matrix.</p>']
    parts = [
        "<h4>Agreement between detectors</h4>",
        page.figure(
            lambda: figures.agreement_heatmap(
                matrix, title=f"Agreement between detectors: {rs.model}"
            ),
            "detector agreement",
        ),
    ]
    fewest = data.get("fewest_heads", {})
    if isinstance(fewest, dict) and isinstance(fewest.get("k"), dict):
        fraction = fewest.get("fraction", 0.5)
        rows = [[name, "—" if k is None else k] for name, k in fewest["k"].items()]
        parts.append(
            _summary_table(
                "fewest-heads",
                f"Fewest heads to ablate for accuracy ≤ {fraction:g} × baseline (—: no K did)",
                ["detector", "K"],
                rows,
                text=0,
            )
        )
    return parts
