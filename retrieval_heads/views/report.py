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
- ablation runs (``meta["kind"] == "ablate"``, or records with ``params["k"]``): NIAH grids of
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
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval_heads import analysis
from retrieval_heads.analysis import RETRIEVAL_THRESHOLD
from retrieval_heads.files import ResultsError, atomic_write_text, check_output_file
from retrieval_heads.records import TrialRecord
from retrieval_heads.scores import HeadScores
from retrieval_heads.store import load_results
from retrieval_heads.views import figures
from retrieval_heads.views._html import esc, fmt_float, fmt_int, plotly_js
from retrieval_heads.views._layers import (
    is_mixed,
    layer_kind,
    layer_windows_from_meta,
    layer_windows_from_model,
    windows_summary,
)

if TYPE_CHECKING:  # pragma: no cover
    import plotly.graph_objects as go

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
# reading results


@dataclass
class ResultSet:
    """One result directory (or score file) as the report sees it."""

    path: Path
    meta: dict[str, Any]
    scores: HeadScores
    records: list[TrialRecord]
    label: str = ""
    index: int = 0

    @property
    def model(self) -> str:
        if self.meta.get("model"):
            return str(self.meta["model"])
        return self.path.stem if self.path.is_file() else self.path.name

    @property
    def kind(self) -> str:
        kind = self.meta.get("kind")
        if kind:
            return str(kind)
        if any("k" in r.params for r in self.records):
            return "ablate"
        return "detect" if self.records else str(self.meta.get("format", "scores"))

    @property
    def is_ablation(self) -> bool:
        if self.is_kv_sim:
            return False
        return self.kind == "ablate" or any("k" in r.params for r in self.records)

    @property
    def is_kv_sim(self) -> bool:
        return self.kind == "kv-sim"


def load_result_set(path: str | Path, index: int = 0) -> ResultSet:
    path = Path(path)
    meta, scores, records = load_results(path)
    rs = ResultSet(path, dict(meta), scores, list(records), index=index)
    rs.label = f"{rs.model} ({rs.kind})"
    return rs


@dataclass
class PatchingSet:
    """An activation-patching result: ``patching.json`` (``{"model", "effect": [[...]], ...}``)
    or a directory holding one."""

    path: Path
    data: dict[str, Any]
    effect: np.ndarray
    index: int = 0

    @property
    def model(self) -> str:
        return str(self.data.get("model") or self.path.name)


def load_patching(path: str | Path) -> PatchingSet | None:
    """A :class:`PatchingSet` if ``path`` is a patching result, else ``None``."""
    path = Path(path)
    file = path / "patching.json" if path.is_dir() else path
    if not file.is_file() or file.suffix != ".json" or (file.parent / "meta.json").exists():
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or "effect" not in data or "schema" in data:
        return None
    try:
        effect = np.array(
            [[np.nan if v is None else float(v) for v in row] for row in data["effect"]]
        )
    except (TypeError, ValueError):
        return None
    if effect.ndim != 2 or not effect.size:
        return None
    return PatchingSet(path, data, effect)


def _find_key(obj: Any, keys: Sequence[str], depth: int = 0) -> Any:
    """The first value under any of ``keys`` in nested dicts (breadth first, shallow)."""
    if depth > 4 or not isinstance(obj, Mapping):
        return None
    for key in keys:
        if key in obj and obj[key] is not None:
            return obj[key]
    for value in obj.values():
        found = _find_key(value, keys, depth + 1)
        if found is not None:
            return found
    return None


def _n_kv_heads(rs: ResultSet, model: HookedModel | None) -> int | None:
    n_heads = rs.scores.n_heads
    if model is not None and model.n_heads == n_heads and model.n_layers == rs.scores.n_layers:
        value: Any = model.n_kv_heads
    else:
        value = _find_key(rs.meta, ("n_kv_heads", "num_key_value_heads", "n_key_value_heads"))
    try:
        n_kv = int(value)
    except (TypeError, ValueError):
        return None
    return n_kv if 0 < n_kv < n_heads and n_heads % n_kv == 0 else None


def _layer_windows(rs: ResultSet, model: HookedModel | None) -> list[int | None] | None:
    """Each layer's attention window (``None``: global) as the run recorded it, else as the
    model given reports it; ``None`` when neither knows."""
    n_layers = rs.scores.n_layers
    return layer_windows_from_meta(rs.meta, n_layers) or layer_windows_from_model(model, n_layers)


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
    prov = meta.get("provenance") if isinstance(meta.get("provenance"), Mapping) else {}
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
        pkgs = prov.get("packages") if isinstance(prov.get("packages"), Mapping) else {}
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


# ---------------------------------------------------------------------------------------------
# sections


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
                    lambda other=other: figures.score_vs_effect(
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


def _k(record: TrialRecord) -> int:
    try:
        return int(record.params.get("k", 0))
    except (TypeError, ValueError):
        return 0


def _conditions(records: Sequence[TrialRecord]) -> dict[str, list[TrialRecord]]:
    """Ablation records by condition: ``"baseline"`` (K = 0), then ``"<selection> K=<k>"``."""
    groups: dict[tuple[int, str], list[TrialRecord]] = {}
    for r in records:
        k = _k(r)
        sel = "baseline" if k == 0 else str(r.params.get("selection", "ablated"))
        groups.setdefault((k, sel), []).append(r)
    order = sorted(groups, key=lambda ks: (ks[0], ks[1] != "top", ks[1]))
    return {("baseline" if k == 0 else f"{sel} K={k}"): groups[(k, sel)] for k, sel in order}


def _niah_panels(records: Sequence[TrialRecord]) -> dict[str, list[TrialRecord]]:
    """Baseline, the largest top-K ablation and the random-K one of that K, side by side."""
    base = [r for r in records if _k(r) == 0]
    ablated = [r for r in records if _k(r) > 0]
    panels: dict[str, list[TrialRecord]] = {}
    if base:
        panels["baseline (no ablation)"] = base
    if ablated:
        top = [r for r in ablated if r.params.get("selection") == "top"]
        pool = top or ablated
        k_max = max(_k(r) for r in pool)
        sel = "top" if top else str(pool[0].params.get("selection", "ablated"))
        panels[f"{sel} K={k_max} ablated"] = [r for r in pool if _k(r) == k_max]
        if top:
            rand = [r for r in ablated if r.params.get("selection") == "random" and _k(r) == k_max]
            if rand:
                panels[f"random K={k_max} ablated"] = rand
    return panels


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


def _k_sweep_table(rows: Sequence[analysis.KSweepRow]) -> str:
    return _summary_table(
        "k-sweep",
        "K-sweep: mean ± std over draws",
        ["K", "selection", "draws", "trials", "accuracy", "ROUGE recall"],
        [analysis.k_sweep_cells(r) for r in rows],
    )


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
            if r.params.get("selection") == p.selection
            and r.params.get("n_full_kv_heads") == p.k
            and r.params.get("window") == p.window
        ]

    panels = {"full cache": [r for r in rs.records if r.params.get("selection") == "none"]}
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


def _ablation_section(page: _Page, rs: ResultSet) -> str:
    """Per task (``params["task"]``, when records hold several): NIAH grids of the baseline
    and the ablated runs, the K-sweep, the answer classes."""
    if not rs.records:
        return '<p class="note">This ablation run holds no trials.</p>'
    by_task: dict[str, list[TrialRecord]] = {}
    for r in rs.records:
        by_task.setdefault(str(r.params.get("task", "")), []).append(r)
    parts = []
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
                    lambda metric=metric, label=label: figures.niah_heatmap(
                        panels, metric=metric, title=f"Needle in a haystack ({label}): {name}"
                    ),
                    f"NIAH {metric} baseline vs ablated",
                )
            )
    rows = analysis.k_sweep(records)
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
                lambda a=a, b=b, names=names: figures.model_scatter(
                    a.scores, b.scores, names=names
                ),
                "model scatter",
            )
        )
    if len(pairs) > max_pairs:
        parts.append(f'<p class="note">{len(pairs) - max_pairs} more pairs not drawn.</p>')
    return "\n".join(parts)


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
        rs.index = i
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
        f'<meta name="generator" content="{GENERATOR}">\n'
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
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return False
    return f'<meta name="generator" content="{GENERATOR}">'.encode() in head


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
