"""Beyond the paper - what retrieval heads buy for KV-cache compression.

Keep the whole context for a few KV heads and, for every other head, only the first ``--sink``
tokens and the last ``--window`` (:mod:`retrieval_heads.kvcache`, simulated with attention masks
in hooks). Which heads to keep? The top-K by retrieval score, K random ones (seeded draws), or
none (uniform windowing of every head at several windows). The script measures NIAH accuracy
against the share of the KV cache kept for all three, and exports the smallest sufficient top-K
set in DuoAttention's layout.

    python experiments/kv_cache.py --model tiny --out runs/experiments/kv_cache
    python experiments/kv_cache.py --scores runs/experiments/sparse/detect --window 32

Scores come from ``--scores`` (a detection of the same model) or are detected here first.
Writes ``kv_curve.json``, ``table.txt``, ``kv_curve.html``, the exports
(``full_attention_heads.json``, ``duo_attention/``, ``kv_head_scores.tsv``) and the simulation
results directory ``kv-sim/`` (resumable).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = C.parser(__doc__, "runs/experiments/kv_cache")
    p.add_argument("--model", default="tiny", help="registry name or HF directory (tiny)")
    p.add_argument("--scores", default=None, help="detection of this model (else detect first)")
    p.add_argument("--sink", type=int, default=4, help="first tokens every head keeps (4)")
    p.add_argument("--window", type=int, default=32, help="recent tokens every head keeps (32)")
    p.add_argument("--ks", type=C.ints, default=None, help="full KV heads (0,1,2,4,...)")
    p.add_argument("--draws", type=int, default=3, help="random draws per K (3)")
    p.add_argument("--phase", default="decode", choices=["decode", "all"])
    p.add_argument("--sweep-lengths", type=C.ints, default=[300, 650, 1000], help="(300,650,1000)")
    p.add_argument("--sweep-depths", type=C.floats, default=[0, 25, 50, 75, 100], help="percent")
    p.add_argument("--sweep-needles", type=int, default=2, help="needles in the sweep (2)")
    C.add_grid_args(p)
    args = p.parse_args(argv)

    from retrieval_heads import analysis, kvcache
    from retrieval_heads.views import figures

    say = C.Clock()
    out: Path = args.out
    _, scores, _, source = C.detection(args, out, say)
    model = C.load(args.model)
    trials = C.sweep_grid(model, args)
    say(f"KV-cache what-if on {model.name}: {len(trials)} trials, sink {args.sink}, window "
        f"{args.window}, {args.draws} random draws")  # fmt: skip
    sweep = kvcache.simulate(
        model,
        trials,
        scores,
        ks=args.ks,
        draws=args.draws,
        seed=args.seed,
        sink=args.sink,
        window=args.window,
        phase=args.phase,
        out=out / "kv-sim",
    )
    curve = sweep.curve()
    chosen = sweep.chosen()
    heads = kvcache.top_kv_heads(sweep.kv_scores, chosen.k)
    same_k = [q for q in curve if q.selection == "random" and q.k == chosen.k]
    uniform = [q for q in curve if q.selection == "uniform" and q.kv_share >= chosen.kv_share]
    result = {
        "claim": "keeping the retrieval heads' KV heads whole saves most of the cache at no loss",
        "scores": source,
        "trials": len(trials),
        "sink": args.sink,
        "window": args.window,
        "phase": args.phase,
        "baseline": analysis.baseline_accuracy(curve),
        "chosen": chosen.to_dict(),
        # False when no K measured came within the tolerance: "chosen" is then the largest K
        "chosen_within_tolerance": analysis.is_sufficient(chosen, curve),
        "chosen_kv_heads": [list(h) for h in heads],
        "random_same_k": same_k[0].to_dict() if same_k else None,
        "uniform_at_least_that_share": uniform[0].to_dict() if uniform else None,
        "curve": [q.to_dict() for q in curve],
    }
    kvcache.export_heads(
        out,
        heads,
        sweep.kv_scores,
        sink=args.sink,
        window=args.window,
        group_size=model.n_heads // model.n_kv_heads,
        layer_windows=model.layer_windows(),
        info={
            "model": model.name,
            "scores": source,
            "k": chosen.k,
            "kv_share": chosen.kv_share,
            "within_tolerance": result["chosen_within_tolerance"],
        },
    )
    text = analysis.format_kv_curve(curve)
    print(text)
    files = [
        C.write_json(out / "kv_curve.json", result),
        C.write_text(out / "table.txt", text),
        C.write_figure(
            figures.kv_curve_figure(curve, title=f"{model.name}: NIAH accuracy vs KV cache kept"),
            out / "kv_curve.html",
        ),
        out / "full_attention_heads.json",
    ]
    C.finish(out, files, say)
    return result


if __name__ == "__main__":
    main()
