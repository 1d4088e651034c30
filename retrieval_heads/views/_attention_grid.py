"""The answer-steps x cropped-context grid of one trial's attention, as plain HTML.

A decode step has one query, so a trial's attention is a few rows (one per generated token)
over thousands of keys. The grid shows exactly that: rows are the answer steps, columns the
context tokens worth seeing (the first token, the needle and its answer, the copied tokens, the
keys the heads attend to most, the question), every hidden stretch folded into one ``…``
column that keeps its attention mass, and the generated tokens folded into a last
``answer so far`` column, so each row still sums to 1.

circuitsvis' ``AttentionPattern`` draws only square query x key grids with one token list for
both axes, so this grid is an HTML table (escaped text, inline styles, no script): it renders
the same in the report, in a standalone page and in Jupyter, and costs a few bytes per cell.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from retrieval_heads.views._html import esc, fmt_int

__all__ = ["AttentionGrid", "Crop", "choose_columns", "crop_of"]

_MIN_TOP_MASS = 0.02
"""A key joins the crop as "attended" only if some head gives it at least this weight."""


@dataclass(frozen=True)
class Crop:
    """Context positions shown, and the display items they make: ``(a, b)`` is one token when
    ``not is_gap``, else the folded stretch ``[a, b)``. The last item folds the generated
    tokens ``[n_context, n_keys)`` when there are any."""

    shown: tuple[int, ...]
    items: tuple[tuple[int, int], ...]
    is_gap: tuple[bool, ...]
    n_context: int
    n_keys: int

    def fold(self, att: np.ndarray) -> np.ndarray:
        """``[head, step, key]`` -> ``[head, step, item]``: a gap holds the mass it hides."""
        n_heads, n_steps, _ = att.shape
        cum = np.concatenate([np.zeros((n_heads, n_steps, 1)), np.cumsum(att, axis=-1)], axis=-1)
        starts = np.array([a for a, _ in self.items])
        ends = np.array([b for _, b in self.items])
        return cum[:, :, ends] - cum[:, :, starts]

    @property
    def answer_item(self) -> int | None:
        """Index of the item folding the generated tokens, if any."""
        if self.items and self.items[-1][0] == self.n_context and self.is_gap[-1]:
            return len(self.items) - 1
        return None


def _n_items(shown: set[int], n_context: int) -> int:
    """Display items of a shown set: its tokens plus one per hidden stretch between them."""
    ordered = sorted(shown)
    gaps = sum(1 for a, b in zip(ordered, ordered[1:], strict=False) if b > a + 1)
    if ordered and ordered[0] > 0:
        gaps += 1
    if ordered and ordered[-1] < n_context - 1:
        gaps += 1
    return len(ordered) + gaps


def _span(a: int, b: int, n_context: int) -> set[int]:
    return set(range(max(0, a), min(n_context, b)))


def choose_columns(
    att: np.ndarray,
    n_context: int,
    *,
    anchors: Sequence[tuple[int, int]] = (),
    copied: Iterable[int] = (),
    question_span: tuple[int, int] | None = None,
    window: int = 6,
    max_columns: int = 80,
) -> tuple[list[int], int]:
    """Context positions to show (and the margin used around the anchors), within
    ``max_columns`` display items.

    In order, each added only while it fits: the first token (attention sinks live there) and
    the copied tokens; the ``anchors`` (needle, answer span); ``window`` tokens either side of
    them (halved until they fit); the keys the heads attend to most (by their largest weight
    over heads and steps, at least 2%); the question.
    """
    shown: set[int] = {0} | {k for k in copied if 0 <= k < n_context}

    def try_add(extra: set[int]) -> bool:
        merged = shown | extra
        if _n_items(merged, n_context) > max_columns:
            return False
        shown.update(extra)
        return True

    for a, b in anchors:
        try_add(_span(a, b, n_context))
    w = max(0, int(window))
    while w > 0 and not try_add(set().union(*(_span(a - w, b + w, n_context) for a, b in anchors))):
        w //= 2
    margin = w
    peak = att[:, :, :n_context].max(axis=(0, 1)) if att.size else np.zeros(n_context)
    for k in np.argsort(-peak, kind="stable"):
        if peak[k] < _MIN_TOP_MASS or _n_items(shown, n_context) >= max_columns:
            break
        try_add({int(k)})
    if question_span is not None:
        try_add(_span(*question_span, n_context))
    return sorted(shown), margin


def crop_of(shown: Sequence[int], n_context: int, n_keys: int) -> Crop:
    """The display items of ``shown`` context positions, hidden stretches folded; the keys from
    ``n_context`` on (the generated tokens) become one last item."""
    items: list[tuple[int, int]] = []
    is_gap: list[bool] = []
    prev = -1
    for p in shown:
        if p > prev + 1:
            items.append((prev + 1, p))
            is_gap.append(True)
        items.append((p, p + 1))
        is_gap.append(False)
        prev = p
    if prev < n_context - 1:
        items.append((prev + 1, n_context))
        is_gap.append(True)
    if n_keys > n_context:
        items.append((n_context, n_keys))
        is_gap.append(True)
    return Crop(tuple(shown), tuple(items), tuple(is_gap), n_context, n_keys)


# ---------------------------------------------------------------------------------------------
# HTML

_STYLE = """<style>
.ag-wrap{overflow-x:auto;margin:6px 0 12px}
.ag{border-collapse:collapse;font:10px/1.2 system-ui,sans-serif;table-layout:fixed}
.ag th,.ag td{border:1px solid #e6e8ee;padding:0;text-align:center}
.ag td{width:12px;min-width:12px;height:17px;font-size:9px;color:#fff}
.ag th.ag-col{vertical-align:bottom;height:96px;max-height:96px;overflow:hidden;
font-weight:normal;background:#fafbfc}
.ag th.ag-col div{writing-mode:vertical-rl;transform:rotate(180deg);white-space:pre;
max-height:92px;overflow:hidden;margin:0 auto}
.ag th.ag-row{text-align:right;padding:0 6px;white-space:pre;font-weight:normal;
background:#fafbfc;max-width:180px;overflow:hidden;position:sticky;left:0}
.ag th.ag-needle{background:#fff1b8}.ag th.ag-answer{background:#ffc46b}
.ag th.ag-distractor{background:#e6d7f5}.ag th.ag-gap{color:#888;font-style:italic}
.ag td.ag-copy{outline:2px solid #e4572e;outline-offset:-2px;color:#e4572e;font-weight:700}
.ag-legend{font-size:.82em;color:#444;margin:2px 0}
.ag-legend span{display:inline-block;padding:0 5px;margin-right:6px;border:1px solid #ddd}
</style>"""


def _cell_colour(value: float, scale: float, gap: bool) -> str:
    """White to dark blue (grey for folded stretches), by ``value / scale``."""
    t = min(1.0, max(0.0, value / scale)) if scale > 0 else 0.0
    top = (96, 96, 96) if gap else (8, 48, 107)
    r, g, b = (round(255 + (c - 255) * t) for c in top)
    return f"#{r:02x}{g:02x}{b:02x}"


def _text_colour(value: float, scale: float) -> str:
    return "#fff" if scale > 0 and value / scale > 0.55 else "#e4572e"


@dataclass(frozen=True)
class AttentionGrid:
    """Answer steps x cropped context, per head: the numbers and their HTML.

    ``weights``: ``[head, step, item]`` (:meth:`Crop.fold`); ``col_labels`` plain text per
    item; ``row_labels`` per answer step; ``copies``: ``(head index, step, item)`` cells holding
    a copy event (marked ``✓``); spans are token ``[start, end)`` marked in the header.
    """

    crop: Crop
    weights: np.ndarray
    col_labels: tuple[str, ...]
    row_labels: tuple[str, ...]
    head_names: tuple[str, ...]
    copies: frozenset[tuple[int, int, int]]
    needle: tuple[int, int] | None = None
    answer: tuple[int, int] | None = None
    distractors: tuple[tuple[int, int], ...] = ()

    @property
    def scale(self) -> float:
        """The top of the colour scale, shared by every head: the largest weight on a token."""
        real = self.weights[:, :, [not g for g in self.crop.is_gap]]
        return float(real.max()) if real.size else 1.0

    def to_html(self) -> str:
        """One table per head (rows: answer steps, columns: the crop's items) and a legend."""
        scale = self.scale
        head_cells = "".join(_col_header(i, a, b, self) for i, (a, b) in enumerate(self.crop.items))
        tables = []
        for h, name in enumerate(self.head_names):
            rows = []
            for s, label in enumerate(self.row_labels):
                cells = "".join(
                    _cell(
                        self.weights[h, s, i],
                        scale,
                        self.crop.is_gap[i],
                        (h, s, i) in self.copies,
                        self.col_labels[i],
                    )
                    for i in range(len(self.crop.items))
                )
                rows.append(f'<tr><th class="ag-row" scope="row">{esc(label)}</th>{cells}</tr>')
            tables.append(
                f'<div class="ag-wrap"><table class="ag" data-head="{esc(name)}">'
                f'<caption style="text-align:left;font-weight:600">Head {esc(name)}</caption>'
                f'<thead><tr><th class="ag-row">answer step</th>{head_cells}</tr></thead>'
                f"<tbody>{''.join(rows)}</tbody></table></div>"
            )
        legend = (
            '<p class="ag-legend"><span style="background:#fff1b8">needle</span>'
            '<span style="background:#ffc46b">answer in the needle</span>'
            '<span style="background:#e6d7f5">distractor</span>'
            '<span style="color:#e4572e;outline:2px solid #e4572e">✓ copied</span>'
            '<span style="color:#888;font-style:italic">[… n …] folded tokens (their total)</span>'
            f"dark blue = {scale:.3f}, the largest weight on a shown token</p>"
        )
        return f'{_STYLE}<div class="attention-grid">{legend}{"".join(tables)}</div>'


def _within(a: int, span: tuple[int, int] | None) -> bool:
    return span is not None and span[0] <= a < span[1]


def _col_header(i: int, a: int, b: int, grid: AttentionGrid) -> str:
    label = grid.col_labels[i]
    if grid.crop.is_gap[i]:
        kind = "ag-gap"
        where = f"positions {fmt_int(a)}–{fmt_int(b - 1)} ({fmt_int(b - a)} tokens)"
    else:
        kind = (
            "ag-answer"
            if _within(a, grid.answer)
            else "ag-needle"
            if _within(a, grid.needle)
            else "ag-distractor"
            if any(_within(a, d) for d in grid.distractors)
            else ""
        )
        where = f"position {fmt_int(a)}"
    return (
        f'<th class="ag-col {kind}" title="{esc(where)}: {esc(label)}"><div>{esc(label)}</div></th>'
    )


def _cell(value: float, scale: float, gap: bool, copied: bool, label: str) -> str:
    """One cell; near-zero cells carry no style or tooltip, which keeps long crops small."""
    if not copied and value < 5e-4:
        return "<td></td>"
    style = f"background:{_cell_colour(value, scale, gap)}"
    if copied:
        style += f";color:{_text_colour(value, scale)}"
    attrs = f' class="ag-copy" style="{style}"' if copied else f' style="{style}"'
    return f'<td{attrs} title="{esc(label)}: {value:.3f}">{"✓" if copied else ""}</td>'
