"""Claim 1 - retrieval heads are sparse: fewer than 5% of heads score above 0.1.

Wu et al. (2024) find that across model families a small share of heads (under 5% in their
models) have a retrieval score above 0.1, and most heads never copy at all. This script detects
on a needle-in-a-haystack grid (or reads scores you already have, ``--scores``), then writes the
share of heads above the threshold, the histogram in the paper's bins (0, (0, 0.1], (0.1, 0.5],
> 0.5) and the top heads.

    python experiments/sparse.py --model tiny --out runs/exp/sparse
    python experiments/sparse.py --scores ../shared/reference/retrieval_head_scores/Yi-6B-200K.json

Writes ``summary.json``, ``table.txt``, ``histogram.html``, ``heatmap.html`` and (when it
detects) the results directory ``detect/``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = C.parser(__doc__, "runs/experiments/sparse")
    p.add_argument("--model", default="tiny", help="registry name or HF directory (tiny)")
    p.add_argument("--scores", default=None, help="read these scores instead of detecting")
    p.add_argument("--threshold", type=float, default=0.1, help="retrieval threshold (0.1)")
    p.add_argument("--top", type=int, default=10, help="top heads to list (10)")
    C.add_grid_args(p)
    args = p.parse_args(argv)

    from retrieval_heads import analysis
    from retrieval_heads.views import figures

    say = C.Clock()
    out: Path = args.out
    meta, scores, records, source = C.detection(args, out, say)
    name = args.model if args.scores is None else Path(args.scores).stem
    share = analysis.sparsity(scores, args.threshold)
    hist = analysis.histogram(scores)
    ranking = scores.ranking()
    n_scored = hist.total
    summary = {
        "claim": "retrieval heads are sparse (paper: < 5% of heads score > 0.1)",
        "model": name,
        "source": source,
        "shape": list(scores.shape),
        "trials": scores.n_total,
        "passing_trials": scores.n_passed,
        "threshold": args.threshold,
        "n_heads": n_scored,
        "n_retrieval": len(scores.above(args.threshold)),
        "share": share,
        "histogram": hist.to_dict(),
        "top": [[h.dotted, s] for h, s in ranking[: args.top]],
        "seed": args.seed,
    }
    table = analysis.summary_table({name: scores}, args.threshold)
    text = (
        f"{table}\n{summary['n_retrieval']} of {n_scored} heads score > {args.threshold:g} "
        f"({100 * share:.1f}%); {scores.n_passed} of {scores.n_total} trials passed\n\n"
        "bin          heads   share\n"
        + "".join(
            f"{label:12} {count:5d}  {100 * s:5.1f}%\n"
            for label, count, s in zip(hist.labels, hist.counts, hist.shares, strict=True)
        )
        + "\ntop heads: "
        + ", ".join(f"{h.dotted} ({s:.2f})" for h, s in ranking[: args.top])
        + "\n"
    )
    print(text)
    files = [
        C.write_json(out / "summary.json", summary),
        C.write_text(out / "table.txt", text),
        C.write_figure(
            figures.score_histogram({name: scores}, title=f"{name}: heads per score bin"),
            out / "histogram.html",
        ),
        C.write_figure(
            figures.score_heatmap(scores, title=f"{name}: retrieval score per head"),
            out / "heatmap.html",
        ),
    ]
    C.finish(out, files, say)
    return summary


if __name__ == "__main__":
    main()
