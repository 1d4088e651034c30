"""Claim 2 - retrieval heads are universal: every model that retrieves has a few of them.

Wu et al. (2024) find retrieval heads in every model family and scale they test (Llama-2,
Mistral, Mixtral, Qwen, Yi; base and chat; 4K to 200K contexts). This script puts a list of
models in one table: heads, retrieval heads (score > 0.1), their share, the highest score and the
top heads, plus the paper-style summary with the histogram bins.

Each entry of ``--models`` is a registry name or HF directory (detected here on a grid fitted to
its context), or an existing results directory / score file (read, not detected), optionally
labelled ``LABEL=PATH``:

    python experiments/universal.py --models tiny tiny-short
    python experiments/universal.py --models tiny=runs/experiments/sparse/detect \\
        ../shared/reference/retrieval_head_scores/*.json

Writes ``universal.json``, ``table.txt`` and ``histogram.html``; detections go to
``detect-<label>/``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402


def _entry(text: str) -> tuple[str | None, str]:
    """``LABEL=SOURCE`` or ``SOURCE`` -> (label or None, source)."""
    if "=" in text and not Path(text).exists():
        label, source = text.split("=", 1)
        return label, source
    return None, text


def main(argv: list[str] | None = None) -> list:
    p = C.parser(__doc__, "runs/experiments/universal")
    p.add_argument("--models", nargs="+", default=["tiny", "tiny-short"], help="see above")
    p.add_argument("--threshold", type=float, default=0.1, help="retrieval threshold (0.1)")
    p.add_argument("--top", type=int, default=5, help="top heads per model (5)")
    C.add_grid_args(p, shard=False)  # several detections: not sharded (docs/scale.md)
    args = p.parse_args(argv)

    from retrieval_heads import analysis
    from retrieval_heads.views import figures

    say = C.Clock()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    models = {}
    sources = {}
    for item in args.models:
        label, source = _entry(item)
        stored = C.is_results(source)
        slot = re.sub(r"[^A-Za-z0-9._-]+", "_", label or Path(source).name)
        meta, scores, _, where = C.detect_or_load(
            source,
            out / f"detect-{slot}",
            scores=source if stored else None,
            lengths=args.lengths,
            depths=args.depths,
            n_needles=args.n_needles,
            n_distractors=args.n_distractors,
            seed=args.seed,
            say=say,
        )
        label = label or C.label_for(source, meta)
        if label in models:
            raise SystemExit(f"universal: model label {label!r} given twice; use LABEL=SOURCE")
        models[label] = scores
        sources[label] = where
    rows = analysis.universal_table(models, args.threshold, args.top)
    body = [
        [
            r.model,
            f"{r.n_layers} x {r.n_heads}",
            r.n_scored,
            r.n_retrieval,
            f"{100 * r.share:.1f}%",
            r.max_score,
            ", ".join(f"{h.dotted} ({s:.2f})" for h, s in r.top),
        ]
        for r in rows
    ]
    headers = ["model", "layers x heads", "heads", f"> {args.threshold:g}", "share", "max"]
    table = analysis.format_table(body, [*headers, f"top {args.top}"], precision=2)
    summary = analysis.summary_table(models, args.threshold)
    text = f"{table}\n{summary}"
    print(text)
    result = {
        "claim": "every model has a few retrieval heads (paper: all families, < 5% of heads)",
        "threshold": args.threshold,
        "models": [{**r.to_dict(), "source": sources[r.model]} for r in rows],
        "histograms": {k: analysis.histogram(v).to_dict() for k, v in models.items()},
    }
    files = [
        C.write_json(out / "universal.json", result),
        C.write_text(out / "table.txt", text),
        C.write_figure(
            figures.score_histogram(models, title="Heads per score bin, by model"),
            out / "histogram.html",
        ),
    ]
    C.finish(out, files, say)
    return rows


if __name__ == "__main__":
    main()
