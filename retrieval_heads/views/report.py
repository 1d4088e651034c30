"""The self-contained HTML report: one file, no network, every figure that applies.

:func:`build_report` reads result directories (or score files; see
:func:`~retrieval_heads.store.load_results`) and writes one HTML file holding plotly.js once
(inline), the circuitsvis bundle once (inline, only when there are attention views), and per
result set: a header (model, kind, config, seed, package versions, commit, dates from
``meta.json``) and the figures its results allow:

- detection runs: score heatmap (and per kv head when the model uses GQA), histogram in the
  paper's bins, needle-in-a-haystack grid, activation frequency, the retrieval score against
  every other scorer the records carry (e.g. a patching effect), a top-heads table and, given a
  model, attention views of passing trials (longest contexts first): answer steps against a
  cropped context, per top head (their input ids come from ``trials``, else are rebuilt from
  the records). Per-head heatmaps mark global and sliding-window layers when the run recorded
  ``meta["extra"]["model_info"]["layer_windows"]`` (or the model reports them);
- ablation runs (``meta["kind"] == "ablate"``, or records with a head-ablation condition): NIAH grids of
  the baseline and the ablated runs side by side, the K-sweep (figure and table), answer-class
  shares when records carry ``params["answer_class"]`` (or another of
  :data:`~retrieval_heads.views.figures.ANSWER_CLASS_KEYS`);
- KV-cache simulations (``meta["kind"] == "kv-sim"``, :mod:`retrieval_heads.kvcache`): accuracy
  against the share of the KV cache kept for top-K, random-K and uniform windowing, its table,
  and NIAH grids of the full cache next to the runs of about the smallest sufficient share;
- activation patching (``patching.json`` of ``retrieval-heads patch``): the effect per head and,
  next to a detection run of the same shape, the retrieval score against it;
- two or more detection runs of one shape: model-vs-model scatters with their agreement.

Inputs that are not results (an earlier ``report.html`` caught by a glob, a broken directory) are
listed as skipped at the top of the page; only when nothing can be read is it an error.

Everything read from results is escaped (``html.escape`` in HTML, ``\\u003c``-style escapes in
scripts), and a Content-Security-Policy forbids every fetch, so nothing in results can run
script and the page cannot reach the network. The output is deterministic (no timestamps of its
own; element ids are counters).

This module assembles the page (the HTML shell, its styles and CSP, the table of contents) and
holds the entry points; it reads results through ``_report_results``, builds each section in
``_report_detect``, ``_report_ablate``, ``_report_kv`` and ``_report_compare`` (patching and
model-vs-model), on the pieces of ``_report_page``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from retrieval_heads.analysis import RETRIEVAL_THRESHOLD
from retrieval_heads.files import ResultsError, atomic_write_text, check_output_file
from retrieval_heads.views._html import esc, generator_meta, plotly_js, written_by
from retrieval_heads.views._report_ablate import _ablation_section
from retrieval_heads.views._report_compare import _comparison_section, _patching_section
from retrieval_heads.views._report_detect import _detection_section
from retrieval_heads.views._report_kv import _kv_section
from retrieval_heads.views._report_page import _header, _Page
from retrieval_heads.views._report_results import (
    PatchingSet,
    ResultSet,
    _layer_windows,
    load_patching,
    load_result_set,
)

if TYPE_CHECKING:  # pragma: no cover
    from retrieval_heads.model import HookedModel
    from retrieval_heads.trials.trial import Trial

__all__ = [
    "ResultSet",
    "PatchingSet",
    "build_report",
    "render_report",
    "load_result_set",
    "load_patching",
    "CSP",
]

CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src data: blob:; font-src data:; connect-src 'none'; base-uri 'none'; form-action 'none'"
)
"""The page's Content-Security-Policy: inline scripts and styles only, no fetch of any kind."""

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#222;
background:#f6f7f9}
main{max-width:1240px;margin:0 auto;padding:18px 24px 60px}
h1{font-size:1.6em;margin:.4em 0}
h2{font-size:1.3em;margin:1.6em 0 .4em;border-bottom:2px solid #d8dde6;padding-bottom:4px}
h3{font-size:1.08em;margin:1.2em 0 .4em;color:#333}
section.result{background:#fff;border:1px solid #dde2ea;border-radius:8px;padding:8px 20px 20px;
margin:22px 0}
table{border-collapse:collapse;font-size:.88em;margin:.5em 0}
th,td{border:1px solid #dde2ea;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f0f3f7}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.retrieval td{background:#fff4f0}
table.meta th{width:11em}
pre{background:#f6f8fa;padding:8px;overflow:auto;max-height:340px;font-size:.82em}
.figure{margin:10px 0 18px;border:1px solid #eef0f4;border-radius:6px;padding:4px}
.note{color:#555;font-size:.9em;font-style:italic}
.error{color:#a00;font-weight:600}
.crop{font-size:.88em;color:#444}
.cv-view{margin:10px 0;padding:6px;border:1px solid #eef0f4;border-radius:6px}
.cv-title{font-weight:600;margin-bottom:2px}
.cv-caption{font-size:.85em;color:#555;margin-bottom:6px}
.trial-attention{border-top:1px dashed #ccd;margin-top:14px;padding-top:6px}
nav ul{margin:.3em 0}
footer{color:#777;font-size:.85em;margin-top:30px}
"""


# ---------------------------------------------------------------------------------------------
# entry points


def render_report(
    result_dirs: Sequence[str | Path | ResultSet],
    *,
    model: HookedModel | None = None,
    trials: Mapping[str, Trial | Sequence[int]] | None = None,
    trial_views: int = 2,
    heads_per_view: int = 4,
    window: int = 6,
    top_n: int = 20,
    title: str = "Retrieval heads report",
) -> str:
    """The report as one HTML string (see :func:`build_report`)."""
    from retrieval_heads import __version__

    if not result_dirs:
        raise ValueError("no results to report on")
    sets: list[ResultSet] = []
    patches: list[PatchingSet] = []
    skipped: list[str] = []
    for item in result_dirs:
        if isinstance(item, ResultSet):
            sets.append(item)
            continue
        path = Path(item)
        patch = load_patching(path)
        if patch is not None:
            patches.append(patch)
        elif path.suffix.lower() in (".html", ".htm", ".png", ".svg", ".md", ".txt"):
            skipped.append(f"{path}: not a results directory or score file")
        else:
            try:
                sets.append(load_result_set(path))
            except (ResultsError, OSError) as exc:
                skipped.append(f"{path}: {exc}")
    if not sets and not patches:
        raise ValueError("no results to report on: " + "; ".join(skipped))
    for i, rs in enumerate([*sets, *patches], 1):
        rs.index = i  # type: ignore[attr-defined]  # a ResultSet or a patching result
        if isinstance(rs, ResultSet):
            rs.label = f"{rs.model} ({rs.kind})"
    page = _Page()
    sections, toc = [], []
    for rs in sets:
        anchor = f"set-{rs.index}"
        toc.append(f'<li><a href="#{anchor}">#{rs.index} {esc(rs.label)}</a></li>')
        body = [f'<section class="result" id="{anchor}">']
        body.append(f"<h2>#{rs.index} {esc(rs.model)} — {esc(rs.kind)}</h2>")
        body.append(_header(rs, _layer_windows(rs, model)))
        if rs.is_kv_sim:
            body.append(_kv_section(page, rs))
        elif rs.is_ablation:
            body.append(_ablation_section(page, rs))
        else:
            body.append(
                _detection_section(
                    page,
                    rs,
                    model=model,
                    trials=trials,
                    trial_views=trial_views,
                    heads_per_view=heads_per_view,
                    window=window,
                    top_n=top_n,
                )
            )
        body.append("</section>")
        sections.append("\n".join(body))
    detections = [rs for rs in sets if not rs.is_ablation and not rs.is_kv_sim]
    for ps in patches:
        anchor = f"set-{ps.index}"
        toc.append(f'<li><a href="#{anchor}">#{ps.index} {esc(ps.model)} (patching)</a></li>')
        sections.append(
            f'<section class="result" id="{anchor}"><h2>#{ps.index} {esc(ps.model)} — '
            f"activation patching</h2>{_patching_section(page, ps, detections)}</section>"
        )
    if len(detections) >= 2:
        toc.append('<li><a href="#comparison">comparison of detection runs</a></li>')
        sections.append(
            '<section class="result" id="comparison"><h2>Comparison of detection runs</h2>'
            + _comparison_section(page, detections)
            + "</section>"
        )
    scripts = ""
    if page.n_figures:
        scripts += f'<script type="text/javascript">{plotly_js()}</script>\n'
    if page.n_views:
        from retrieval_heads.views.attention import circuitsvis_js

        scripts += f"<script>{circuitsvis_js()}</script>\n"
    errors = ""
    if page.errors:
        items = "".join(f"<li>{esc(e)}</li>" for e in page.errors)
        errors = f'<div class="error">Some parts could not be drawn:<ul>{items}</ul></div>'
    if skipped:
        items = "".join(f"<li>{esc(e)}</li>" for e in skipped)
        errors += f'<div class="note">Inputs skipped:<ul>{items}</ul></div>'
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">\n'
        f"{generator_meta(GENERATOR)}\n"
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(title)}</title>\n<style>{_CSS}</style>\n{scripts}</head>\n"
        f'<body data-figures="{page.n_figures}" data-views="{page.n_views}">\n<main>\n'
        f"<h1>{esc(title)}</h1>\n"
        f'<p class="note">Self-contained: plotly.js and circuitsvis are inlined and the page '
        f"makes no network request. A head is a retrieval head when its score (share of the "
        f"needle's answer tokens it copied by argmax attention, mean over passing trials) is "
        f"above {RETRIEVAL_THRESHOLD:g}.</p>\n{errors}"
        f"<nav><ul>{''.join(toc)}</ul></nav>\n"
        + "\n".join(sections)
        + f"\n<footer>retrieval-heads {esc(__version__)}: {page.n_figures} figures, "
        f"{page.n_views} attention views.</footer>\n</main>\n</body></html>\n"
    )


#: In every report's head: how a later report knows the file it may write over.
GENERATOR = "retrieval-heads report"


def is_report_file(path: str | Path) -> bool:
    """Whether ``path`` is a report this module wrote (its head names the generator)."""
    return written_by(path, GENERATOR)


def build_report(
    result_dirs: Sequence[str | Path],
    out: str | Path,
    *,
    model: HookedModel | None = None,
    trials: Mapping[str, Trial | Sequence[int]] | None = None,
    trial_views: int = 2,
    heads_per_view: int = 4,
    window: int = 6,
    top_n: int = 20,
    title: str = "Retrieval heads report",
) -> Path:
    """Write one self-contained HTML report on ``result_dirs`` to ``out``; returns ``out``.

    ``result_dirs``: results directories (detection or ablation runs) or score files.
    ``model`` and ``trials`` (``{trial_id: Trial or input ids}``) enable the attention views
    of ``trial_views`` passing trials of each detection run (longest context first), showing its
    ``heads_per_view`` best heads over the needle, ``window`` tokens either side of it and the
    keys they attend to most; without ``trials`` the shown trials are rebuilt from their records
    (built-in haystacks only), else the page says why there are none. The file is written
    atomically.
    """
    out = Path(out)
    check_output_file(out, "report", is_ours=is_report_file)  # before any work
    text = render_report(
        result_dirs,
        model=model,
        trials=trials,
        trial_views=trial_views,
        heads_per_view=heads_per_view,
        window=window,
        top_n=top_n,
        title=title,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, text)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(out, 0o666 & ~umask)  # the temp file was private; a report is for sharing
    return out
