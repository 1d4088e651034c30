"""Measure the embedded model against its quality bar (the figures in its model card).

    python experiments/tiny_model_card.py [--model tiny] [--out runs/model-card]

- NIAH with 2 distractor needles, held-out keys, fresh values: exact answers per length x depth,
  greedy decoding through the project's scorer (which also gives the sparsity figures);
- memorised facts (all 300) and 3-hop chains: exact answers (teacher-forced argmax over the answer
  and ``</s>``, which equals greedy exact match).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch


def teacher_forced_exact(hf_model, samples) -> float:
    correct = 0
    for sample in samples:
        ids = torch.from_numpy(sample.input_ids)[None]
        predicted = hf_model(ids).logits[0, :-1].argmax(-1).numpy()
        start, end = sample.answer_span
        correct += bool((predicted[start - 1 : end - 1] == sample.input_ids[start:end]).all())
    return correct / len(samples)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--out", type=Path, default=Path("runs/model-card"))
    parser.add_argument("--needles", type=int, default=6)
    parser.add_argument("--chains", type=int, default=200)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)

    from retrieval_heads.model import load_model
    from retrieval_heads.scoring import detect
    from retrieval_heads.tiny.data import Builder
    from retrieval_heads.tiny.trials import tiny_grid

    model = load_model(args.model)
    top = model.n_ctx - 24
    lengths = sorted({131, top // 4 + 7, top // 2 + 3, 3 * top // 4 + 1, top})
    depths = [0, 25, 50, 75, 100]
    trials = tiny_grid(
        model.tokenizer, lengths=lengths, depths=depths, n_needles=args.needles, seed=args.seed
    )
    scores = detect(model, trials, out=args.out / args.model, model_name=model.name, seed=args.seed)
    records = [json.loads(line) for line in (args.out / args.model / "trials.jsonl").open()]
    cells: dict[tuple, list[bool]] = defaultdict(list)
    for r in records:
        key = (r["params"]["context_length"], r["params"]["depth_percent"])
        cells[key].append(r["generated_text"] == r["expected"])
    grid = {
        f"{length}x{depth:g}": float(np.mean(v)) for (length, depth), v in sorted(cells.items())
    }

    builder = Builder(seed=args.seed + 1, n_bank=4000)
    fact_samples = [builder.fact(128, i) for i in range(len(builder.facts))]
    chain_samples = [builder.chain(min(512, model.n_ctx), "test", 3) for _ in range(args.chains)]
    with torch.no_grad():
        facts = teacher_forced_exact(model.hf_model, fact_samples)
        chains = teacher_forced_exact(model.hf_model, chain_samples)

    n_heads = model.n_layers * model.n_heads
    summary = {
        "model": model.name,
        "niah_trials": len(records),
        "niah_exact": float(np.mean([r["generated_text"] == r["expected"] for r in records])),
        "niah_min_cell": min(grid.values()),
        "niah_cells": grid,
        "facts_exact": facts,
        "chain3_exact": chains,
        "top_head": [scores.top(1)[0].dotted, scores.score(scores.top(1)[0])],
        "heads_above_0.1": len(scores.above(0.1)),
        "share_above_0.1": len(scores.above(0.1)) / n_heads,
        "top_heads": [(h.dotted, round(scores.score(h), 3)) for h in scores.top(10)],
    }
    print(json.dumps(summary, indent=1))
    (args.out / f"{args.model}-card.json").write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
