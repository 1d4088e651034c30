"""The paper's claims on the seven models whose scores Wu et al. (2024) published.

Runs on ``{"L-H": [score per successful trial]}`` files (pass the files, or a folder of them):

1. sparsity: per model the share of heads above 0.1 and the histogram in the paper's bins;
3. intrinsic: agreement of Qwen1.5-14B with Qwen1.5-14B-Chat (chat tuning) and of
   Mistral-7B-v0.2 with Mixtral-8x7B (upcycling), when those files are given (``--pair A:B``
   adds or replaces pairs, by file stem);
4. dynamic activation needs per-trial copy events and trial parameters, which the published
   files lack. What they do hold, per-trial scores, gives each head's activation frequency (a
   score above 0 means at least one copy event in that trial) and the always-on heads; which
   contexts activate a head cannot be computed from them.

Prints the paper-style summary table (:func:`retrieval_heads.analysis.summary_table`).

    python experiments/published_scores.py ../shared/reference/retrieval_head_scores

Writes ``published.json``, ``table.txt``, ``histogram.html`` and ``scatter-<A>-<B>.html``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

DEFAULT_PAIRS = [
    ("Qwen1.5-14B", "Qwen1.5-14B-Chat"),
    ("Mistral-7B-v0.2-hf", "Mixtral-8x7B-v0.1"),
]


def _files(paths: list[Path]) -> list[Path]:
    out = []
    for path in paths:
        if path.is_dir():
            found = sorted(path.glob("*.json"))
            if not found:
                raise SystemExit(f"published_scores: no .json files in {path}")
            out += found
        elif path.exists():
            out.append(path)
        else:
            raise SystemExit(f"published_scores: {path} does not exist")
    return out


def main(argv: list[str] | None = None) -> dict:
    p = C.parser(__doc__, "runs/experiments/published")
    p.add_argument("paths", type=Path, nargs="+", help="score files or folders of them")
    p.add_argument("--pair", action="append", default=None, help="A:B (file stems) to compare")
    p.add_argument("--k", type=C.ints, default=[20], help="top-k sizes for Jaccard (20)")
    p.add_argument("--threshold", type=float, default=0.1, help="retrieval threshold (0.1)")
    args = p.parse_args(argv)

    from dynamic import NO_EVENTS, frequency_from_scores, frequency_summary
    from intrinsic import compare

    from retrieval_heads import analysis
    from retrieval_heads.store import load_results
    from retrieval_heads.views import figures

    say = C.Clock()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    models = {}
    for path in _files(args.paths):
        _, scores, _ = load_results(path)
        models[path.stem] = scores
    say(f"read {len(models)} score files: {', '.join(models)}")

    sparsity = {}
    for name, scores in models.items():
        hist = analysis.histogram(scores)
        freq = frequency_from_scores(scores)
        dyn = frequency_summary(freq, scores, args.threshold)
        sparsity[name] = {
            "shape": list(scores.shape),
            "trials": scores.n_total,
            "n_retrieval": len(scores.above(args.threshold)),
            "share": analysis.sparsity(scores, args.threshold),
            "n_above_0.5": len(scores.above(0.5)),
            "histogram": hist.to_dict(),
            "top": [[h.dotted, s] for h, s in scores.ranking()[:5]],
            "activation": {
                "always_on": dyn["always_on"],
                "n_silent": dyn["n_silent"],
                "n_dynamic": dyn["n_dynamic"],
                "retrieval_always_on": dyn["retrieval_always_on"],
                "median_frequency_of_retrieval_heads": (
                    float(
                        sorted(dyn["frequency_of_retrieval_heads"].values())[
                            len(dyn["frequency_of_retrieval_heads"]) // 2
                        ]
                    )
                    if dyn["frequency_of_retrieval_heads"]
                    else None
                ),
            },
        }

    pairs = DEFAULT_PAIRS if args.pair is None else [tuple(x.split(":", 1)) for x in args.pair]
    agreements = {}
    skipped = []
    for a, b in pairs:
        if a not in models or b not in models:
            skipped.append(f"{a} vs {b}: not both given")
            continue
        if models[a].shape != models[b].shape:
            skipped.append(f"{a} vs {b}: shapes differ ({models[a].shape}, {models[b].shape})")
            continue
        agreements[f"{a} vs {b}"] = {"a": a, "b": b, **compare(models[a], models[b], args.k)}

    table = analysis.summary_table(models, args.threshold)
    lines = [table]
    for label, r in agreements.items():
        lines.append(
            f"{label}: Pearson {r['pearson']:.3f}, Spearman {r['spearman']:.3f}, "
            + ", ".join(f"Jaccard top-{k} {v:.3f}" for k, v in r["jaccard"].items())
            + f"; retrieval heads shared {len(r['retrieval_shared'])} of "
            f"{len(r['retrieval_a'])} / {len(r['retrieval_b'])}"
        )
    for s in skipped:
        lines.append(f"skipped {s}")
    lines.append("")
    lines.append(f"dynamic activation: {NO_EVENTS}.")
    for name, s in sparsity.items():
        act = s["activation"]
        lines.append(
            f"  {name}: always-on heads {len(act['always_on'])} "
            f"({', '.join(act['always_on'][:6]) or '-'}); median activation frequency of its "
            f"retrieval heads {act['median_frequency_of_retrieval_heads']:.2f}"
            if act["median_frequency_of_retrieval_heads"] is not None
            else f"  {name}: no retrieval heads"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    result = {
        "claims": "1 sparse, 3 intrinsic, 4 (partly) dynamic, on the published scores",
        "files": {name: s.source for name, s in models.items()},
        "threshold": args.threshold,
        "sparsity": sparsity,
        "agreement": agreements,
        "skipped": skipped,
        "dynamic_note": NO_EVENTS,
    }
    files = [
        C.write_json(out / "published.json", result),
        C.write_text(out / "table.txt", text),
        C.write_figure(
            figures.score_histogram(models, title="Published scores: heads per bin"),
            out / "histogram.html",
        ),
    ]
    for r in agreements.values():
        files.append(
            C.write_figure(
                figures.model_scatter(
                    models[r["a"]], models[r["b"]], names=(r["a"], r["b"]), k=args.k[0]
                ),
                out / f"scatter-{r['a']}-{r['b']}.html",
            )
        )
    C.finish(out, files, say)
    return result


if __name__ == "__main__":
    main()
