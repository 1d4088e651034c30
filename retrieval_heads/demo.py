"""``make demo``: the main job, end to end, on the embedded model in a few minutes on a laptop CPU
(``make demo MODEL=gemma-3-270m`` or ``MODEL=smollm2-135m-instruct``: a real model, on a grid
sized for a CPU).

1. detect retrieval heads on a needle-in-a-haystack grid (lengths x depths x needles);
2. K-sweep: mask the top-K retrieval heads, and K random non-retrieval heads (seeded draws);
3. KV-cache what-if: keep the whole context only for the top-K KV heads (others keep 4 sink + 32
   recent tokens), against K random KV heads and uniform windowing of every head;
4. write one self-contained HTML report, and print a six-line summary.

Every stage writes a resumable results directory under ``--out``; rerunning skips finished work.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

#: The grids of each stage: the embedded model's (unchanged since the first demo), and one sized
#: for a real model on a CPU (about 2 minutes of detection for Gemma-3-270M on one core).
PLANS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        lengths=[150, 400, 700, 990],
        depths=[0, 25, 50, 75, 100],
        needles=3,
        sweep_lengths=[300, 900],
        sweep_needles=2,
        ks=[0, 2, 6, 12],
        draws=3,
        kv_ks=[0, 2, 8],
        window=32,
        uniform_windows=[64, 256],
    ),
    "real": dict(
        lengths=[600, 1200, 2000],
        depths=[0, 50, 100],
        needles=2,
        sweep_lengths=[1000],
        sweep_needles=1,
        ks=[0, 5, 10, 20],
        draws=2,
        kv_ks=[0, 2, 8],
        window=64,
        uniform_windows=[256],
    ),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch

    from retrieval_heads import analysis, causal, kvcache
    from retrieval_heads.model import load_model
    from retrieval_heads.scoring import detect
    from retrieval_heads.trials import make_trials
    from retrieval_heads.views.report import build_report

    torch.manual_seed(args.seed)
    began = time.perf_counter()

    def say(message: str) -> None:
        print(f"[{time.perf_counter() - began:5.1f}s] {message}", flush=True)

    model = load_model(args.model)
    say(f"loaded {model!r}")
    plan = PLANS["tiny" if model.world == "tiny" else "real"]
    grid = dict(depths=plan["depths"], n_distractors=2, seed=args.seed)
    trials = make_trials(model, lengths=plan["lengths"], n_needles=plan["needles"], **grid)
    shape = (
        f"{len(plan['lengths'])} lengths x {len(plan['depths'])} depths x {plan['needles']} needles"
    )
    say(f"detect: {len(trials)} trials ({shape}, 2 distractors each)")
    scores = detect(
        model,
        trials,
        out=args.out / "detect",
        model_name=model.name,
        run_config={"grid": "demo", **grid},
        seed=args.seed,
    )
    assert scores is not None  # not sharded: detect returns the scores

    sweep_trials = make_trials(
        model, lengths=plan["sweep_lengths"], n_needles=plan["sweep_needles"], **grid
    )
    ks = plan["ks"]
    say(f"K-sweep: K = {ks}, top-K vs {plan['draws']} random draws, on {len(sweep_trials)} trials")
    records = causal.k_sweep(
        model,
        sweep_trials,
        scores,
        ks,
        draws=plan["draws"],
        seed=args.seed,
        out=args.out / "ablate",
        include_matched=False,
    )
    rows = {(r.k, r.selection): r for r in analysis.summarise_k_sweep(records)}

    kv_trials = make_trials(model, lengths=plan["sweep_lengths"], n_needles=1, **grid)
    say(f"KV-cache what-if: top-K vs random-K KV heads vs uniform windows, {len(kv_trials)} trials")
    sweep = kvcache.simulate(
        model,
        kv_trials,
        scores,
        ks=plan["kv_ks"],
        draws=2,
        seed=args.seed,
        sink=4,
        window=plan["window"],
        uniform_windows=plan["uniform_windows"],
        out=args.out / "kv-sim",
    )
    curve = sweep.curve()
    chosen = sweep.chosen()
    same_k = next((p for p in curve if p.selection == "random" and p.k == chosen.k), None)

    say("report")
    report = build_report(
        [args.out / "detect", args.out / "ablate", args.out / "kv-sim"],
        args.out / "report.html",
        model=model,
        trials={t.trial_id: t.input_ids for t in trials},
    )
    say(f"wrote {report} ({report.stat().st_size / 1e6:.1f} MB)")

    n_heads = model.n_layers * model.n_heads
    retrieval = scores.above(0.1)
    top = ", ".join(f"{h.dotted} ({scores.score(h):.2f})" for h in scores.top(5))
    k = ks[-2]
    print("\nSummary")
    print(f"  model         {model.name}: {model.n_layers} layers x {model.n_heads} heads")
    print(f"  top heads     {top}")
    print(
        f"  sparsity      {len(retrieval)} of {n_heads} heads score > 0.1 ({len(retrieval) / n_heads:.1%})"
    )
    print(
        f"  NIAH accuracy baseline {rows[(0, 'none')].accuracy:.0%}; top-{k} masked "
        f"{rows[(k, 'top')].accuracy:.0%}; {k} random masked {rows[(k, 'random')].accuracy:.0%}"
        f" ± {rows[(k, 'random')].accuracy_std:.0%}"
    )
    control = f"; {chosen.k} random KV heads {same_k.accuracy:.0%}" if same_k else ""
    print(
        f"  KV cache      top-{chosen.k} KV heads full, others 4+{plan['window']} tokens: accuracy "
        f"{chosen.accuracy:.0%} with {chosen.kv_share:.0%} of the cache{control}"
    )
    print(f"  report        {report}   (took {time.perf_counter() - began:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
