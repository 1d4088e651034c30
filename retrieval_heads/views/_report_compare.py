"""The report's sections that set one head table against another: an activation-patching
result (its effect per head, and against the detection run of its shape) and the
model-vs-model scatters of two or more detection runs.

It computes no agreement statistic (``analysis.agreement`` does, inside the figure).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from retrieval_heads.views import figures
from retrieval_heads.views._html import esc
from retrieval_heads.views._layers import layer_windows_from_meta
from retrieval_heads.views._report_page import _kv, _Page, _short
from retrieval_heads.views._report_results import PatchingSet, ResultSet

if TYPE_CHECKING:  # pragma: no cover
    pass


def _patching_section(page: _Page, ps: PatchingSet, detections: Sequence[ResultSet]) -> str:
    rows = [("model", esc(ps.model)), ("source", esc(ps.path))]
    for key in ("pairs", "seed", "length"):
        if key in ps.data:
            rows.append((key, esc(ps.data[key])))
    agree = ps.data.get("agreement")
    if isinstance(agree, Mapping):
        rows.append(("agreement", esc(", ".join(f"{k} {_short(v)}" for k, v in agree.items()))))
    parts = [_kv(rows)]
    shape = ps.effect.shape
    same = [d for d in detections if d.scores.shape == shape]
    match = next((d for d in same if d.model == ps.model), same[0] if same else None)
    label = "patching effect"
    windows = layer_windows_from_meta(match.meta, shape[0]) if match is not None else None
    parts.append(
        page.figure(
            lambda: figures.effect_heatmap(
                ps.effect,
                value_label=label,
                title=f"Activation patching per head: {ps.model}",
                layer_windows=windows,
            ),
            "patching heatmap",
        )
    )
    if match is not None:
        parts.append(
            page.figure(
                lambda: figures.score_vs_effect(
                    match.scores,
                    ps.effect,
                    effect_label=label,
                    title=f"Retrieval score (#{match.index}) vs patching effect: {ps.model}",
                ),
                "score vs patching",
            )
        )
    else:
        parts.append(
            '<p class="note">No detection run of this shape to compare the patching effect '
            "with.</p>"
        )
    return "\n".join(parts)


def _comparison_section(page: _Page, sets: Sequence[ResultSet], max_pairs: int = 6) -> str:
    parts: list[str] = []
    pairs = [(a, b) for i, a in enumerate(sets) for b in sets[i + 1 :]]
    for a, b in pairs[:max_pairs]:
        if a.scores.shape != b.scores.shape:
            parts.append(
                f'<p class="note">{esc(a.label)} and {esc(b.label)} are not comparable head by '
                f"head: {a.scores.n_layers}x{a.scores.n_heads} vs "
                f"{b.scores.n_layers}x{b.scores.n_heads} heads.</p>"
            )
            continue
        names = (f"#{a.index} {a.model}", f"#{b.index} {b.model}")
        parts.append(
            page.figure(
                lambda a=a, b=b, names=names: figures.model_scatter(  # type: ignore[misc]  # mypy cannot infer lambdas with default arguments
                    a.scores, b.scores, names=names
                ),
                "model scatter",
            )
        )
    if len(pairs) > max_pairs:
        parts.append(f'<p class="note">{len(pairs) - max_pairs} more pairs not drawn.</p>')
    return "\n".join(parts)
