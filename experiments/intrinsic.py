"""Claim 3 - retrieval heads are intrinsic: continued training keeps the same heads.

Wu et al. (2024) find that models derived from one base (context extension: Llama-2-7B ->
-80K; chat tuning: Qwen1.5-14B -> -Chat; upcycling to a mixture of experts: Mistral -> Mixtral)
keep the base model's retrieval heads: the score tables correlate and the top heads overlap.
This script compares two result sets: Pearson and Spearman over heads, the Jaccard index of the
top-k heads (k configurable), the retrieval heads they share and the heads that moved most.

A and B are each an existing results directory or score file, or a model to detect on (a grid
fitted to its context). The default is the embedded model's own history: its short-context
checkpoint ``tiny-short`` (context 256, detected at <= 250 tokens) against ``tiny`` after
context extension to 1024:

    python experiments/intrinsic.py                      # tiny-short vs tiny
    python experiments/intrinsic.py A B --k 5,10,20
    python experiments/intrinsic.py ../shared/reference/retrieval_head_scores/Qwen1.5-14B.json \\
        ../shared/reference/retrieval_head_scores/Qwen1.5-14B-Chat.json --k 20

Writes ``agreement.json``, ``table.txt`` and ``scatter.html``; detections go to
``detect-a/`` and ``detect-b/``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402


def compare(a, b, ks: list[int], threshold: float = 0.1) -> dict:
    """Agreement of two score tables: correlations, top-k Jaccard per k, shared retrieval
    heads and the heads whose score moved most."""
    import numpy as np

    from retrieval_heads import analysis

    first = analysis.agreement(a, b, k=ks[0])
    ta, tb = analysis.score_table(a), analysis.score_table(b)
    ra = {h.dotted for h in a.above(threshold)}
    rb = {h.dotted for h in b.above(threshold)}
    diff = np.nan_to_num(tb - ta)
    order = np.argsort(-np.abs(diff).ravel(), kind="stable")[:8]
    n_heads = ta.shape[1]
    return {
        "pearson": first.pearson,
        "spearman": first.spearman,
        "n_heads": first.n_heads,
        "jaccard": {str(k): analysis.jaccard_top_k(a, b, k) for k in ks},
        "shared_top": {
            str(k): [h.dotted for h in analysis.agreement(a, b, k=k).shared_top] for k in ks
        },
        "retrieval_a": sorted(ra),
        "retrieval_b": sorted(rb),
        "retrieval_shared": sorted(ra & rb),
        "retrieval_jaccard": len(ra & rb) / len(ra | rb) if ra | rb else float("nan"),
        "moved": [
            [f"{i // n_heads}.{i % n_heads}", float(ta.flat[i]), float(tb.flat[i])] for i in order
        ],
    }


def main(argv: list[str] | None = None) -> dict:
    p = C.parser(__doc__, "runs/experiments/intrinsic")
    p.add_argument("a", nargs="?", default="tiny-short", help="first result set or model")
    p.add_argument("b", nargs="?", default="tiny", help="second result set or model")
    p.add_argument("--k", type=C.ints, default=[5, 10, 20], help="top-k sizes (5,10,20)")
    p.add_argument("--threshold", type=float, default=0.1, help="retrieval threshold (0.1)")
    p.add_argument("--lengths-a", type=C.ints, default=None, help="A's lengths (fit to n_ctx)")
    p.add_argument("--lengths-b", type=C.ints, default=None, help="B's lengths (fit to n_ctx)")
    p.add_argument("--depths", type=C.floats, default=C.DEFAULT_DEPTHS, help="percent (0,50,100)")
    p.add_argument("--n-needles", type=int, default=2)
    p.add_argument("--n-distractors", type=int, default=2)
    args = p.parse_args(argv)
    if not args.k or min(args.k) < 1:
        p.error("--k needs positive integers")

    from retrieval_heads import analysis
    from retrieval_heads.views import figures

    say = C.Clock()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    sets = {}
    info = {}
    for slot, source, lengths in (("a", args.a, args.lengths_a), ("b", args.b, args.lengths_b)):
        meta, scores, records, where = C.detect_or_load(
            source,
            out / f"detect-{slot}",
            scores=source if C.is_results(source) else None,
            lengths=lengths,
            depths=args.depths,
            n_needles=args.n_needles,
            n_distractors=args.n_distractors,
            seed=args.seed,
            say=say,
        )
        label = C.label_for(source, meta)
        if label in sets:
            label = f"{label} ({slot.upper()})"
        sets[label] = scores
        used = sorted({int(r.params.get("context_length", 0)) for r in records}) or None
        info[slot] = {
            "label": label,
            "source": where,
            "shape": list(scores.shape),
            "trials": scores.n_total,
            "passing_trials": scores.n_passed,
            "lengths": used,
        }
    (name_a, a), (name_b, b) = sets.items()
    if a.shape != b.shape:
        raise SystemExit(
            f"intrinsic: {name_a} is {a.shape}, {name_b} is {b.shape}: no per-head pairing"
        )
    result = {
        "claim": "derived models keep their base model's retrieval heads",
        "a": info["a"],
        "b": info["b"],
        "k": args.k,
        "threshold": args.threshold,
        **compare(a, b, args.k, args.threshold),
    }
    lines = [
        f"A  {name_a}: {info['a']['passing_trials']}/{info['a']['trials']} trials passed"
        + (f", lengths {info['a']['lengths']}" if info["a"]["lengths"] else ""),
        f"B  {name_b}: {info['b']['passing_trials']}/{info['b']['trials']} trials passed"
        + (f", lengths {info['b']['lengths']}" if info["b"]["lengths"] else ""),
        f"heads compared       {result['n_heads']}",
        f"Pearson              {result['pearson']:.3f}",
        f"Spearman             {result['spearman']:.3f}",
        *(
            f"Jaccard top-{k:<8} {result['jaccard'][str(k)]:.3f}   shared: "
            + ", ".join(result["shared_top"][str(k)])
            for k in args.k
        ),
        f"retrieval heads      A {len(result['retrieval_a'])}, B {len(result['retrieval_b'])}, "
        f"shared {len(result['retrieval_shared'])} ({', '.join(result['retrieval_shared'])})",
        "moved most (A -> B)  "
        + ", ".join(f"{h} {x:.2f}->{y:.2f}" for h, x, y in result["moved"][:5]),
    ]
    text = "\n".join(lines) + "\n\n" + analysis.summary_table(sets, args.threshold)
    print(text)
    files = [
        C.write_json(out / "agreement.json", result),
        C.write_text(out / "table.txt", text),
        C.write_figure(
            figures.model_scatter(a, b, names=(name_a, name_b), k=args.k[0]),
            out / "scatter.html",
        ),
    ]
    C.finish(out, files, say)
    return result


if __name__ == "__main__":
    main()
