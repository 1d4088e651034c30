"""What each ``retrieval-heads`` command does: call the library, print what it returned.

``detect``, ``ablate`` and ``kv-sim`` run a sweep (wrapped by :func:`sharded`: a share with
``--shard i/N`` or a torchrun rank); ``merge`` joins the shares; ``patch`` maps the embedded
model's heads by activation patching; ``compare-detectors`` ablates each detector's top-K beside
shared random heads; ``report``, ``compare``, ``export`` and ``models`` read
what is there. The model, trials and ``--scores`` come from :mod:`.inputs`.
"""

from __future__ import annotations

import json
from pathlib import Path

from retrieval_heads.cli import inputs


def print_top(scores, n: int) -> None:
    print(f"\n{'head':>6}  {'score':>6}  {'95% CI':>15}  passing trials")
    for head in scores.top(n):
        s = scores.stats(head)
        print(
            f"{head.dotted:>6}  {s['mean']:6.3f}  [{s['ci_low']:.3f}, {s['ci_high']:.3f}]  {s['n']}"
        )
    share = len(scores.above(0.1)) / (scores.n_layers * scores.n_heads)
    print(
        f"\n{len(scores.above(0.1))} of {scores.n_layers * scores.n_heads} heads score above 0.1 "
        f"({share:.1%}); {scores.n_passed} of {scores.n_total} trials passed"
    )


def cmd_detect(args) -> int:
    from retrieval_heads.scoring import DecodeConfig, detect

    model = inputs.load(args)
    trials = inputs.trials_for(model, args)
    print(f"{model.name}: {len(trials)} trials -> {args.out}")
    scores = detect(
        model,
        trials,
        out=args.out,
        config=DecodeConfig(max_new_tokens=args.max_new_tokens),
        model_name=model.name,
        run_config=inputs.run_config(args, trials),
        seed=args.seed,
        progress=True,
        shard=args.shard,
        batch_size=args.batch_size,
        scorers=args.scorers,
    )
    if args.shard is None:  # a share's scores are not the run's: merge prints those
        print_top(scores, args.top)
    return 0


def cmd_ablate(args) -> int:
    from retrieval_heads import causal, summaries
    from retrieval_heads.scoring import DecodeConfig

    model, scores = inputs.model_and_scores(args)
    if args.mode == "uniform":
        from retrieval_heads.interventions import check_uniform

        check_uniform(model)  # before the trials are built
    trials = inputs.trials_for(model, args)
    records = causal.k_sweep(
        model,
        trials,
        scores,
        args.top_k,
        draws=args.random,
        seed=args.seed,
        mode=args.mode,
        phase=args.phase,
        out=args.out,
        config=DecodeConfig(max_new_tokens=args.max_new_tokens),
        progress=True,
        shard=args.shard,
        batch_size=args.batch_size,
    )
    if args.shard is None:
        print(summaries.format_k_sweep(summaries.summarise_k_sweep(records)))
    return 0


def cmd_compare_detectors(args) -> int:
    from retrieval_heads import detector_comparison as dc
    from retrieval_heads import summaries
    from retrieval_heads.files import atomic_write_text, check_output_file, check_output_folder
    from retrieval_heads.scoring import DecodeConfig
    from retrieval_heads.store import load_records

    check_output_folder(args.out)  # before the model loads
    check_output_file(args.out / "agreement.json", "agreement", owns={"agreement.json"})
    if not Path(args.scores).is_dir():
        raise ValueError(
            f"--scores {args.scores} is not a folder: compare-detectors reads each scorer of a "
            "detection's records (retrieval-heads detect --scorers write,query_focused --out DIR)"
        )
    model, _ = inputs.model_and_scores(args)  # a finished detection of this model's shape
    pattern = None
    if args.patterns:
        from retrieval_heads.detectors import pattern_scores

        pattern = pattern_scores(model)
    tables = dc.detector_tables(load_records(args.scores), pattern)
    if args.mode == "uniform":
        from retrieval_heads.interventions import check_uniform

        check_uniform(model)  # before the trials are built
    trials = inputs.trials_for(model, args)
    print(f"{model.name}: {len(tables)} detectors ({', '.join(tables)}), {len(trials)} trials")
    records = dc.compare_detectors(
        model,
        trials,
        tables,
        args.top_k,
        draws=args.random,
        seed=args.seed,
        mode=args.mode,
        out=args.out,
        config=DecodeConfig(max_new_tokens=args.max_new_tokens),
        progress=True,
        batch_size=args.batch_size,
    )
    rows = summaries.summarise_k_sweep(records)
    agreement = dc.agreement(tables, ks=sorted({*args.top_k, 5, 10, 20}))
    fewest = dc.fewest_heads(rows, 0.5)
    out = {
        "model": model.name,
        "scores": str(args.scores),
        "agreement": agreement,
        "fewest_heads": {"fraction": 0.5, "k": fewest},
        "k_sweep": [row.to_dict() for row in rows],
    }
    atomic_write_text(args.out / "agreement.json", json.dumps(out, indent=1))
    print(dc.format_agreement(agreement))
    print()
    print(summaries.format_k_sweep(rows))
    print("\nfewest heads that halve the baseline accuracy:")
    for name, k in fewest.items():
        print(f"  {name:<20} {'not within the K measured' if k is None else f'K={k}'}")
    broken = {name: k for name, k in fewest.items() if k is not None and name != "random"}
    if broken:
        best = min(broken.values())
        winners = ", ".join(name for name, k in broken.items() if k == best)
        verb = "breaks" if len(winners.split(", ")) == 1 else "break"
        print(f"{winners} {verb} retrieval with the fewest heads (K={best})")
    else:
        print("no detector's top-K halves the baseline accuracy within the K measured")
    print(f"wrote {args.out / 'agreement.json'}")
    return 0


def sharded(command):
    """``command`` (detect, ablate, kv-sim) as this process's share: ``--shard i/N``, or torchrun's rank
    (``args.shard`` is set to it). Under torchrun every rank waits for the others and rank 0
    merges and prints the whole run; with ``--shard`` it says where the share went."""

    def run(args) -> int:
        from retrieval_heads.files import check_output_folder
        from retrieval_heads.scoring import detection_failure
        from retrieval_heads.sharding import Job, shard_dir

        check_output_folder(args.out)  # before the model loads
        with Job.from_env(args.shard) as job:
            args.shard = job.shard
            args.device = job.device(args.device, args.device_map)
            code = command(args)
            if job.shard is None:
                return code
            merged = job.finish(args.out, no_pass_error=detection_failure)
        where = shard_dir(args.out, job.shard)
        if merged is not None:
            print_merged(merged, getattr(args, "top", 10))
        elif job.torchrun:
            print(f"shard {job.shard} written to {where}; rank 0 merges the run")
        else:
            print(
                f"shard {job.shard} written to {where}; once all are: retrieval-heads merge {args.out}"
            )
        return code

    return run


def print_merged(merged, top: int) -> None:
    from retrieval_heads import summaries
    from retrieval_heads.scores import HeadScores

    print(f"merged {merged.count} shards: {len(merged.records)} trials -> {merged.path}")
    if merged.kind == "detect":
        print_top(HeadScores.from_records(merged.records), top)
    elif merged.kind == "ablate":
        print(summaries.format_k_sweep(summaries.summarise_k_sweep(merged.records)))
    elif merged.kind == "kv-sim":
        print_kv_sim(merged.path, merged.records, merged.meta)


def cmd_merge(args) -> int:
    from retrieval_heads.scoring import detection_failure
    from retrieval_heads.sharding import merge

    print_merged(merge(args.dir, no_pass_error=detection_failure), args.top)
    return 0


def cmd_patch(args) -> int:
    from retrieval_heads import patching, registry
    from retrieval_heads.files import atomic_write_text, check_output_file, check_output_folder
    from retrieval_heads.store import load_results

    entry = registry.lookup(args.model)
    if entry is None or entry.world != "tiny":
        raise ValueError(
            f"patch builds its clean/corrupt needle pairs in the embedded model's synthetic "
            f"world, which {args.model} does not speak: use --model tiny or tiny-short "
            "(per-head patching on any model: retrieval_heads.interventions.patch_heads)"
        )
    if args.pairs < 1:
        raise ValueError(f"--pairs must be at least 1, got {args.pairs}")
    check_output_folder(args.out)
    check_output_file(args.out / "patching.json", "patching map", owns={"patching.json"})
    model = inputs.load(args)
    effect = patching.patching_map(
        model, n_pairs=args.pairs, seed=args.seed, length=args.length, batch_size=args.batch_size
    )
    out = {"model": model.name, "pairs": args.pairs, "seed": args.seed, "effect": effect.tolist()}
    if args.scores:
        _, scores, _ = load_results(args.scores)
        out["agreement"] = patching.patching_vs_scores(effect, scores)
        print(f"agreement with retrieval scores: {out['agreement']}")
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "patching.json", json.dumps(out, indent=1))
    print(f"wrote {args.out / 'patching.json'}")
    return 0


def cmd_kv_sim(args) -> int:
    from retrieval_heads import kvcache
    from retrieval_heads.scoring import DecodeConfig

    model, scores = inputs.model_and_scores(args)
    trials = inputs.trials_for(model, args)
    sweep = kvcache.simulate(
        model,
        trials,
        scores,
        ks=args.top_k,
        draws=args.random,
        seed=args.seed,
        sink=args.sink,
        window=args.window,
        uniform_windows=args.uniform_windows,
        phase=args.phase,
        reduce=args.reduce,
        out=args.out,
        config=DecodeConfig(max_new_tokens=args.max_new_tokens),
        progress=True,
        shard=args.shard,
        batch_size=args.batch_size,
    )
    if args.shard is None:
        from retrieval_heads.store import read_meta

        print_kv_sim(args.out, sweep.records, read_meta(args.out), args.tolerance)
    return 0


def print_kv_sim(out: Path, records, meta: dict, tolerance: float = 0.05) -> None:
    """The curve of a finished KV-cache simulation, and its exported smallest sufficient set."""
    import numpy as np

    from retrieval_heads import kvcache, summaries
    from retrieval_heads.views._layers import layer_windows_from_meta

    curve = summaries.kv_curve(records)
    print(summaries.format_kv_curve(curve))
    windows = layer_windows_from_meta(meta, records[0].n_layers) if records else None
    chosen, paths = kvcache.export_chosen(
        out,
        records,
        meta["config"],
        tolerance=tolerance,
        layer_windows=windows,
        info={"model": meta.get("model")},
    )
    print(
        f"\ntop {chosen.k} KV heads keep accuracy {chosen.accuracy:.3f} with "
        f"{chosen.kv_share:.1%} of the KV cache; wrote {paths['json']} and "
        f"{paths['duo_tsv'].parent}/ (DuoAttention layout)"
    )
    # what the listing just written says, from the values it was written from
    if not summaries.is_sufficient(chosen, curve, tolerance):
        print(
            f"warning: no K measured keeps accuracy within {tolerance} of the full cache's "
            f"{summaries.baseline_accuracy(curve):.3f}; exported the largest K measured. Add larger "
            "K to --top-k, or a wider --window, to find a sufficient set"
        )
    exported = kvcache.top_kv_heads(np.asarray(meta["config"]["kv_scores"]), chosen.k)
    sliding = [h for h in exported if windows is not None and windows[h[0]] is not None]
    if sliding:
        print(
            f"note: {len(sliding)} of them sit in sliding-window layers, whose cache keeps only "
            "the layer's own window anyway (listed under full_heads_in_sliding_layers)"
        )


def cmd_report(args) -> int:
    from retrieval_heads.files import check_output_file
    from retrieval_heads.views.report import build_report, is_report_file

    check_output_file(args.out, "report", is_ours=is_report_file)  # before the model loads
    model = None
    if args.model:
        from retrieval_heads.model import load_model

        model = load_model(args.model)
    path = build_report(args.dirs, args.out, model=model)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


def cmd_compare(args) -> int:
    from retrieval_heads import analysis
    from retrieval_heads.store import load_results

    _, a, _ = load_results(args.a)
    _, b, _ = load_results(args.b)
    result = analysis.agreement(a, b, k=args.k)
    print(f"heads compared      {result.n_heads}")
    print(f"Pearson             {result.pearson:.3f}")
    print(f"Spearman            {result.spearman:.3f}")
    print(f"Jaccard of top-{result.k:<4} {result.jaccard:.3f}")
    print(f"shared top heads    {', '.join(h.dotted for h in result.shared_top)}")
    return 0


def cmd_export(args) -> int:
    from retrieval_heads.published import write_published
    from retrieval_heads.store import load_results

    _, scores, _ = load_results(args.results)
    write_published(scores, args.out)
    print(f"wrote {args.out}")
    return 0


def cmd_models(args) -> int:
    from retrieval_heads import registry

    for name in registry.names():
        entry = registry.lookup(name)
        print(f"{name:22} {registry.state(name)}")
        print(f"{'':22} {entry.description}")  # type: ignore[union-attr]  # a registered name
    from retrieval_heads.model import supported_architectures

    print("\nAlso: an HF-format folder, a .gguf file (converted once, cached), or a hub id.")
    print("TransformerLens supports these architectures:")
    print(", ".join(supported_architectures()))
    return 0
