"""Claim 4 - retrieval heads are dynamically activated: some always, most by context.

Wu et al. (2024) observe that a few of the strongest retrieval heads copy in every context
("always on"), while the others activate only for some contexts: some lengths, depths or
needles. This script takes a detection with per-trial copy events (detects, or reads
``--scores DIR``) and writes, per head, the share of passing trials with at least one copy
event, the always-on heads, and for the heads active in some but not all trials, which contexts
(length, depth, needle) activate them.

    python experiments/dynamic.py --model tiny --out runs/experiments/dynamic
    python experiments/dynamic.py --scores runs/experiments/sparse/detect

A published ``{"L-H": [...]}`` score file has no copy events and no trial parameters: from it
only the frequency of a non-zero per-trial score (the same event: a score above 0 means the
head copied at least once) can be read, never the contexts; the script says so.

Writes ``dynamic.json``, ``contexts.json``, ``table.txt``, ``frequency.html`` and
``contexts.html``.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

NO_EVENTS = (
    "no per-trial copy events or trial parameters in this source (a published score file "
    "holds per-trial scores only): the activation frequency comes from per-trial scores > 0 "
    "(the same event), and which contexts activate a head cannot be computed"
)


def frequency_from_scores(scores):
    """Per head, the share of passing trials with a score above 0, from a HeadScores (NaN for
    heads without scores; trials without a score for a head are left out of its share)."""
    import numpy as np

    values = scores.values[scores.passed]
    has = ~np.isnan(values)
    with np.errstate(invalid="ignore", divide="ignore"):
        freq = ((values > 0) & has).sum(axis=0) / has.sum(axis=0)
    return np.where(has.any(axis=0), freq, np.nan)


def frequency_summary(freq, scores, threshold: float = 0.1) -> dict:
    """Always-on heads (frequency 1), silent heads (0) and the dynamic rest, with counts, for
    all heads and for the retrieval heads (score > threshold)."""
    import numpy as np

    from retrieval_heads.heads import Head

    table = scores.as_array("mean")
    valid = ~np.isnan(freq)
    retrieval = np.nan_to_num(table, nan=-1) > threshold
    heads = lambda mask: [Head(int(a), int(b)).dotted for a, b in np.argwhere(mask)]  # noqa: E731
    always = valid & (freq == 1.0)
    silent = valid & (freq == 0.0)
    dynamic = valid & (freq > 0) & (freq < 1)
    return {
        "n_heads": int(valid.sum()),
        "always_on": heads(always),
        "n_always_on": int(always.sum()),
        "n_silent": int(silent.sum()),
        "n_dynamic": int(dynamic.sum()),
        "retrieval_heads": heads(retrieval),
        "retrieval_always_on": heads(retrieval & always),
        "retrieval_dynamic": heads(retrieval & dynamic),
        "frequency_of_retrieval_heads": {
            h: float(freq[Head.parse(h).layer, Head.parse(h).head]) for h in heads(retrieval)
        },
    }


def _spread(rows) -> dict:
    """Per (head, dimension): lowest and highest share over the dimension's values."""
    out: dict = defaultdict(dict)
    for r in rows:
        lo, hi = out[r.head.dotted].get(r.context, (1.0, 0.0))
        out[r.head.dotted][r.context] = (min(lo, r.share), max(hi, r.share))
    return out


def context_figure(rows, title: str):
    """Heads (rows) x context values (columns), coloured by the share of trials it copied."""
    import plotly.graph_objects as go

    heads = list(dict.fromkeys(r.head.dotted for r in rows))
    columns = list(dict.fromkeys(f"{r.context}={r.value}" for r in rows))
    index = {(r.head.dotted, f"{r.context}={r.value}"): r for r in rows}
    z = [[index[(h, c)].share if (h, c) in index else None for c in columns] for h in heads]
    text = [
        [
            f"{index[(h, c)].n_active}/{index[(h, c)].n_trials}" if (h, c) in index else ""
            for c in columns
        ]
        for h in heads
    ]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=columns,
            y=heads,
            text=text,
            texttemplate="%{text}",
            colorscale="Purples",
            zmin=0,
            zmax=1,
            colorbar=dict(title="share of trials"),
            hovertemplate="head %{y}<br>%{x}<br>copied in %{text} trials<extra></extra>",
        )
    )
    fig.update_layout(
        title=title,
        template="plotly_white",
        xaxis_title="context",
        yaxis_title="head",
        yaxis_autorange="reversed",
        height=max(320, 40 + 28 * len(heads)),
    )
    return fig


def main(argv: list[str] | None = None) -> dict:
    p = C.parser(__doc__, "runs/experiments/dynamic")
    p.add_argument("--model", default="tiny", help="registry name or HF directory (tiny)")
    p.add_argument("--scores", default=None, help="read this detection instead of detecting")
    p.add_argument("--threshold", type=float, default=0.1, help="retrieval threshold (0.1)")
    p.add_argument("--heads", type=int, default=10, help="dynamic heads to show contexts for (10)")
    C.add_grid_args(p)
    args = p.parse_args(argv)

    import numpy as np

    from retrieval_heads import analysis
    from retrieval_heads.views import figures

    say = C.Clock()
    out: Path = args.out
    meta, scores, records, source = C.detection(args, out, say)
    table = scores.as_array("mean")
    note = None
    rows = []
    if records:
        chosen, active = analysis.active_trials(records, passing_only=True)
        freq = active.mean(axis=0)
        n_trials = len(chosen)
        # the dynamic heads worth a look: retrieval heads first, then by frequency
        dyn = [(int(la), int(h)) for la, h in np.argwhere((freq > 0) & (freq < 1))]
        dyn.sort(key=lambda lh: (not table[lh] > args.threshold, -float(freq[lh]), lh))
        picked = [f"{la}.{h}" for la, h in dyn[: args.heads]]
        rows = analysis.activating_contexts(records, picked) if picked else []
    else:
        note = NO_EVENTS
        freq = frequency_from_scores(scores)
        n_trials = scores.n_passed
        print(f"note: {note}")
    summary = frequency_summary(freq, scores, args.threshold)
    spread = _spread(rows)
    drivers = {
        h: max(dims, key=lambda d: dims[d][1] - dims[d][0]) for h, dims in spread.items() if dims
    }
    result = {
        "claim": "some retrieval heads copy in every context, the rest depend on the context",
        "source": source,
        "passing_trials": n_trials,
        "note": note,
        **summary,
        "frequency": freq,
        "dynamic_heads": [
            {
                "head": h,
                "score": float(table[tuple(int(x) for x in h.split("."))]),
                "frequency": float(freq[tuple(int(x) for x in h.split("."))]),
                "spread": {d: list(v) for d, v in spread[h].items()},
                "most_context_dependent_on": drivers.get(h),
            }
            for h in spread
        ],
    }
    lines = [
        f"{n_trials} passing trials; {summary['n_heads']} heads: {summary['n_always_on']} always "
        f"on, {summary['n_dynamic']} dynamic, {summary['n_silent']} never copy",
        f"always on: {', '.join(summary['always_on']) or '-'}",
        f"retrieval heads (score > {args.threshold:g}): {len(summary['retrieval_heads'])}; always "
        f"on {len(summary['retrieval_always_on'])}, dynamic {len(summary['retrieval_dynamic'])}",
        "",
    ]
    if rows:
        lines.append("dynamic heads: share of trials with a copy event, per context value")
        by_head: dict = defaultdict(lambda: defaultdict(list))
        for r in rows:
            by_head[r.head.dotted][r.context].append(f"{r.value}: {r.n_active}/{r.n_trials}")
        for h, dims in by_head.items():
            cell = tuple(int(x) for x in h.split("."))
            lines.append(
                f"  {h:>5}  score {float(table[cell]):.2f}  freq {float(freq[cell]):.2f}  "
                f"(varies most with {drivers.get(h)})"
            )
            for dim, cells in dims.items():
                lines.append(f"         {dim:7} " + "  ".join(cells))
    text = "\n".join(lines) + "\n"
    print(text)
    files = [
        C.write_json(out / "dynamic.json", result),
        C.write_json(out / "contexts.json", [r.to_dict() for r in rows]),
        C.write_text(out / "table.txt", text),
        C.write_figure(
            figures.activation_frequency_heatmap(
                freq, title="Share of passing trials in which each head copied"
            ),
            out / "frequency.html",
        ),
    ]
    if rows:
        files.append(
            C.write_figure(
                context_figure(rows, "Which contexts activate the dynamic heads"),
                out / "contexts.html",
            )
        )
    C.finish(out, files, say)
    return result


if __name__ == "__main__":
    main()
