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

STAGES = (
    "detect",
    "sparse",
    "dynamic",
    "scorers",
    "layers",
    "causal",
    "kv",
    "cot",
    "report",
    "summary",
    "tables",
)
QUESTIONS = Path(__file__).resolve().parent / "questions" / "cot_vs_facts.jsonl"


def _scorer_agreement(detect_dir: Path, k: int) -> dict:
    from retrieval_heads import analysis
    from retrieval_heads.scores import HeadScores
    from retrieval_heads.store import load_results

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


def _config(model: str):
    from transformers import AutoConfig

    from retrieval_heads import registry

    source = registry.resolve(model) if registry.lookup(model) else model
    return AutoConfig.from_pretrained(str(source))


def default_ks(model: str) -> tuple[str, str]:
    """K values for the head K-sweep and the KV-cache curve, by the model's size: about 2, 4
    and 8% of its heads (at least 2, 5, 10), and 5-66% of its KV heads."""
    cfg = _config(model)
    heads = cfg.num_hidden_layers * cfg.num_attention_heads
    kv = cfg.num_hidden_layers * (cfg.num_key_value_heads or cfg.num_attention_heads)
    ks = sorted({max(k, round(heads * f)) for k, f in ((2, 0.02), (5, 0.04), (10, 0.08))})
    kv_ks = sorted({max(1, round(kv * f)) for f in (0.05, 0.15, 0.33, 0.66)})
    return ",".join(map(str, ks)), ",".join(map(str, kv_ks))


def _layer_windows(model: str, meta: dict) -> list:
    """Each layer's sliding window (None: global), from the run's meta or the model's config."""
    info = (meta.get("extra") or {}).get("model_info")
    if info:
        return info["layer_windows"]
    cfg = _config(model)
    window, types = getattr(cfg, "sliding_window", None), getattr(cfg, "layer_types", None)
    if not window or not types:
        return [None] * cfg.num_hidden_layers
    return [int(window) if t == "sliding_attention" else None for t in types]


def _layer_profile(detect_dir: Path, model: str) -> dict:
    """Where the copying happens, layer by layer, and how far the copied token was.

    A copy event at decode step ``s`` reads key ``k`` from query position ``q = L - 1 + s``
    (``L`` tokens of prompt; the last prompt token is the first decode step). In a sliding
    layer of window ``w`` the query sees only keys ``q - w < k <= q``, so a needle further
    away can only be copied by a global layer: the events are split by that distance."""
    import numpy as np

    from retrieval_heads.store import load_results

    meta, scores, records = load_results(detect_dir)
    windows = _layer_windows(model, meta)
    table = np.nan_to_num(scores.mean)  # [layer, head], mean over passing trials
    layers = []
    for layer, window in enumerate(windows):
        row = table[layer]
        layers.append(
            {
                "layer": layer,
                "window": window,
                "max": float(row.max()),
                "mean": float(row.mean()),
                "heads_above_0.1": int((row > 0.1).sum()),
            }
        )
    smallest = min((w for w in windows if w), default=None)
    events = {"near": {"global": 0, "sliding": 0}, "far": {"global": 0, "sliding": 0}}
    trials = {"near": 0, "far": 0}
    for r in records:
        if not r.passed:
            continue
        length = int(r.params["context_length"])
        start = int(r.params["answer_span"][0])
        far = smallest is not None and length - 1 - start >= smallest
        trials["far" if far else "near"] += 1
        for step, layer, _head, key in r.copy_events:
            kind = "global" if windows[layer] is None else "sliding"
            distance = length - 1 + step - key
            assert windows[layer] is None or distance < windows[layer], "a window was crossed"
            events["far" if far else "near"][kind] += 1
    return {
        "windows": windows,
        "smallest_window": smallest,
        "layers": layers,
        "passing_trials_by_needle_distance": trials,
        "copy_events_by_needle_distance": events,
    }


def main(argv: list[str] | None = None) -> dict:
    p = C.parser(__doc__, "runs/real/model")
    p.add_argument("--model", required=True, help="registry name, .gguf file or HF directory")
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    p.add_argument("--lengths", default="1000,2000,4000", help="detection lengths (1000,2000,4000)")
    p.add_argument("--n-depths", type=int, default=5, help="detection depths (5)")
    p.add_argument("--n-needles", type=int, default=4, help="detection needles (4)")
    p.add_argument("--ks", default=None, help="K-sweep values (default: by the model's size)")
    p.add_argument("--draws", type=int, default=3, help="random and matched draws per K (3)")
    p.add_argument("--sweep-lengths", default="1500", help="held-out trial lengths (1500)")
    p.add_argument("--sweep-needles", type=int, default=2, help="held-out needles (2)")
    p.add_argument("--sweep-depths", default="10,37,63,90", help="held-out depths (10,37,63,90)")
    p.add_argument("--kv-ks", default=None, help="full KV heads (default: by the model's size)")
    p.add_argument("--kv-draws", type=int, default=2, help="random KV draws per K (2)")
    p.add_argument("--kv-depths", default="10,50,90", help="held-out depths of the curve")
    p.add_argument("--kv-window", type=int, default=64, help="recent tokens kept (64)")
    p.add_argument("--cot-k", type=int, default=10, help="heads masked for chain of thought (10)")
    p.add_argument("--cot-draws", type=int, default=1, help="random draws for it (1)")
    p.add_argument("--max-cot", type=int, default=160, help="tokens for a CoT answer (160)")
    args = p.parse_args(argv)

    from retrieval_heads import cli, registry

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    say = C.Clock()
    detect_dir = out / "detect"
    seed = ["--seed", str(args.seed)]
    grid = ["--lengths", args.lengths, "--n-depths", str(args.n_depths)]
    grid += ["--n-needles", str(args.n_needles)]

    def held_out(depths: str) -> list[str]:
        """Trials of another seed than detection's, so heads are not tested where chosen."""
        return ["--sweep-lengths", args.sweep_lengths, "--sweep-depths", depths,
                "--sweep-needles", str(args.sweep_needles), "--seed", str(args.seed)]  # fmt: skip

    ks, kv_ks = default_ks(args.model)
    ks, kv_ks = args.ks or ks, args.kv_ks or kv_ks
    say(f"{args.model}: K-sweep K = {ks}; KV-cache full KV heads K = {kv_ks}")
    model = ["--model", args.model, "--scores", str(detect_dir)]
    summary: dict = {}
    for stage in args.stages:
        say(f"stage {stage}")
        if stage == "detect":
            code = cli.main(
                ["detect", "--model", args.model, *grid, *seed, "--out", str(detect_dir)]
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
        elif stage == "layers":
            C.write_json(out / "layers.json", _layer_profile(detect_dir, args.model))
        elif stage == "causal":
            import causal_sweep

            sweep = ["--ks", f"0,{ks}", "--draws", str(args.draws), "--matched"]
            trials = held_out(args.sweep_depths)
            causal_sweep.main([*model, *sweep, *trials, "--out", str(out / "causal")])
        elif stage == "kv":
            import kv_cache

            curve = ["--ks", f"0,{kv_ks}", "--draws", str(args.kv_draws)]
            curve += ["--window", str(args.kv_window)]
            trials = held_out(args.kv_depths)
            kv_cache.main([*model, *curve, *trials, "--out", str(out / "kv")])
        elif stage == "cot":
            if not registry.default_chat(args.model):
                say("cot: skipped (the chain-of-thought comparison is for instruct models)")
                continue
            import cot

            harness = ["--questions", str(QUESTIONS), "--chat", "--ks", f"0,{args.cot_k}"]
            harness += ["--draws", str(args.cot_draws), "--max-cot", str(args.max_cot)]
            cot.main([*model, *harness, "--progress", "--out", str(out / "cot")])
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
        elif stage == "tables":
            C.write_text(out / "tables.md", tables(out, args.model))
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
    "layers": "layers.json",
    "causal": "causal/k_sweep.json",
    "kv": "kv/kv_curve.json",
    "cot": "cot/cot.json",
}


def gather(out: Path, model: str) -> dict:
    """The stages' own JSON files in one (a stage not run yet is absent), with provenance."""
    import json

    from retrieval_heads.files import provenance

    summary: dict = {"model": model, "provenance": provenance()}
    for stage, name in STAGE_FILES.items():
        if (out / name).is_file():
            summary[stage] = json.loads((out / name).read_text())
    return summary


def _layer_table(layers: dict) -> str:
    from retrieval_heads import analysis

    rows = [
        [
            f"{r['layer']}",
            "global" if r["window"] is None else f"sliding {r['window']}",
            f"{r['max']:.2f}",
            f"{r['mean']:.3f}",
            r["heads_above_0.1"],
        ]
        for r in layers["layers"]
    ]
    table = analysis.format_table(rows, ["layer", "attention", "max", "mean", "heads > 0.1"])
    events = layers["copy_events_by_needle_distance"]
    trials = layers["passing_trials_by_needle_distance"]
    lines = [table, ""]
    if layers["smallest_window"]:
        w = layers["smallest_window"]
        for where, label in (("near", f"within {w}"), ("far", f"beyond {w}")):
            e = events[where]
            total = e["global"] + e["sliding"]
            share = e["global"] / total if total else float("nan")
            lines.append(
                f"needle {label} tokens of the answer ({trials[where]} passing trials): "
                f"{total} copy events, {share:.0%} in global layers"
            )
    return "\n".join(lines)


def tables(out: Path, model: str) -> str:
    """The stages' own tables in one Markdown file, for docs/real-models.md."""
    import json

    def section(title: str, body: str) -> str:
        return f"## {title}\n\n```\n{body.strip()}\n```"

    parts = [f"# {model}: the stages' tables ({out})"]
    for title, name in (
        ("Sparsity and top heads", "sparse/table.txt"),
        ("Activation frequency", "dynamic/table.txt"),
        ("K-sweep", "causal/table.txt"),
        ("KV-cache what-if", "kv/table.txt"),
        ("Chain of thought vs facts", "cot/table.txt"),
    ):
        if (out / name).is_file():
            parts.append(section(title, (out / name).read_text()))
    if (out / "layers.json").is_file():
        parts.append(section("Layers", _layer_table(json.loads((out / "layers.json").read_text()))))
    if (out / "scorers.json").is_file():
        agree = json.loads((out / "scorers.json").read_text())
        k = agree["k"]
        rows = [
            f"{pair}: Pearson {v['pearson']:.2f}, Spearman {v['spearman']:.2f}, "
            f"top-{k} Jaccard {v[f'jaccard_top{k}']:.2f}"
            for pair, v in agree["pairs"].items()
        ]
        parts.append(section("Scorer agreement", "\n".join(rows)))
    return "\n\n".join(parts) + "\n"


if __name__ == "__main__":
    main()
