"""What every section of the report stands on: :class:`_Page` (embeds a figure or an attention
view, counts them, turns a failure into an error box), the header of a result set, the
key-value and summary tables, and whether records carry a context grid.

It builds no section and no whole page; ``report`` assembles those.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from retrieval_heads import analysis
from retrieval_heads.records import TrialRecord
from retrieval_heads.views._html import esc, fmt_int
from retrieval_heads.views._layers import windows_summary
from retrieval_heads.views._report_results import ResultSet

if TYPE_CHECKING:  # pragma: no cover
    import plotly.graph_objects as go


# ---------------------------------------------------------------------------------------------
# the page


@dataclass
class _Page:
    n_figures: int = 0
    n_views: int = 0
    n_trials: int = 0
    errors: list[str] = field(default_factory=list)

    def figure(self, make: Callable[[], go.Figure], what: str) -> str:
        """Build and embed one figure; a failure becomes a visible error box, not a crash."""
        try:
            fig = make()
        except Exception as exc:  # noqa: BLE001 - one bad figure must not sink the report
            message = f"could not draw {what}: {type(exc).__name__}: {exc}"
            self.errors.append(message)
            warnings.warn(message, stacklevel=3)
            return f'<p class="error">{esc(message)}</p>'
        self.n_figures += 1
        height = int(fig.layout.height or 450)
        body = fig.to_html(
            full_html=False,
            include_plotlyjs=False,
            div_id=f"fig-{self.n_figures}",
            default_width="100%",
            default_height=f"{height}px",
            config={"displaylogo": False, "responsive": True},
        )
        return f'<div class="figure" data-figure="{esc(what)}">{body}</div>'

    def trial_view(self, view: Any) -> str:
        self.n_trials += 1
        self.n_views += len(view.views)
        return view.to_html(f"cv-{self.n_trials}")


def _kv(rows: Sequence[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="meta">{body}</table>'


def _header(rs: ResultSet, windows: Sequence[int | None] | None = None) -> str:
    meta = rs.meta
    prov: Any = meta.get("provenance") if isinstance(meta.get("provenance"), Mapping) else {}
    git = prov.get("git") if isinstance(prov.get("git"), Mapping) else None
    rows: list[tuple[str, str]] = [
        ("model", esc(rs.model)),
        ("kind", esc(rs.kind)),
        ("source", esc(rs.path)),
    ]
    if meta.get("status"):
        rows.append(("status", esc(meta["status"])))
    rows.append(("seed", esc(meta.get("seed", "—"))))
    if git:
        commit = str(git.get("commit", ""))
        dirty = " (uncommitted changes)" if git.get("dirty") else ""
        rows.append(("commit", f"<code>{esc(commit)}</code>{esc(dirty)}"))
    else:
        rows.append(("commit", "—"))
    for key in ("created", "finished"):
        if meta.get(key):
            rows.append((key, esc(meta[key])))
    if meta.get("resumed"):
        rows.append(("resumed", esc(", ".join(map(str, meta["resumed"])))))
    s = rs.scores
    rows.append(
        (
            "trials",
            f"{fmt_int(s.n_passed)} passed of {fmt_int(s.n_total)}"
            + (f" ({100 * s.pass_rate:.1f}%)" if s.n_total else ""),
        )
    )
    rows.append(("heads", f"{s.n_layers} layers × {s.n_heads} heads ({esc(s.scorer)} scorer)"))
    if windows is not None and any(w is not None for w in windows):
        rows.append(("layer attention", esc(windows_summary(windows))))
    if prov:
        pkgs: Any = prov.get("packages") if isinstance(prov.get("packages"), Mapping) else {}
        versions = ", ".join(f"{k} {v if v is not None else '—'}" for k, v in pkgs.items())
        rows.append(("packages", esc(versions) or "—"))
        env = [str(prov[k]) for k in ("python", "platform", "host") if prov.get(k)]
        if env:
            rows.append(("python / platform", esc(" · ".join(env))))
    timing = meta.get("timing")
    if isinstance(timing, Mapping) and timing:
        rows.append(("timing", esc(", ".join(f"{k} {_short(v)}" for k, v in timing.items()))))
    html = _kv(rows)
    for key in ("config", "extra"):
        value = meta.get(key)
        if value:
            text = json.dumps(value, indent=1, ensure_ascii=False, default=str)
            html += f"<details><summary>{esc(key)}</summary><pre>{esc(text)}</pre></details>"
    return html


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _has_grid(records: Sequence[TrialRecord]) -> bool:
    keys = analysis.CONTEXT_KEYS
    return any(
        any(k in r.params for k in keys["length"]) and any(k in r.params for k in keys["depth"])
        for r in records
    )


def _summary_table(
    css: str, caption: str, headers: Sequence[str], rows: Sequence[Sequence[Any]], text: int = 1
) -> str:
    """A captioned table of summary rows, every cell escaped: column ``text`` holds words
    (left-aligned), every other column numbers (``class="num"``)."""
    head = "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in headers) + "</tr>"
    body = "".join(
        "<tr>"
        + "".join(
            f"<td>{esc(str(c))}</td>" if i == text else f'<td class="num">{esc(str(c))}</td>'
            for i, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return (
        f'<table class="{css}"><caption>{esc(caption)}</caption>'
        f"<thead>{head}</thead><tbody>{body}</tbody></table>"
    )
