"""The paper's findings on one real pretrained model, end to end, offline, on CPU.

Runs, into one folder, each stage resumable (a rerun skips what is done):

1. ``detect/``: the CLI's detection on 3 lengths x 5 depths x 4 needles (1K, 2K, 4K tokens);
2. ``sparse/``, ``dynamic/``: share of heads above 0.1, top heads with intervals, activation
   frequency (always-on and dynamic heads), from that detection;
3. ``scorers.json``: agreement of the three scorers of the same pass (retrieval, top-k mass,
   attention mass): Pearson, Spearman, top-k Jaccard;
4. ``causal/``: K-sweep, top-K against seeded random-K and matched-layer controls, answer classes,
   on held-out trials (the other seed's needles);
5. ``kv/``: the KV-cache what-if curve and the DuoAttention export;
6. ``cot/`` (instruct models): chain-of-thought arithmetic against parametric facts
   (``experiments/questions/cot_vs_facts.jsonl``), top-K against random-K;
7. ``report.html``; ``summary.json`` gathers the numbers quoted in ``docs/real-models.md``.

    python experiments/real_models.py --model smollm2-135m-instruct --out runs/real/smollm2-135m-instruct
    python experiments/real_models.py --model gemma-3-270m --out runs/real/gemma-3-270m --stages causal kv

``make real-findings MODEL=...`` runs it. On 2 CPU cores a model takes one to two hours.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

STAGES = ("detect", "sparse", "dynamic", "scorers", "causal", "kv", "cot", "report", "summary")
QUESTIONS = Path(__file__).resolve().parent / "questions" / "cot_vs_facts.jsonl"
DETECT_GRID = ["--lengths", "1000", "2000", "4000", "--n-depths", "5", "--n-needles", "4"]


def _scorer_agreement(detect_dir: Path, k: int) -> dict:
    from retrieval_heads import analysis
    from retrieval_heads.results import HeadScores, load_results

    _, _, records = load_results(detect_dir)
    by = {s: HeadScores.from_records(records, s) for s in ("retrieval", "topk", "attention_mass")}
    names = list(by)
    pairs = {}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            agree = analysis.agreement(by[a], by[b], k=k)
            pairs[f"{a} vs {b}"] = {
                "pearson": agree.pearson,
                "spearman": agree.spearman,
                f"jaccard_top{k}": agree.jaccard,
                "shared_top": [h.dotted for h in agree.shared_top],
            }
    tops = {s: [[h.dotted, v] for h, v in by[s].ranking()[:k]] for s in names}
    return {"k": k, "pairs": pairs, "top": tops}


def main(argv: list[str] | None = None) -> dict:
    p = C.parser(__doc__, "runs/real/model")
    p.add_argument("--model", required=True, help="registry name, .gguf file or HF directory")
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    p.add_argument("--ks", default="2,5,10,20", help="K-sweep values (2,5,10,20)")
    p.add_argument("--draws", type=int, default=3, help="random draws per K (3)")
    p.add_argument("--sweep-lengths", default="1000,2000", help="held-out trial lengths")
    p.add_argument("--sweep-needles", type=int, default=2, help="held-out needles (2)")
    p.add_argument("--sweep-depths", default="10,50,90", help="held-out depths (10,50,90)")
    p.add_argument("--kv-window", type=int, default=64, help="recent tokens kept (64)")
    p.add_argument("--cot-k", type=int, default=10, help="heads masked for chain of thought (10)")
    p.add_argument("--max-cot", type=int, default=160, help="tokens for a CoT answer (160)")
    args = p.parse_args(argv)

    from retrieval_heads import cli, registry

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    say = C.Clock()
    detect_dir = out / "detect"
    seed = ["--seed", str(args.seed)]
    held_out = [
        "--sweep-lengths",
        args.sweep_lengths,
        "--sweep-depths",
        args.sweep_depths,
        "--sweep-needles",
        str(args.sweep_needles),
        "--seed",
        str(args.seed),
    ]
    summary: dict = {}
    for stage in args.stages:
        say(f"stage {stage}")
        if stage == "detect":
            code = cli.main(
                ["detect", "--model", args.model, *DETECT_GRID, *seed, "--out", str(detect_dir)]
            )
            if code:
                raise SystemExit(code)
        elif stage == "sparse":
            import sparse

            sparse.main(["--scores", str(detect_dir), "--out", str(out / "sparse")])
        elif stage == "dynamic":
            import dynamic

            dynamic.main(["--scores", str(detect_dir), "--out", str(out / "dynamic")])
        elif stage == "scorers":
            C.write_json(out / "scorers.json", _scorer_agreement(detect_dir, 10))
        elif stage == "causal":
            import causal_sweep

            causal_sweep.main(
                [
                    "--model",
                    args.model,
                    "--scores",
                    str(detect_dir),
                    "--ks",
                    f"0,{args.ks}",
                    "--draws",
                    str(args.draws),
                    "--matched",
                    *held_out,
                    "--out",
                    str(out / "causal"),
                ]
            )
        elif stage == "kv":
            import kv_cache

            kv_cache.main(
                [
                    "--model",
                    args.model,
                    "--scores",
                    str(detect_dir),
                    "--window",
                    str(args.kv_window),
                    "--draws",
                    str(args.draws),
                    *held_out,
                    "--out",
                    str(out / "kv"),
                ]
            )
        elif stage == "cot":
            if not registry.default_chat(args.model):
                say("cot: skipped (the chain-of-thought comparison is for instruct models)")
                continue
            import cot

            cot.main(
                [
                    "--model",
                    args.model,
                    "--scores",
                    str(detect_dir),
                    "--questions",
                    str(QUESTIONS),
                    "--chat",
                    "--ks",
                    f"0,{args.cot_k}",
                    "--draws",
                    str(args.draws),
                    "--max-cot",
                    str(args.max_cot),
                    "--progress",
                    "--out",
                    str(out / "cot"),
                ]
            )
        elif stage == "report":
            dirs = [
                d
                for d in (detect_dir, out / "causal" / "ablate", out / "kv" / "kv-sim")
                if (d / "meta.json").exists()
            ]
            code = cli.main(
                [
                    "report",
                    *map(str, dirs),
                    "--out",
                    str(out / "report.html"),
                    "--model",
                    args.model,
                ]
            )
            if code:
                raise SystemExit(code)
        elif stage == "summary":
            summary = gather(out, args.model)
            C.write_json(out / "summary.json", summary)
    C.finish(out, [out / "summary.json"], say)
    return summary


#: What each stage leaves behind that the summary quotes.
STAGE_FILES = {
    "sparse": "sparse/summary.json",
    "dynamic": "dynamic/dynamic.json",
    "scorers": "scorers.json",
    "causal": "causal/k_sweep.json",
    "kv": "kv/kv_curve.json",
    "cot": "cot/cot.json",
}


def gather(out: Path, model: str) -> dict:
    """The stages' own JSON files in one (a stage not run yet is absent), with provenance."""
    import json

    from retrieval_heads.results import provenance

    summary: dict = {"model": model, "provenance": provenance()}
    for stage, name in STAGE_FILES.items():
        if (out / name).is_file():
            summary[stage] = json.loads((out / name).read_text())
    return summary


if __name__ == "__main__":
    main()
